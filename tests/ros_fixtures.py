"""Pytest fixtures for tests that run rclpy in the test process (a plugin of every test).

`ros` (one per test) and `ros_module` (one per test module) yield a RosSession: its own
rclpy Context (never the global default one), and a SingleThreadedExecutor spinning on a
background thread from set-up to teardown. (Not a MultiThreadedExecutor: with it, a test
node's 100 Hz timer waited up to 0.5 s behind ready callbacks of its own callback group; one
thread runs every ready callback in turn.) Teardown stops the spinning, shuts the executor
down, destroys every node the session spun and shuts the context down; a callback that
raised (an assert in a stand-in's callback, say) fails the test there if no wait_for
reported it before.

    def test_echo(ros):
        node = ros.create_node('probe')          # on the session's context, spun
        received = []
        node.create_subscription(String, 'out', received.append, 10)
        ...
        ros.wait_for(lambda: received, 'an echo on out')
        answer = ros.call(client, Trigger.Request(), 'arbiter/reset_estop')

Production adapters that make their own node take `context=ros.context`; spin their node
with `ros.add_node(adapter.node)` and, to drop it before the session ends, close the adapter
and call `ros.remove_node(adapter.node)`.

Waiting: `wait_for(predicate, what)` (the session's method, or the module function for tests
without rclpy) returns predicate()'s first true value. Its timeout is a guard against a
hang, not an expectation of speed: generous by default (GUARD_S), and its failure message
names what was awaited. `children=` fails early, with their output, when a child process
that the awaited thing depends on exits; `poll=` runs between two checks (Qt's
processEvents, or a step of a test's simulated clock).
"""

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
import threading
import time
from typing import Any

import pytest

# Long enough for a 2-core CI machine running other tests besides; a passing wait returns
# as soon as its condition holds, so only a failing test ever waits this long.
GUARD_S = 60.0
# How often a condition that no callback of the session changes (a child's output, a file)
# is checked again.
RECHECK_S = 0.02
# Output of an exited child shown in a failure message (its end: the error is usually there).
OUTPUT_TAIL = 8000


class CallbackError(AssertionError):
    """A callback on the session's executor raised; the original is the __cause__."""


def _describe_exit(children: Iterable[Any]) -> str | None:
    for child in children:
        if child.process.poll() is not None:
            child.finish(timeout=5.0)  # read its output to the end
            return (f'{child.process.args[:3]} exited with {child.process.returncode}; '
                    f'output:\n{child.output[-OUTPUT_TAIL:]}')
    return None


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = GUARD_S, *,
             poll: Callable[[], Any] | None = None, children: Iterable[Any] = (),
             detail: Callable[[], str] | None = None, every: float = RECHECK_S,
             _pause: Callable[[float], None] | None = None) -> Any:
    """Return predicate()'s first true value; fail naming `what` after `timeout` seconds.

    children: ros_helpers.Child processes; when one exits first, the wait fails at once
    with its output (the predicate is checked once more after its output was read).
    poll: called between two checks. detail: its text is added to a failure message.
    every: the longest pause between two checks (seconds); raise it for a costly predicate.
    """
    children = list(children)
    pause = _pause or time.sleep
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        exited = _describe_exit(children)
        if exited is not None:
            value = predicate()
            if value:
                return value
            problem = f'{what}: not reached before {exited}'
            break
        if time.monotonic() > deadline:
            problem = f'{what}: not reached within {timeout:g} s'
            break
        if poll is not None:
            poll()
        pause(every)
    if detail is not None:
        problem += f'\n{detail()}'
    raise AssertionError(problem)


