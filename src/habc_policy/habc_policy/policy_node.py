"""policy_node: VLA inference on the newest observation, chunk execution, verified hot swap.

Topics (see docs/ros_interfaces.md):
  subscribes  `observation` (habc_msgs/Observation, SENSOR_DATA)
              `intervention` (habc_msgs/InterventionState, COMMANDS)
              `policy/update` (habc_msgs/PolicyUpdate, LATCHED)
  publishes   `policy/joint_command` (habc_msgs/PolicyCommand, COMMANDS): on every control
                  tick that has an action due, stamped with the tick time, with the version
                  and chunk id of the chunk the action comes from
              `policy/chunk` (habc_msgs/ActionChunk, COMMANDS): every chunk the executor
                  accepted, stamped with its observation's stamp
              `policy/status` (std_msgs/String JSON, LATCHED): active and staged version, the
                  last load result and why, on every change

Threads: the control tick runs on a ControlLoop thread of its own (absolute deadlines on
the steady clock; an rclpy timer under simulated time), inference on an InferenceWorker
thread and weight loading on a loader thread, so none of them ever blocks a control tick;
one executor thread runs the callbacks. Inference starts on the newest observation when the
InferenceScheduler says so (just in time for the end of the queued plan), or when
ChunkExecutor.needs_inference does with schedule_inference false.

Start-up weights: the `checkpoint` parameter; left empty (and no weights_uri), the newest SFT
checkpoint `habc demo` trained (habc_common.checkpoints: runs/demo/sft in the current folder
or in $HABC_ROOT). With none, the node holds: no commands, `waiting` on policy/status says
why (logged once), and it looks again every second until one appears there, a PolicyUpdate
arrives or weights_uri is set, whichever comes first.

Intervention: while a human drives (InterventionState.source == SOURCE_HUMAN), and while the
arbiter holds because no episode runs (SOURCE_HOLD, reason 'idle'), no inference runs and no
command is published. When control leaves the human, the robot leaves an e-stop hold or an
episode starts, the executor is cleared at the switch's stamp, so the policy re-plans from the
state the human, the stop or the reset left. A HOLD for any other reason does not pause the policy:
the arbiter holds while the policy's command is stale (at start-up, say), and it is this
node's commands that end such a hold.
"""

import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
import json
import math
import threading
import time

from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.context import Context
from rclpy.node import Node
from std_msgs.msg import String

from habc_common import checkpoints
from habc_common.control_loop import compute_threads, normal_thread_scheduling
from habc_common.node_main import spin_node, start_control_tick
from habc_common.params import declare_node_parameters
from habc_common.qos import COMMANDS, LATCHED, LATCHED_EVENTS, SENSOR_DATA
from habc_common.update_trust import UpdateGate
from habc_episodes.vocabulary import PolicyVersion
from habc_msgs.msg import (
    ActionChunk,
    HelpRequest,
    InterventionState,
    Observation,
    PolicyCommand,
    PolicyUpdate,
)
from habc_policy.chunk_executor import ChunkExecutor
from habc_policy.help_request import help_params, HelpEvent, HelpMonitor, RAISED
from habc_policy.inference_schedule import InferenceScheduler, swap_now
from habc_policy.policy_runtime import (
    ChunkResult,
    InferenceWorker,
    is_sha256,
    LoadedPolicy,
    observation_from_msg,
    PolicyNodeParams,
    PolicyRuntime,
    resolve_checkpoint_dir,
    WeightsError,
)

PARAMS = PolicyNodeParams
# How often a node started without weights looks for a `habc demo` checkpoint (s).
SEARCH_PERIOD_S = 1.0


