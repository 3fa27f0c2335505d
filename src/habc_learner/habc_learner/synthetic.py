"""A 1-D reach task with known structure, to check what the weights do (no simulator).

The state is a position x (start near 0), the goal is x >= 1, the action is the step taken.
Strategies:
    fast     steps of about +0.1: succeeds in ~10 steps
    slow     steps of about +0.025: succeeds in ~40 steps
    fail     drifts backwards (about -0.02) until the 40-step time limit: failure
    rescued  starts like `fail`; a human takes over after `takeover` steps and reaches the
             goal with fast steps (policy -> human episodes)
A good credit assignment gives fast successful transitions more weight than slow ones and
failed ones none; plain behaviour cloning weights them all alike.
"""

import numpy as np

from habc_episodes.episode import Episode
from habc_episodes.vocabulary import Controller, EpisodeKind, Outcome

STEP = {'fast': 0.1, 'slow': 0.025, 'fail': -0.02}
TIME_LIMIT = 40


def reach_episode(strategy: str, rng: np.random.Generator, kind: EpisodeKind = EpisodeKind.ROLLOUT,
                  takeover: int = 8, noise: float = 0.002) -> Episode:
    """Simulate one episode of `strategy` (fast, slow, fail or rescued)."""
    x = float(rng.uniform(0.0, 0.05))
    positions, actions, controllers = [], [], []
    for t in range(TIME_LIMIT):
        if strategy == 'rescued':
            human = t >= takeover
            step = STEP['fast'] if human else STEP['fail']
            controllers.append(Controller.HUMAN if human else Controller.POLICY)
        else:
            step = STEP[strategy]
            controllers.append(Controller.HUMAN if kind == EpisodeKind.DEMO else
                               Controller.POLICY)
        action = step + float(rng.normal(0.0, noise))
        positions.append([x])
        actions.append([action])
        x += action
        if x >= 1.0:
            break
    success = x >= 1.0
    return Episode(observations={'state': np.asarray(positions, dtype=np.float32)},
                   actions=np.asarray(actions, dtype=np.float32), controllers=controllers,
                   outcome=Outcome.SUCCESS if success else Outcome.FAILURE,
                   instruction='reach the goal', kind=kind,
                   episode_id=f'{strategy}-{int(rng.integers(1 << 30))}')


def reach_dataset(counts: dict[str, int], seed: int = 0,
                  kind: EpisodeKind = EpisodeKind.ROLLOUT) -> list[Episode]:
    """Episodes of each strategy, e.g. {'fast': 20, 'slow': 20, 'fail': 20}."""
    rng = np.random.default_rng(seed)
    return [reach_episode(strategy, rng, kind) for strategy, n in counts.items()
            for _ in range(n)]
