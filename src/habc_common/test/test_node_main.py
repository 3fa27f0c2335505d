"""StopRequest: how SIGINT and SIGTERM stop a node in each phase of its life."""

import os
import signal

import pytest

from habc_common.node_main import STOP_SIGNALS, StopRequest


@pytest.fixture
def stop():
    request = StopRequest()
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    request.install()
    yield request
    request.uninstall()
    assert {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} == before


def deliver(signum: int) -> None:
    # Python runs the handler in this (the main) thread at the next bytecode after kill.
    os.kill(os.getpid(), signum)


@pytest.mark.parametrize('signum', STOP_SIGNALS)
def test_a_signal_while_starting_abandons_the_start_up(stop, signum):
    with pytest.raises(KeyboardInterrupt):
        deliver(signum)
    assert stop.requested


def test_the_first_signal_while_spinning_asks_and_a_second_interrupts(stop):
    stop.phase = 'spinning'
    deliver(signal.SIGINT)  # the running callback finishes; the spin loop then ends
    assert stop.requested and stop.signals == [signal.SIGINT]
    with pytest.raises(KeyboardInterrupt):
        deliver(signal.SIGTERM)  # the launcher escalates: the stuck callback is interrupted


def test_signals_while_closing_are_only_noted(stop):
    stop.phase = 'closing'
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGINT):
        deliver(signum)  # close() (an episode being written out) runs to its end
    assert stop.signals == [signal.SIGINT, signal.SIGTERM, signal.SIGINT]