class PolicyNode:
    """Thin rclpy adapter over PolicyRuntime, InferenceWorker and ChunkExecutor."""

    def __init__(self, namespace: str = '', parameter_overrides: list | None = None,
                 context: Context | None = None) -> None:
        # context: an rclpy Context other than the default one (tests run their own).
        self.node = Node('policy', namespace=namespace, context=context,
                         parameter_overrides=parameter_overrides or [])
        self.params = declare_node_parameters(self.node, PolicyNodeParams)
        self.log = self.node.get_logger()
        import torch
        torch.set_num_threads(compute_threads(self.params.torch_threads))
        self.executor = ChunkExecutor(self.params.executor_params())
        gate = UpdateGate.of(self.params.trusted_keys, self.params.checkpoint_roots,
                             self.params.policy_name, self.params.require_signed_updates)
        self.runtime = PolicyRuntime(self.executor, self.params.control_period_s, gate,
                                     self.params.device, self.params.joint_names,
                                     clock=self._executor_now,
                                     realtime_chunking=self.params.realtime_chunking,
                                     max_guidance=self.params.rtc_max_guidance)
        # Just-in-time inference starts (receding mode); the thresholds otherwise.
        self.scheduler: InferenceScheduler | None = None
        if self.params.schedule_inference and self.params.mode == 'receding':
            self.scheduler = InferenceScheduler(self.params.inference_margin_s,
                                                self.params.latency_window)
        self._schedule_lock = threading.Lock()
        # Per-chunk timing, for policy/status: chunks, actions skipped, chunks that came late.
        self.chunk_timing = {'chunks': 0, 'skipped_steps': 0, 'late_chunks': 0}
        if not gate.require_signature:
            self.log.warning('require_signed_updates is false: any process on the DDS domain '
                             'can change the policy that drives the robot')
        self._paused = False
        self.loop = None  # the control tick's ControlLoop, started at the end
        # Seamless swaps: control ticks without an action before each version's first one,
        # and whether the first inference of newly swapped weights is still to start.
        self._empty_ticks = 0
        self._first_of_version = False
        self._swap_deferrals = 0
        self._last_action_version: PolicyVersion | None = None
        self._swap_gap_ticks: dict[str, int] = {}
        self._last_source: tuple[int, str] | None = None
        self._not_before = -math.inf
        self._command_names: list[str] = []
        self._last_error = ''
        self._closed = False
        # Stamp of the newest observation, and control ticks skipped for want of a fresh one.
        self._newest_observation = -math.inf
        self.blind_ticks = 0
        # Started without weights: why it holds, and the search for a `habc demo` checkpoint.
        self._waiting = ''
        self._watch: checkpoints.CheckpointWatch | None = None
        self._search_queued = False
        self._search_timer = None

        self.command_publisher = self.node.create_publisher(PolicyCommand,
                                                            'policy/joint_command', COMMANDS)
        self.chunk_publisher = self.node.create_publisher(ActionChunk, 'policy/chunk', COMMANDS)
        self.status_publisher = self.node.create_publisher(String, 'policy/status', LATCHED)
        # Help requests from the critic's live viability (habc_policy.help_request); the
        # monitor is used under its lock from the inference and the executor threads.
        self.help_publisher = self.node.create_publisher(HelpRequest, 'help_request',
                                                         LATCHED_EVENTS)
        self.help = HelpMonitor(help_params(self.params))
        self._help_source = 'parameter'   # or the active checkpoint's calibration
        self._help_lock = threading.Lock()
        self._help_version: PolicyVersion | None = None

        if self.params.checkpoint:
            try:
                loaded = self.runtime.load_startup(self.params.checkpoint,
                                                   self.params.expected_sha256)
            except WeightsError as exc:
                raise ValueError(f'parameter checkpoint: {exc}') from exc
            self.log.info(f'checkpoint {loaded.source} loaded as version {loaded.version} '
                          f'(sha256 {loaded.sha256[:12]})')
        elif not self.params.weights_uri:
            self._watch = checkpoints.CheckpointWatch()
            found = self._watch.poll()
            if found is not None:
                try:
                    loaded = self.runtime.load_startup(str(found))
                except WeightsError as exc:  # not the user's choice: hold, do not exit
                    self.runtime.record_rejection(str(found), '', str(exc))
                    self.log.error(f'checkpoint {found} (found) rejected: {exc}')
                else:
                    self.log.info(f'checkpoint is empty: loaded {found}, the newest `habc '
                                  f'demo` checkpoint, as version {loaded.version} (sha256 '
                                  f'{loaded.sha256[:12]})')
            if self.runtime.active is None:
                self._waiting = (
                    'no policy checkpoint: checkpoint is empty and no usable `habc demo` '
                    f'checkpoint is in {checkpoints.describe_search(self._watch.folders)}; '
                    'holding (no commands) until one appears there, a PolicyUpdate arrives '
                    'or weights_uri is set')
                self.log.warning(self._waiting)

        self.worker = InferenceWorker(self.runtime, self._on_chunk, self._on_inference_error,
                                      self._on_swap, self._swap_allowed)
        self.worker.start()
        # One loader thread: updates are verified in arrival order, never concurrently.
        # Started lazily, maybe by a real-time executor thread: it loads on normal scheduling.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix='policy_loader',
                                          initializer=normal_thread_scheduling)

        inputs = MutuallyExclusiveCallbackGroup()
        control = MutuallyExclusiveCallbackGroup()
        self.node.create_subscription(Observation, 'observation', self.observation_callback,
                                      SENSOR_DATA, callback_group=inputs)
        self.node.create_subscription(InterventionState, 'intervention',
                                      self.intervention_callback, COMMANDS,
                                      callback_group=inputs)
        self.node.create_subscription(PolicyUpdate, 'policy/update', self.update_callback,
                                      LATCHED, callback_group=inputs)
        if self._waiting:
            # Wall time (steady), also under simulated time: it watches files, not the robot.
            self._search_timer = self.node.create_timer(
                SEARCH_PERIOD_S, self._search_callback, callback_group=inputs,
                clock=Clock(clock_type=ClockType.STEADY_TIME))
        self.node.add_on_set_parameters_callback(self._check_parameters)
        self.node.add_post_set_parameters_callback(self._parameters_set)

        if self.params.weights_uri:
            self._submit_weights_uri(self.params.weights_uri, self.params.expected_sha256,
                                     self.params.weights_signature)
        self.publish_status()
        active = self.runtime.active
        self.log.info(
            f'ready: {self.params.mode} at {self.params.control_rate_hz:g} Hz, '
            + (f'version {active.version}' if active else 'waiting for weights'))
        # The control tick, started last: on a thread of its own on absolute steady-clock
        # deadlines, or on an rclpy timer that follows /clock under simulated time.
        sim_time = bool(self.node.get_parameter('use_sim_time').value)
        self.loop = start_control_tick(self.node, self.params.control_period_s,
                                       self.control_callback, self.params, steady=not sim_time,
                                       callback_group=control)

    def close(self) -> None:
        """Stop the inference and loader threads (spin_node calls it at shutdown)."""
        if self._closed:
            return
        self._closed = True
        if self.loop is not None:
            self.loop.stop()
        self.worker.stop()
        self._loader.shutdown(wait=False, cancel_futures=True)

    def _now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def _executor_now(self) -> float:
        # The executor's clock: when a command published now reaches the robot.
        return self._now() + self.params.command_lead_s

    def _error_once(self, what: str, exc: Exception) -> None:
        # Log each distinct problem once: a bad observation stream would flood the log.
        message = f'{what}: {exc}'
        if message != self._last_error:
            self.log.error(message)
            self._last_error = message

    # Inputs -----------------------------------------------------------------------------

    def observation_callback(self, msg: Observation) -> None:
        try:
            observation = observation_from_msg(msg)
        except ValueError as exc:
            self._error_once('observation ignored', exc)
            return
        # An unstamped observation (stamp 0) counts as fresh when it arrives.
        fresh = observation.stamp if observation.stamp > 0 else self._now()
        self._newest_observation = max(self._newest_observation, fresh)
        self.worker.offer(observation)
        self._maybe_infer(self._executor_now(), observation_stamp=fresh)

    def intervention_callback(self, msg: InterventionState) -> None:
        source, reason = msg.source, msg.reason
        previous, self._last_source = self._last_source, (source, reason)
        if source == InterventionState.SOURCE_HUMAN and not self._paused:
            stamp = msg.header.stamp
            with self._help_lock:
                event = self.help.on_takeover(stamp.sec + stamp.nanosec * 1e-9)
            self._publish_help(event)
        idle = source == InterventionState.SOURCE_HOLD and reason == 'idle'
        if idle and previous != self._last_source:
            # The episode is over: a request still open belongs to it, not to the next one.
            stamp = msg.header.stamp
            with self._help_lock:
                event = self.help.reset(stamp.sec + stamp.nanosec * 1e-9)
            self._publish_help(event)
        if source == InterventionState.SOURCE_HUMAN or idle:
            if not self._paused:
                self.log.info('human in control: inference paused' if reason != 'idle'
                              else 'no episode running: inference paused')
            self._paused = True
            return
        estop_ended = (previous is not None and previous[0] == InterventionState.SOURCE_HOLD
                       and previous[1] == 'estop' and reason != 'estop')
        if self._paused or estop_ended:
            stamp = msg.header.stamp
            switch = stamp.sec + stamp.nanosec * 1e-9 if stamp.sec or stamp.nanosec \
                else self._now()
            # Bumpless handback: drop the queue and every chunk planned before the switch.
            self.executor.clear(switch)
            self._not_before = switch
            what = ('e-stop released' if not self._paused
                    else 'episode started' if previous is not None and previous[1] == 'idle'
                    else 'handback')
            self.log.info(f'{what}: queue cleared, re-planning from the current state')
        self._paused = False

    def update_callback(self, msg: PolicyUpdate) -> None:
        version, sha256, uri, fmt = msg.version, msg.sha256, msg.uri, msg.format
        data, signature = bytes(msg.data), bytes(msg.signature)
        name, signer, companions = msg.policy_name, msg.key_id, msg.companions_sha256
        self.log.info(f'policy update {version} received ({uri or f"{len(data)} bytes inline"})'
                      ': verifying')
        self._loader.submit(self._load, f'policy update {version}',
                            lambda: self.runtime.offer_update(version, sha256, uri, data, fmt,
                                                              name, signer, signature,
                                                              companions))

    def _check_parameters(self, parameters: list) -> SetParametersResult:
        # Cheap checks answer `ros2 param set` at once; hashing and loading run afterwards.
        for parameter in parameters:
            if parameter.name == 'weights_uri' and parameter.value:
                try:
                    resolve_checkpoint_dir(parameter.value)
                except WeightsError as exc:
                    return SetParametersResult(successful=False, reason=str(exc))
            if (parameter.name == 'expected_sha256' and parameter.value
                    and not is_sha256(parameter.value)):
                return SetParametersResult(successful=False,
                                           reason='expected_sha256 must be 64 hex digits')
        return SetParametersResult(successful=True)

    def _parameters_set(self, parameters: list) -> None:
        values = {parameter.name: parameter.value for parameter in parameters}
        if values.get('weights_uri'):
            current = {name: values.get(name, self.node.get_parameter(name).value)
                       for name in ('expected_sha256', 'weights_signature')}
            self._submit_weights_uri(values['weights_uri'], current['expected_sha256'],
                                     current['weights_signature'])

    def _submit_weights_uri(self, uri: str, sha256: str, signature: str) -> None:
        self.log.info(f'weights_uri {uri}: verifying')
        self._loader.submit(self._load, f'weights_uri {uri}',
                            lambda: self.runtime.offer_weights_uri(uri, sha256, signature))

    def _load(self, what: str, load: Callable[[], LoadedPolicy]) -> None:
        # Runs on the loader thread: hashing and loading never touch the control thread.
        if self._closed:
            return
        try:
            loaded = load()
        except WeightsError as exc:
            self.log.warning(f'{what} rejected: {exc}; version '
                             f'{self.runtime.status()["active_version"]} stays active')
        except Exception as exc:  # a bug must not kill the loader thread
            self.runtime.record_rejection(what, '', f'{type(exc).__name__}: {exc}')
            self.log.error(f'{what} failed: {type(exc).__name__}: {exc}')
        else:
            self.log.info(f'{what}: verified, version {loaded.version} staged for the next '
                          'chunk boundary')
            self.worker.wake()  # an idle worker swaps at once
        if not self._closed:
            self.publish_status()

    def _search_callback(self) -> None:
        # Cheap: the search itself runs on the loader thread, in order with other loads.
        if self._closed or self._search_queued:
            return
        if self.runtime.active is not None or self.runtime.pending is not None:
            self._search_timer.cancel()
            return
        self._search_queued = True
        self._loader.submit(self._search)

    def _search(self) -> None:
        # Runs on the loader thread: after any update that was offered before it.
        self._search_queued = False
        if self._closed or self.runtime.active is not None or self.runtime.pending is not None:
            return
        found = self._watch.poll()
        if found is not None:
            self._load(f'checkpoint {found} (the newest `habc demo` checkpoint)',
                       lambda: self.runtime.offer_checkpoint(str(found)))

    # Control ----------------------------------------------------------------------------

    def _maybe_infer(self, now: float, observation_stamp: float | None = None) -> None:
        # now: executor time. observation_stamp: set when an observation has just arrived.
        if self.scheduler is not None:
            with self._schedule_lock:
                if observation_stamp is not None:
                    self.scheduler.record_observation(observation_stamp)
                    decision = self.scheduler.on_observation(now, self.executor.plan_end())
                else:
                    decision = self.scheduler.on_tick(now, self.executor.plan_end())
            start = decision.start
        else:
            start = self.executor.needs_inference(now)
        if self._paused or (self.runtime.active is None and self.runtime.pending is None):
            return
        # Staged weights swap in before the next inference. Their first inference is cold
        # (slower than the estimate), so it starts at once, while the queue still holds
        # most of the plan, not at the deadline of a warm one: the queue never runs dry.
        if start or self.runtime.pending is not None or self._first_of_version:
            self.worker.request(self._not_before)

    def control_callback(self) -> None:
        if self._paused:
            return
        limit = self.params.observation_stale_after_s
        if limit and self._newest_observation > -math.inf and \
                self._now() - self._newest_observation > limit:
            # No fresh observation (sync or cameras gone): the queued plan is not run blind.
            self.blind_ticks += 1
            return
        # The executor's clock is the time the command reaches the robot (command_lead_s).
        now = self._now() + self.params.command_lead_s
        action = self.executor.next_action(now)
        if action is None:
            self._empty_ticks += 1
        if action is not None and self._command_names:
            msg = PolicyCommand(policy_version=str(action.version), chunk_id=action.chunk_id,
                                name=self._command_names, position=action.action.tolist())
            msg.header.stamp = self.node.get_clock().now().to_msg()
            self.command_publisher.publish(msg)
            if self._last_action_version not in (None, action.version):
                # The first tick of new weights: how many control ticks went without an
                # action since the old version's last one (0 = a seamless swap).
                self._swap_gap_ticks[str(action.version)] = self._empty_ticks
                self.publish_status()
            self._last_action_version = action.version
            self._empty_ticks = 0
        self._maybe_infer(now)

    # Worker callbacks (inference thread) ------------------------------------------------

    def _on_chunk(self, result: ChunkResult) -> None:
        self._first_of_version = False
        if self.scheduler is not None:
            with self._schedule_lock:
                self.scheduler.record_latency(result.turnaround_s, result.cold)
        self._update_help(result)
        if (not result.accepted or self._paused
                or result.observation.stamp < self._not_before):
            # Planned before a handback, or finished while the human drives (an inference in
            # flight at the takeover): it never drives the robot, so it is not published.
            return
        self._command_names = list(result.joint_names)
        horizon, action_dim = result.actions.shape
        msg = ActionChunk()
        msg.header.stamp = result.observation.header_stamp
        msg.policy_version = str(result.version)
        msg.chunk_id = result.chunk_id
        msg.horizon, msg.action_dim = horizon, action_dim
        msg.joint_names = list(result.joint_names)
        msg.dt = result.dt
        # Row-major (H, D); bytes go into the array('f') field in C.
        msg.actions = array.array('f', result.actions.astype('<f4').tobytes())
        msg.skipped_steps = result.skipped
        msg.late = result.late
        msg.inference_s = float(result.latency_s)
        msg.turnaround_s = float(result.turnaround_s)
        msg.viability = float(result.viability)
        msg.efficiency_value = float(result.efficiency_value)
        self.chunk_publisher.publish(msg)
        timing = self.chunk_timing
        timing['chunks'] += 1
        timing['skipped_steps'] += result.skipped
        timing['late_chunks'] += int(msg.late)

    def _update_help(self, result: ChunkResult) -> None:
        # Inference thread: the viability of the observation this chunk was planned from,
        # judged with the settings of the weights that planned it.
        events = []
        with self._help_lock:
            if result.version != self._help_version:
                # New weights bring their own critic (or none): the history starts again.
                events += [self.help.reset(result.observation.stamp),
                           self.help.set_critic_problem(result.critic_problem)]
                self._apply_help_calibration(result)
                self._help_version = result.version
            # An observation from before a takeover or handback is not this stretch's.
            if (result.accepted and not self._paused
                    and result.observation.stamp >= self._not_before):
                events.append(self.help.update(result.observation.stamp, result.viability))
        for event in events:
            self._publish_help(event, str(result.version))

    def _apply_help_calibration(self, result: ChunkResult) -> None:
        # Under the help lock: the thresholds of the weights that planned the chunk; their
        # checkpoint's calibrated ones (habc calibrate) unless help_use_calibration is off.
        params = help_params(self.params)
        calibration = result.help_calibration
        if calibration is not None and self.params.help_use_calibration:
            self.help.params = calibration.apply(params)
            self._help_source = calibration.describe()
        else:
            self.help.params = params
            self._help_source = 'parameter'
            if result.help_calibration_problem:
                self._help_source += f' ({result.help_calibration_problem})'

    def _publish_help(self, event: HelpEvent | None, version: str = '') -> None:
        if event is None or self._closed:
            return
        msg = HelpRequest(active=event.kind == RAISED, reason=event.reason,
                          policy_version=version or str(self.executor.current_version or ''),
                          viability=float(event.p_v))
        if math.isfinite(event.stamp):
            msg.header.stamp.sec = int(event.stamp)
            msg.header.stamp.nanosec = int(round((event.stamp % 1.0) * 1e9)) % 1_000_000_000
        msg.trace_stamps = [t for t, _ in event.trace]
        msg.trace_viability = [float(v) for _, v in event.trace]
        self.help_publisher.publish(msg)
        if msg.active:
            self.log.warning(f'help requested: {event.reason}, p_v {event.p_v:.2f}')
        else:
            self.log.info(f'help request cleared: {event.reason}')
        self.publish_status()

    def _on_inference_error(self, exc: Exception) -> None:
        if isinstance(exc, WeightsError):
            # The active version does not fit the robot (its first observation showed it),
            # or it produced NaN / inf actions (back to the previous version, or hold):
            # policy/status says why.
            what = 'policy'
            if f'{what}: {exc}' != self._last_error:
                self.publish_status()
            self._error_once(what, exc)
            return
        self._error_once('inference failed', exc)

    def _swap_allowed(self, staged: LoadedPolicy) -> bool:
        # Inference thread, before an inference (inference_schedule.swap_now): swap while the
        # queued plan covers the new weights' first inference, else let the old weights
        # refill the queue first (the next inference is requested at once while weights are
        # staged), at most max_swap_deferrals times.
        plan_end = self.executor.plan_end()
        left = None if plan_end is None else plan_end - self._executor_now()
        needed = staged.warmup_s if math.isfinite(staged.warmup_s) else 0.0
        if self.scheduler is not None:
            with self._schedule_lock:
                needed = max(needed, self.scheduler.latency_s or 0.0)
        if swap_now(left, needed, self.params.inference_margin_s, self._swap_deferrals):
            self._swap_deferrals = 0
            return True
        self._swap_deferrals += 1
        return False

    def _on_swap(self, loaded: LoadedPolicy) -> None:
        self._first_of_version = True
        self.log.info(f'swapped to version {loaded.version} (sha256 {loaded.sha256[:12]}, '
                      f'{loaded.source})')
        self.publish_status()

    def publish_status(self) -> None:
        """Publish the runtime status as JSON on the latched policy/status."""
        status = self.runtime.status()
        executing = self.executor.current_version
        status['executing_version'] = None if executing is None else str(executing)
        status['swap_gap_ticks'] = dict(self._swap_gap_ticks)
        status['paused'] = self._paused
        status['blind_ticks'] = self.blind_ticks
        status['chunk_timing'] = dict(self.chunk_timing)
        with self._help_lock:
            request = self.help.request
            status['help'] = {'requested': request is not None,
                              'reason': None if request is None else request.reason,
                              'since': None if request is None else request.stamp,
                              'critic_problem': self.help.critic_problem or None,
                              'threshold': self.help.params.help_threshold,
                              'threshold_source': self._help_source}
        if self.scheduler is not None:
            with self._schedule_lock:
                status['inference_turnaround_s'] = self.scheduler.latency_s
                status['inference_turnaround_p50_s'] = self.scheduler.latency_quantile(0.5)
        # Why the node holds without weights (None once it has some).
        status['waiting'] = (self._waiting or None) if self.runtime.active is None else None
        status['stamp'] = time.time()
        self.status_publisher.publish(String(data=json.dumps(status)))


def main(args: list[str] | None = None) -> None:
    """Run policy_node until shutdown."""
    # One executor thread (spin_node): the control tick, the inference and the loading have
    # threads of their own.
    spin_node(PolicyNode, args, realtime_executor=True)