class RosSession:
    """An rclpy Context with an executor spinning in the background (see the module doc)."""

    def __init__(self) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.signals import SignalHandlerOptions

        self.context = rclpy.Context()
        # No rclpy signal handlers: Ctrl-C stays pytest's. The root conftest.py has forced
        # ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST before this.
        rclpy.init(context=self.context, signal_handler_options=SignalHandlerOptions.NO)
        self.executor = SingleThreadedExecutor(context=self.context)
        self._nodes: list[Any] = []
        self._error: BaseException | None = None
        self._error_reported = False
        # One condition for the spin loop: notified after every spin, so waits re-check at
        # once; `_held` keeps the loop out of the executor while nodes are removed.
        self._gate = threading.Condition()
        self._held = 0
        self._spinning = False
        self._stop = False
        self._thread = threading.Thread(target=self._spin, name='ros_fixture_spin',
                                        daemon=True)
        self._thread.start()

    # Spinning -------------------------------------------------------------------------------

    def _spin(self) -> None:
        # spin_once in a loop, stopped by a flag: shutting the executor down from another
        # thread while it waits races with its wait set.
        while True:
            with self._gate:
                while self._held and not self._stop:
                    self._gate.wait()
                if self._stop:
                    return
                self._spinning = True
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except BaseException as exc:  # noqa: B036 - reported to the test, not swallowed
                with self._gate:
                    self._error = exc
                    self._spinning = False
                    self._gate.notify_all()
                return
            with self._gate:
                self._spinning = False
                self._gate.notify_all()

    @contextmanager
    def _paused(self) -> Iterator[None]:
        with self._gate:
            self._held += 1
            while self._spinning:
                self._gate.wait()
        try:
            yield
        finally:
            with self._gate:
                self._held -= 1
                self._gate.notify_all()

    def _raise_callback_error(self) -> None:
        if self._error is not None and not self._error_reported:
            self._error_reported = True
            raise CallbackError(f'a callback raised: {self._error!r}') from self._error

    def _pause(self, seconds: float, wake: bool = True) -> None:
        # With `wake`, the next spin ends the pause: what callbacks change is seen at once.
        self._raise_callback_error()
        deadline = time.monotonic() + seconds
        with self._gate:
            while (remaining := deadline - time.monotonic()) > 0:
                self._gate.wait(remaining)
                if wake or self._error is not None:
                    break
        self._raise_callback_error()

    # Nodes ----------------------------------------------------------------------------------

    def create_node(self, name: str, **kwargs: Any) -> Any:
        """Create a node on this session's context and spin it until teardown."""
        import rclpy
        return self.add_node(rclpy.create_node(name, context=self.context, **kwargs))

    def add_node(self, node: Any) -> Any:
        """Spin `node` (made on this session's context) and destroy it at teardown."""
        if node.context is not self.context:
            raise ValueError(f'node {node.get_name()!r} was made on another context: pass '
                             'context=ros.context to its constructor')
        self.executor.add_node(node)
        self._nodes.append(node)
        return node

    def remove_node(self, node: Any) -> None:
        """Stop spinning `node` and destroy it now (close its adapter first)."""
        with self._paused():
            self.executor.remove_node(node)
            if node in self._nodes:
                self._nodes.remove(node)
            node.destroy_node()

    # Waiting --------------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], Any], what: str, timeout: float = GUARD_S, *,
                 poll: Callable[[], Any] | None = None, children: Iterable[Any] = (),
                 detail: Callable[[], str] | None = None, every: float = RECHECK_S) -> Any:
        """Return predicate()'s first true value while the executor spins (see wait_for)."""
        self._raise_callback_error()
        wake = every <= RECHECK_S  # a costly predicate is not checked on every spin
        return wait_for(predicate, what, timeout, poll=poll, children=children,
                        detail=detail, every=every,
                        _pause=lambda seconds: self._pause(seconds, wake))

    def spin_for(self, seconds: float, *, poll: Callable[[], Any] | None = None) -> None:
        """Let the executor run for `seconds`: only for checks that something does NOT happen.

        Waiting for something that should happen is wait_for's job.
        """
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if poll is not None:
                poll()
            self._pause(min(remaining, RECHECK_S))

    def call(self, client: Any, request: Any, what: str | None = None,
             timeout: float = GUARD_S, *, poll: Callable[[], Any] | None = None) -> Any:
        """Call a service once it is available; return the response (None: call failed)."""
        name = what or client.srv_name
        self.wait_for(client.service_is_ready, f'service {name} available', timeout,
                      poll=poll)
        future = client.call_async(request)
        self.wait_for(future.done, f'an answer of service {name}', timeout, poll=poll)
        return future.result()

    # Teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop spinning, then shut the executor down, destroy the nodes, end the context."""
        with self._gate:
            self._stop = True
            self._gate.notify_all()
        self._thread.join(timeout=10.0)
        self.executor.shutdown(timeout_sec=5.0)
        for node in reversed(self._nodes):
            node.destroy_node()
        self._nodes = []
        self.context.try_shutdown()
        self._raise_callback_error()


@contextmanager
def _session() -> Iterator[RosSession]:
    pytest.importorskip('rclpy')  # a plain Python without the ROS wheels skips these tests
    session = RosSession()
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def ros() -> Iterator[RosSession]:
    """Yield an rclpy context and a spinning executor for one test (see the module doc)."""
    with _session() as session:
        yield session


@pytest.fixture(scope='module')
def ros_module() -> Iterator[RosSession]:
    """Yield a `ros` session shared by the tests of one module (for slow-starting nodes)."""
    with _session() as session:
        yield session
