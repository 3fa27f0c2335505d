"""One simulated episode driven by a policy, watched by the scripted operator (no rclpy).

The policy predicts chunks of H actions; the runner executes the first `execute_steps` of
each chunk, then asks again (receding horizon). On every step the operator decides who
controls: when it takes over, the scripted expert replans from the current state and drives
until the operator hands back or the episode ends. Every executed action is recorded with
the controller that produced it, which is what credit assignment needs.

With `inference_delay_steps` d > 0 the runner plays the ROS loop's timing instead, with the
policy node's own ChunkExecutor: an inference starts on the current observation when the
executor asks for one, its chunk arrives d steps later, the actions whose ticks passed
meanwhile are dropped, and the robot holds its last command while nothing is due. This
measures what inference latency costs a policy, offline.

With a `viability` function (the checkpoint's critic) the runner records p_v at each
inference, as the policy node does, and with `RunnerConfig.help` it runs the node's
HelpMonitor on it: the operator sees whether a help request is open at each step (what an
on-request operator watches), a takeover answers it, and the summary lists the requests.
"""

from collections.abc import Callable
from dataclasses import dataclass
import time

import numpy as np

from habc_episodes.episode import Episode
from habc_episodes.vocabulary import Controller, EpisodeKind, Outcome, STARTUP_VERSION
from habc_policy.chunk_executor import ChunkExecutor, ChunkExecutorParams
from habc_policy.help_request import HelpMonitor, HelpRequestParams, RAISED
from habc_sim.aloha import AlohaEnv, DT, policy_observation
from habc_sim.expert import ExpertConfig, ScriptedExpert
from habc_sim.operator import ScriptedOperator

PolicyFn = Callable[[dict], np.ndarray]
ViabilityFn = Callable[[dict], float]    # p_v of one policy observation


@dataclass(frozen=True)
class RunnerConfig:
    """How a policy episode is executed and recorded."""

    track: str = 'state'          # 'state': joints + object positions; 'pixels': + images
    execute_steps: int = 10       # actions executed per chunk before the next inference
    policy_version: str = ''
    inference_delay_steps: int = 0  # 0: synchronous; d: chunks land d control steps late
    min_remaining_steps: int = 5    # with a delay: infer when fewer queued actions lie ahead
    latency_trigger: bool = True    # with a delay: the node's latency-aware trigger
    actuation_delay_steps: int = 0  # each action reaches the robot this many steps late
    help: HelpRequestParams | None = None  # with a viability function: raise help requests

    def __post_init__(self) -> None:
        if self.track not in ('state', 'pixels'):
            raise ValueError(f"track must be 'state' or 'pixels', got {self.track!r}")
        if self.execute_steps < 1:
            raise ValueError('execute_steps must be >= 1')
        if (self.inference_delay_steps < 0 or self.min_remaining_steps < 1
                or self.actuation_delay_steps < 0):
            raise ValueError('inference_delay_steps and actuation_delay_steps must be >= 0, '
                             'min_remaining_steps >= 1')


class DelayedChunks:
    """The policy node's chunk timing, in control steps, over its own ChunkExecutor.

    The observation of step s is stamped s * period; a chunk planned from it lands `delay`
    steps later, and the action of step s is the one the executor returns at (s + 1) * period
    (the tick after the observation, as in the node).
    """

    def __init__(self, execute_steps: int, delay: int, min_remaining: int,
                 latency_trigger: bool = True, period: float = 0.02) -> None:
        self.delay, self.period = delay, period
        self.executor = ChunkExecutor(ChunkExecutorParams(
            control_period_s=period, execute_steps=execute_steps, stale_after_s=0.75 * period,
            min_remaining_steps=min_remaining, latency_trigger=latency_trigger))
        self.pending: tuple[int, int, np.ndarray] | None = None  # (arrival, obs step, chunk)
        self._chunk_id = 0
        self.hold_steps = 0

    @property
    def stale_dropped(self) -> int:
        return self.executor.counters['stale_dropped']

    def clear(self, step: int) -> None:
        """Forget queued and in-flight chunks (a human took over at `step`)."""
        self.pending = None
        self.executor.clear((step + 1) * self.period)

    def action(self, step: int, infer: Callable[[], np.ndarray]) -> np.ndarray | None:
        """Return the action of `step` (None: hold), starting inferences as the node does."""
        self._land(step)
        # The node checks after its previous tick (at step * period) and infers on the
        # newest observation, this step's.
        if self.pending is None and self.executor.needs_inference(step * self.period):
            self.pending = (step + self.delay, step, infer())
            self._land(step)
        scheduled = self.executor.next_action((step + 1) * self.period)
        if scheduled is None:
            self.hold_steps += 1
            return None
        return scheduled.action

    def _land(self, step: int) -> None:
        if self.pending is None or self.pending[0] > step:
            return
        _, observed, chunk = self.pending
        self.pending = None
        self._chunk_id += 1
        self.executor.add_chunk(chunk, (observed + 1) * self.period, self.period,
                                STARTUP_VERSION, self._chunk_id)


