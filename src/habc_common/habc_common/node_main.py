"""The shared `main()` of every habc node: project env defaults, init, spin, clean exit."""

from collections.abc import Callable
import signal
import sys
from typing import Any

from habc_common.control_loop import (
    apply_thread_scheduling,
    ControlLoop,
    ControlThreadParams,
    normal_thread_scheduling,
)
from habc_common.ros_env import apply_project_defaults

# The signals that ask a node to stop: Ctrl-C, and the launchers' escalation after it.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How long the executor waits for work before it looks at a stop request again: the most a
# stop waits while the node is idle (a signal does not wake rcl_wait).
STOP_POLL_S = 0.1


class StopRequest:
    """SIGINT and SIGTERM, handled by Python in the main thread, which also spins the node.

    rclpy's own handler is not used (SignalHandlerOptions.NO). Its signal thread triggers
    the executors' guard conditions through a list that the main thread frees as the
    executor shuts down, with no lock between them: on a loaded machine the thread read
    the freed list and crashed the node with SIGSEGV in rcl_trigger_guard_condition (rclpy
    7.1, seen under `habc launch` in CI and reproduced with a core dump). Here one thread
    does both, so the executor is torn down only after the signal has been handled.

    starting: a signal abandons the start-up (KeyboardInterrupt), as Python would.
    spinning: the first signal ends the spin after the running callback, so it finishes
        what it writes; a second one (the launcher escalating) interrupts that callback.
    closing: signals are noted only; the node's close() (an episode being written out)
        runs to its end, and SIGKILL stays the last resort.
    """

    def __init__(self) -> None:
        self.phase = 'starting'
        self.signals: list[int] = []
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        """Give the signals back: a process that hangs on its way out still dies of them."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return bool(self.signals)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)
        if self.phase == 'starting' or (self.phase == 'spinning' and len(self.signals) > 1):
            raise KeyboardInterrupt


def spin_node(factory: Callable[[], Any], args: list[str] | None = None, *,
              realtime_executor: bool = False) -> None:
    """Create the node adapter from `factory` and spin it until a stop signal or shutdown.

    `factory()` returns an object with a `.node` attribute (the rclpy Node). A ValueError
    raised while it starts (an invalid parameter, say) ends the process with exit code 2 and
    one clear line, instead of a traceback. SIGINT and SIGTERM stop the node as StopRequest
    describes; a node may also end itself by shutting its context down.

    One SingleThreadedExecutor thread runs every node's callbacks; work that must not wait
    behind them (control ticks, inference, loading) runs on threads of its own. rclpy's
    (Jazzy) MultiThreadedExecutor is not used: it left ready callbacks of a mutually
    exclusive group waiting for up to 1.5 s (the scripted operator's 20 Hz timer and its
    subscriptions, until another group's message woke it), and it kept a core 97 % busy
    while such a group was busy (the policy node).

    realtime_executor: a node whose control tick runs under SCHED_FIFO (its parameter
    realtime_priority, p) spins its executor at priority max(1, p - 1), so the callbacks that
    feed the tick, and hold the interpreter lock while they run, are not preempted by
    ordinary processes (a tick that waits for the lock held by a preempted thread waits with
    it). Applied here, in the node's own process, never to a process that hosts nodes in
    tests. The thread goes back to normal scheduling to shut down: that is no real-time work,
    and it must not starve the DDS threads it waits for.
    """
    apply_project_defaults()  # before rclpy.init: the RMW reads the environment there
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    stop = StopRequest()
    stop.install()
    adapter = None
    executor = None
    code = 0
    try:
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
        adapter = factory()
        priority = getattr(getattr(adapter, 'params', None), 'realtime_priority', 0)
        if realtime_executor and priority:
            report = apply_thread_scheduling(max(1, priority - 1))
            log = adapter.node.get_logger()
            (log.warning if report.refused else log.info)(f'executor thread: {report.text()}')
        executor = SingleThreadedExecutor()
        executor.add_node(adapter.node)
        stop.phase = 'spinning'
        while not stop.requested and rclpy.ok():
            executor.spin_once(timeout_sec=STOP_POLL_S)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ValueError as exc:
        print(f'[{getattr(factory, "__name__", "node")}] invalid configuration: {exc}',
              file=sys.stderr)
        code = 2
    finally:
        stop.phase = 'closing'
        normal_thread_scheduling()
        if executor is not None:
            # Let the executor's worker threads finish their callbacks before the node is
            # destroyed under them (a rare hang on Ctrl-C was seen without this).
            executor.shutdown(timeout_sec=2.0)
        if adapter is not None:
            close = getattr(adapter, 'close', None)
            if close is not None:
                close()
            adapter.node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
        stop.uninstall()
    if code:
        sys.exit(code)


def start_control_tick(node: Any, period_s: float, tick: Callable[[], Any],
                       params: ControlThreadParams, *, steady: bool,
                       callback_group: Any = None) -> ControlLoop | None:
    """Run `tick()` every `period_s` for `node`: on a ControlLoop thread, or on the executor.

    steady: the tick follows the steady clock, and runs on a ControlLoop (absolute deadlines,
    its own thread, the scheduling of `params`); the loop stops when the node is destroyed.
    Otherwise (a node on simulated time) an rclpy timer on the node's clock runs it, so the
    tick follows /clock. Returns the loop, or None for the timer.
    """
    if not steady:
        node.create_timer(period_s, tick, callback_group=callback_group)
        return None
    log = node.get_logger()
    loop: ControlLoop | None = None

    def on_error(exc: Exception) -> None:
        if not node.context.ok():
            loop.stop()  # shutdown under a running tick: nothing left to publish to
            return
        log.error(f'control tick failed: {type(exc).__name__}: {exc}',
                  throttle_duration_sec=5.0)

    loop = ControlLoop(period_s, lambda deadline: tick(), name=f'{node.get_name()}_tick',
                       realtime_priority=params.realtime_priority,
                       cpu_affinity=params.cpu_affinity, on_error=on_error)
    destroy = node.destroy_node

    def destroy_node() -> None:
        loop.stop()  # before the publishers the tick uses are gone
        destroy()
    node.destroy_node = destroy_node
    report = loop.start()
    text = (f'control tick on its own thread every {period_s * 1e3:g} ms (absolute '
            f'deadlines, steady clock): {report.text()}')
    (log.warning if report.refused else log.info)(text)
    return loop
