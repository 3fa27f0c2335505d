"""One simulated episode driven by a policy, watched by the scripted operator (no rclpy).

The policy predicts chunks of H actions; the runner executes the first `execute_steps` of
each chunk, then asks again (receding horizon). On every step the operator decides who
controls: when it takes over, the scripted expert replans from the current state and drives
until the operator hands back or the episode ends. Every executed action is recorded with
the controller that produced it, which is what credit assignment needs.
"""

from collections.abc import Callable
from dataclasses import dataclass
import time

import numpy as np

from habc_episodes.episode import Episode
from habc_episodes.vocabulary import Controller, EpisodeKind, Outcome
from habc_sim.aloha import AlohaEnv, policy_observation
from habc_sim.expert import ExpertConfig, ScriptedExpert
from habc_sim.operator import ScriptedOperator

PolicyFn = Callable[[dict], np.ndarray]


@dataclass(frozen=True)
class RunnerConfig:
    """How a policy episode is executed and recorded."""

    track: str = 'state'          # 'state': joints + object positions; 'pixels': + images
    execute_steps: int = 10       # actions executed per chunk before the next inference
    policy_version: str = ''

    def __post_init__(self) -> None:
        if self.track not in ('state', 'pixels'):
            raise ValueError(f"track must be 'state' or 'pixels', got {self.track!r}")
        if self.execute_steps < 1:
            raise ValueError('execute_steps must be >= 1')


def run_policy_episode(env: AlohaEnv, seed: int, policy: PolicyFn,
                       operator: ScriptedOperator | None = None,
                       config: RunnerConfig = RunnerConfig(),
                       expert_config: ExpertConfig | None = None) -> tuple[Episode, dict]:
    """Roll out `policy` from `seed`; return the recorded Episode and a summary."""
    render_before = env.render_seconds
    inference_s = sim_s = 0.0
    observation = env.reset(seed)
    expert = ScriptedExpert(env, expert_config or ExpertConfig(), seed)
    expert.reset()
    if operator is not None:
        operator.reset(env.privileged())
    queue: list[np.ndarray] = []
    observations: dict[str, list] = {}
    actions, controllers = [], []
    while True:
        controller = Controller.POLICY
        if operator is not None:
            controller, took_over = operator.step(env.steps, env.privileged())
            if took_over:
                expert.replan()
        seen = policy_observation(observation, config.track)
        if controller == Controller.HUMAN:
            action = expert.act()
            queue = []  # the policy restarts from the state the human leaves behind
        else:
            if not queue:
                start = time.perf_counter()
                chunk = np.asarray(policy(seen), dtype=np.float64)
                inference_s += time.perf_counter() - start
                if chunk.ndim != 2 or chunk.shape[1] != 14:
                    raise ValueError(f'policy returned a chunk of shape {chunk.shape}; '
                                     'expected (H, 14)')
                queue = list(chunk[:config.execute_steps])
            action = queue.pop(0)
        for key, value in seen.items():
            if key != 'instruction':
                observations.setdefault(key, []).append(np.asarray(value))
        actions.append(np.asarray(action, dtype=np.float32))
        controllers.append(controller)
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
    return episode, summary