def run_policy_episode(env: AlohaEnv, seed: int, policy: PolicyFn,
                       operator: ScriptedOperator | None = None,
                       config: RunnerConfig = RunnerConfig(),
                       expert_config: ExpertConfig | None = None,
                       viability: ViabilityFn | None = None) -> tuple[Episode, dict]:
    """Roll out `policy` from `seed`; return the recorded Episode and a summary.

    With `viability` the summary carries 'viability' [(step, p_v)] at each inference and,
    with config.help, 'help_events' [(step, 'raised'|'cleared', reason)].
    """
    render_before = env.render_seconds
    inference_s = sim_s = 0.0
    observation = env.reset(seed)
    expert = ScriptedExpert(env, expert_config or ExpertConfig(), seed)
    expert.reset()
    if operator is not None:
        operator.reset(env.privileged())
    queue: list[np.ndarray] = []
    delayed = (DelayedChunks(config.execute_steps, config.inference_delay_steps,
                             config.min_remaining_steps, config.latency_trigger)
               if config.inference_delay_steps else None)
    last_action: np.ndarray | None = None
    # Commands on their way to the robot (actuation delay): it holds its reset pose first.
    in_flight = [np.asarray(observation['state'], dtype=np.float64)] * config.actuation_delay_steps

    monitor = HelpMonitor(config.help) if config.help and viability is not None else None
    viability_trace: list[tuple[int, float]] = []
    help_events: list[tuple[int, str, str]] = []

    def record_help(event) -> None:
        if event is not None:
            help_events.append((env.steps, event.kind, event.reason))

    def timed_policy(seen: dict) -> np.ndarray:
        nonlocal inference_s
        start = time.perf_counter()
        chunk = _checked(policy(seen))
        inference_s += time.perf_counter() - start
        if viability is not None:
            p_v = float(viability(seen))
            viability_trace.append((env.steps, p_v))
            if monitor is not None:
                record_help(monitor.update(env.steps * DT, p_v))
        return chunk

    observations: dict[str, list] = {}
    actions, controllers = [], []
    while True:
        controller = Controller.POLICY
        if operator is not None:
            requested = monitor is not None and monitor.requested
            controller, took_over = operator.step(env.steps, env.privileged(), requested)
            if took_over:
                expert.replan()
                if monitor is not None:
                    record_help(monitor.on_takeover(env.steps * DT))
        seen = policy_observation(observation, config.track)
        if controller == Controller.HUMAN:
            action = expert.act()
            queue = []  # the policy restarts from the state the human leaves behind
            if delayed is not None:
                delayed.clear(env.steps)
        elif delayed is not None:
            action = delayed.action(env.steps, lambda seen=seen: timed_policy(seen))
            if action is None:  # nothing due: the arbiter holds the last command
                action = last_action if last_action is not None else observation['state']
        else:
            if not queue:
                chunk = timed_policy(seen)
                queue = list(chunk[:config.execute_steps])
            action = queue.pop(0)
        for key, value in seen.items():
            if key != 'instruction':
                observations.setdefault(key, []).append(np.asarray(value))
        last_action = np.asarray(action, dtype=np.float64)
        actions.append(np.asarray(action, dtype=np.float32))
        controllers.append(controller)
        if in_flight:
            in_flight.append(np.asarray(action, dtype=np.float64))
            action = in_flight.pop(0)
        start = time.perf_counter()
        result = env.step(action)
        sim_s += time.perf_counter() - start
        observation = result.observation
        if result.success or result.truncated:
            break
    outcome = (ScriptedOperator.label(result.success) if operator is not None
               else (Outcome.SUCCESS if result.success else Outcome.FAILURE))
    episode = Episode(observations={k: np.stack(v) for k, v in observations.items()},
                      actions=np.stack(actions), controllers=controllers, outcome=outcome,
                      instruction=env.instruction, kind=EpisodeKind.ROLLOUT,
                      policy_versions=[config.policy_version] * len(actions),
                      episode_id=f'{env.config.task}-{seed}')
    summary = {'seed': seed, 'success': bool(result.success), 'steps': env.steps,
               'physics_error': result.physics_error,
               'interventions': episode.num_interventions,
               'human_steps': int(np.sum(episode.controllers == Controller.HUMAN)),
               'detections': list(operator.fired) if operator is not None else [],
               # seconds: policy inference; simulator steps (physics and rendering); the
               # rendering alone (reset included)
               'inference_s': inference_s, 'sim_s': sim_s,
               'render_s': env.render_seconds - render_before}
    if delayed is not None:
        summary.update(stale_dropped=delayed.stale_dropped, hold_steps=delayed.hold_steps)
    if viability is not None:
        summary['viability'] = viability_trace
    if monitor is not None:
        summary['help_events'] = help_events
        summary['help_requests'] = sum(kind == RAISED for _, kind, _ in help_events)
    if operator is not None:
        summary.update(attention_steps=operator.attention_steps,
                       takeover_causes=list(operator.causes))
    return episode, summary


def _checked(chunk: np.ndarray) -> np.ndarray:
    chunk = np.asarray(chunk, dtype=np.float64)
    if chunk.ndim != 2 or chunk.shape[1] != 14:
        raise ValueError(f'policy returned a chunk of shape {chunk.shape}; expected (H, 14)')
    return chunk

