"""`habc bench`: the paper's protocol, in simulation, for every method and several seeds.

Per task, track and seed (protocol v2, spec/habc.md "Training loop"):
  1. N demonstrations from the scripted expert with noise (imperfect, like teleoperation);
  2. SFT: the policy trained on them; one checkpoint shared by every method;
  3. stage 1: per method, R1 rounds of E rollouts watched by the imperfect operator (who
     takes over on about half of the failures, slower and less precise than the policy's
     demonstrator), each followed by K gradient steps on the cumulative buffer. The first
     round's rollouts come from the SFT checkpoint, so every method shares them;
  4. stage 2: HABC+IR branches from HABC's stage-1 state (actor, critic, optimisers,
     buffer) with intervention re-weighting on, for R2 rounds; every other method runs R2
     more rounds too, so all budgets are equal;
  5. checkpoints evaluated without the operator on held-out initial states (seeds from a
     range never used for demonstrations, rollouts or tuning) at the rounds in the
     schedule (SFT, the end of each stage, and every `eval_every` rounds).
Reported: success rate with the pooled Wilson 95% interval and a t-interval over seed
means, mean length of successful episodes, interventions and intervention steps per
success, g_t per data source, and a per-phase time breakdown. A method name may carry
overrides for ablations, e.g. `habc@advantage_network=mixed` (see METHOD_KEYS).
"""

import argparse
from dataclasses import asdict, dataclass, field, fields, replace
import json
import math
import os
from pathlib import Path
import sys
import time

import numpy as np

from habc_episodes.stats import wilson_interval
from habc_episodes.vocabulary import PolicyVersion, STARTUP_VERSION

# Held-out initial states, used for evaluation only. Budgets were tuned on the separate
# tuning range, which only a `--tuning` run evaluates on.
EVAL_SEED_BASE = 2_000_000
TUNE_SEED_BASE = 1_000_000
DEMO_SEED_BASE = 100_000
ROLLOUT_SEED_BASE = 200_000
MAX_ROUNDS = 10            # rollout seeds give each round its own block of 1000 states
SFT = 'sft'
IR_METHOD = 'habc_ir'      # stage 2 only: branches from HABC's stage-1 state
IR_TRUNK = 'habc'


@dataclass(frozen=True)
class BenchProfile:
    """Budgets of one benchmark run."""

    name: str
    tasks: tuple[str, ...] = ('transfer_cube', 'insertion')
    tracks: tuple[str, ...] = ('state',)
    methods: tuple[str, ...] = ('sft', 'imit_dagger', 'imit_recap', 'habc_v', 'habc',
                                'habc_ir')
    seeds: int = 3
    first_seed: int = 0           # seeds first_seed .. first_seed + seeds - 1: a run split
                                  # over several sessions on one machine gives, seed for
                                  # seed, the numbers of one run. Another CPU's kernels
                                  # round differently and training amplifies it: see
                                  # benchmarks/results/sim_state_v2/ablation
    # Tuned on 30 states of the tuning range (TUNE_SEED_BASE) for the paper's SFT
    # regime of 30-50%: 40 noisy demonstrations, the successful ones kept, 3000 SFT steps.
    # TransferCube, waypoint noise 2 cm: 15 kept, SFT 30% (20 clean ones: 80%). Insertion:
    # 1 cm: 37 kept, 73%; 1.5 cm: 24 kept, 30%; 2 cm: 13 kept, 7%.
    demos: int = 40
    demo_noise: float = 0.02
    demo_noise_by_task: tuple[tuple[str, float], ...] = (('insertion', 0.015),)
    sft_steps: int = 3000
    stage1_rounds: int = 5        # R1: rounds of every method from the SFT checkpoint
    stage2_rounds: int = 2        # R2: HABC+IR's rounds, and everyone else's extra rounds
    rollouts_per_round: int = 40  # E
    steps_per_round: int = 500    # K
    eval_episodes: int = 100       # held-out initial states per evaluated checkpoint
    eval_every: int = 0           # also evaluate every this many rounds (0: stage ends only)
    batch_size: int = 256
    actor_lr: float = 1e-3        # 3e-4 left the low-dim SFT policy underfit (loss 0.65 vs 0.24)
    online_actor_lr: float = 0.0  # the actor's learning rate in the online rounds; 0: actor_lr
    horizon: int = 20
    execute_steps: int = 10
    max_steps: int = 400          # as ACT: leaves a takeover time to finish the task
    image_size: int = 96
    cameras: tuple[str, ...] = ('angle',)
    # The pixel track's policy: SmallVLAConfig values, and an object locator
    # (habc_policy.models.vision) trained first on every locator_stride-th frame of all
    # recorded demonstrations, labelled with the objects' true positions, then frozen inside
    # the policy (locator_steps 0: none).
    vla: tuple[tuple[str, object], ...] = ()
    locator_steps: int = 0
    locator_stride: int = 3
    train_threads: int = 1        # torch threads of the training process: fixed, since
                                  # results depend on the reduction order; 1, since with 2
                                  # on 2 busy cores OpenMP's spin-waiting made a quick run's
                                  # training 30x slower (0.16 s per Adam step, measured)
    # The learner (spec/habc.md defaults; other values for ablations).
    warmup_steps: int = 500       # N_wu
    advantage_network: str = 'target'
    human_window_targets: str = 'human_steps'
    advantage_stride: int = 1     # s_{t+k}: 1 = the next control step
    # The imperfect operator, fixed before any result was looked at, the same for every
    # method: a person on a teleop device is slower than the policy and imprecise. Probed
    # on 40 tuning states from one TransferCube SFT checkpoint, every detected failure taken
    # over: the clean, fast expert completed 16 of 31 takeovers; 1 cm and 1.3x slower, 13;
    # 2 cm (the state demos' noise), 8 (12 with 600 steps instead of 400). 1 cm is the pixel
    # track's demonstration noise: a person no better than a demonstrator, who still
    # finishes some of what they take over.
    operator_noise: float = 0.01  # m, waypoint noise of a takeover; < 0: the demo noise
    operator_slowdown: float = 1.3
    operator_reaction_steps: int = 15     # 0.3 s at 50 Hz
    operator_takeover_probability: float = 0.5
    operator_handback_probability: float = 0.65

    @property
    def rounds(self) -> int:
        return self.stage1_rounds + self.stage2_rounds

    def noise_for(self, task: str) -> float:
        """Waypoint noise (m) of the demonstrations of `task`."""
        return dict(self.demo_noise_by_task).get(task, self.demo_noise)

    def operator_noise_for(self, task: str) -> float:
        """Waypoint noise (m) of the operator's takeovers on `task`."""
        return self.noise_for(task) if self.operator_noise < 0 else self.operator_noise

    def eval_rounds(self) -> list[int]:
        """Return the rounds whose checkpoints are evaluated (0 = SFT)."""
        rounds = {0, self.stage1_rounds, self.rounds}
        if self.eval_every:
            rounds |= set(range(0, self.rounds + 1, self.eval_every))
        return sorted(rounds)

    def schedule(self) -> dict:
        """Return the protocol's schedule, as results.json records it."""
        return {'stage1_rounds': self.stage1_rounds, 'stage2_rounds': self.stage2_rounds,
                'rollouts_per_round': self.rollouts_per_round,
                'steps_per_round': self.steps_per_round,
                'first_round_rollouts': 'shared by every method (from the SFT checkpoint)',
                'habc_ir': f'branches from habc after round {self.stage1_rounds}, IR on from '
                           'there, for stage2_rounds rounds; every other method runs as many '
                           'extra rounds',
                'eval_rounds': self.eval_rounds(), 'eval_episodes': self.eval_episodes}


# Settings a method spec may override (`habc@advantage_network=mixed,advantage_stride=10`),
# and `operator=clean` for the clean, fast expert of the first benchmark.
METHOD_KEYS = ('warmup_steps', 'advantage_network', 'human_window_targets', 'advantage_stride',
               'online_actor_lr',
               'operator_noise', 'operator_slowdown', 'operator_reaction_steps',
               'operator_takeover_probability', 'operator_handback_probability')
CLEAN_OPERATOR = {'operator_noise': 0.0, 'operator_slowdown': 1.0}


def _convert(key: str, text: str):
    kind = {f.name: f.type for f in fields(BenchProfile)}[key]
    return kind(text)  # METHOD_KEYS are all int, float or str fields


def parse_method(spec: str, profile: BenchProfile) -> tuple[str, BenchProfile]:
    """Split `name@key=value,...` into the method and the profile it runs with.

    Raises:
        ValueError: an unknown method or key, or a value of the wrong type.
    """
    from habc_learner.methods import Method
    name, _, rest = spec.partition('@')
    if name not in Method.__members__.values():
        raise ValueError(f'unknown method {name!r} in {spec!r}; choose from '
                         f'{[m.value for m in Method]}')
    overrides: dict = {}
    for item in filter(None, rest.split(',')):
        key, equals, value = item.partition('=')
        if key == 'operator' and value == 'clean':
            overrides.update(CLEAN_OPERATOR)
            continue
        if not equals or key not in METHOD_KEYS:
            raise ValueError(f'{spec!r}: expected key=value with a key of {list(METHOD_KEYS)} '
                             '(or operator=clean)')
        try:
            overrides[key] = _convert(key, value)
        except ValueError:
            raise ValueError(f'{spec!r}: bad value {value!r} for {key}') from None
    return name, replace(profile, **overrides)


def seed_interval(rates: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-seed success rates and its t-interval over seeds (clipped to [0, 1]).

    Seeds differ in demonstrations, SFT and rollouts, so their spread, not the number of
    evaluation episodes, is what limits how sure a comparison is. One seed: no interval.
    """
    from scipy import stats
    mean = float(np.mean(rates))
    if len(rates) < 2:
        return mean, 0.0, 1.0
    half = float(stats.t.ppf(0.5 + confidence / 2, len(rates) - 1)
                 * np.std(rates, ddof=1) / math.sqrt(len(rates)))
    return mean, max(0.0, mean - half), min(1.0, mean + half)


# --- worker-side jobs (run in spawned processes, one simulated robot each) ------------------
@dataclass(frozen=True)
class EpisodeJob:
    task: str
    track: str
    seed: int
    max_steps: int
    image_size: int
    cameras: tuple[str, ...]
    checkpoint: str = ''            # '' = scripted expert demonstration
    demo_noise: float = 0.0
    operator: tuple = ()            # OperatorConfig and takeover ExpertConfig fields, or ()
    execute_steps: int = 10
    inference_delay_steps: int = 0  # chunks land this many steps late (the loop's latency)
    min_remaining_steps: int = 5    # with a delay: infer when fewer actions are queued
    latency_trigger: bool = True    # with a delay: the policy node's latency-aware trigger
    actuation_delay_steps: int = 0  # each action reaches the robot this many steps late
    viability: bool = False         # record p_v at each inference (the checkpoint's critic)
    help: tuple = ()                # HelpRequestParams fields: raise help requests on p_v


_POLICIES: dict[str, tuple] = {}


def _load(checkpoint: str) -> tuple:
    """Return the checkpoint's policy and its LoadedCritic (cached per worker)."""
    from habc_policy.models.base import load_policy
    from habc_policy.models.critic import load_policy_critic
    stamp = (checkpoint, os.path.getmtime(Path(checkpoint) / 'model.safetensors'))
    key = repr(stamp)
    if key not in _POLICIES:
        _POLICIES.clear()
        policy = load_policy(Path(checkpoint))
        policy.eval()
        _POLICIES[key] = (policy, load_policy_critic(Path(checkpoint), policy))
    return _POLICIES[key]


def operator_settings(profile: BenchProfile, task: str) -> tuple:
    """Return the operator of a rollout job as a hashable tuple of (name, value) pairs."""
    return (('objects', ('box',) if task == 'transfer_cube' else ('peg', 'socket')),
            ('reaction_delay_steps', profile.operator_reaction_steps),
            ('takeover_probability', profile.operator_takeover_probability),
            ('handback_probability', profile.operator_handback_probability),
            ('waypoint_noise', profile.operator_noise_for(task)),
            ('slowdown', profile.operator_slowdown))


def run_job(job: EpisodeJob) -> dict:
    """One demonstration, rollout or evaluation episode (in a worker process).

    Every random stream of the episode (simulator, expert, operator, policy sampling) is
    seeded from the job alone, so results do not depend on which worker runs it or when.
    """
    import torch

    from habc_policy.help_request import HelpRequestParams
    from habc_sim.aloha import AlohaConfig
    from habc_sim.expert import ExpertConfig, run_expert_episode
    from habc_sim.operator import OperatorConfig, ScriptedOperator
    from habc_sim.rollouts import worker_env
    from habc_sim.runner import run_policy_episode, RunnerConfig

    torch.set_num_threads(1)  # one core per worker process
    torch.manual_seed(job.seed)
    cameras = list(job.cameras) if job.track == 'pixels' else []
    env = worker_env(AlohaConfig(task=job.task, cameras=cameras, image_size=job.image_size,
                                 max_steps=job.max_steps))
    if not job.checkpoint:
        return run_expert_episode(env, job.seed, ExpertConfig(waypoint_noise=job.demo_noise),
                                  record_track=job.track)
    policy, critic = _load(job.checkpoint)
    viability = None
    if job.viability:
        if critic.critic is None:
            raise RuntimeError(f'{job.checkpoint}: no critic for p_v: {critic.problem}')
        from habc_policy.models.critic import estimate

        def viability(seen: dict) -> float:
            return float(estimate(policy, critic.critic, policy.observation_batch(seen))[0][0])
    operator, expert = None, None
    if job.operator:
        settings = dict(job.operator)
        expert = ExpertConfig(waypoint_noise=settings.pop('waypoint_noise'),
                              slowdown=settings.pop('slowdown'))
        operator = ScriptedOperator(OperatorConfig(**settings),
                                    np.random.default_rng([job.seed, 7919]))
    episode, summary = run_policy_episode(
        env, job.seed, policy.predict_action_chunk, operator,
        RunnerConfig(track=job.track, execute_steps=job.execute_steps,
                     policy_version=Path(job.checkpoint).name,
                     inference_delay_steps=job.inference_delay_steps,
                     min_remaining_steps=job.min_remaining_steps,
                     latency_trigger=job.latency_trigger,
                     actuation_delay_steps=job.actuation_delay_steps,
                     help=HelpRequestParams(**dict(job.help)) if job.help else None),
        expert, viability)
    summary['episode'] = episode if job.operator else None
    return summary


# --- the protocol -----------------------------------------------------------------------
@dataclass
class RunContext:
    profile: BenchProfile
    out: Path
    pool: object                      # habc_sim.rollouts.WorkerPool
    progress: bool
    results: list[dict] = field(default_factory=list)
    gate_histograms: list[dict] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    eval_seed_base: int = EVAL_SEED_BASE  # TUNE_SEED_BASE for a tuning run (--tuning)

    def add_time(self, phase: str, seconds: float) -> None:
        self.timing[phase] = self.timing.get(phase, 0.0) + seconds

    def episodes(self, jobs: list[EpisodeJob], description: str, phase: str) -> list[dict]:
        start = time.time()
        results = list(self.pool.map(run_job, jobs, description, self.progress))
        self.add_time(f'{phase}_s', time.time() - start)
        for key in ('inference_s', 'sim_s', 'render_s'):
            self.add_time(f'{phase}_worker_{key}', sum(r.get(key, 0.0) for r in results))
        return results


def _evaluate(context: RunContext, task: str, track: str, checkpoint: Path) -> dict:
    p = context.profile
    jobs = [EpisodeJob(task, track, context.eval_seed_base + i, p.max_steps, p.image_size,
                       p.cameras, str(checkpoint), execute_steps=p.execute_steps)
            for i in range(p.eval_episodes)]
    results = context.episodes(jobs, f'eval {checkpoint.parent.name}/{checkpoint.name}',
                               'eval')
    successes = [r for r in results if r['success']]
    low, high = wilson_interval(len(successes), len(results))
    return {'success_rate': len(successes) / len(results), 'ci_low': low, 'ci_high': high,
            'successes': len(successes), 'episodes': len(results),
            'mean_success_steps': (float(np.mean([r['steps'] for r in successes]))
                                   if successes else None)}


def demo_episodes(demos: list[dict], task: str) -> list:
    """Turn recorded expert rollouts into demonstration Episodes (failed ones dropped)."""
    from habc_episodes.episode import Episode
    from habc_episodes.vocabulary import EpisodeKind, Outcome
    from habc_sim.aloha import INSTRUCTIONS
    episodes = []
    for demo in demos:
        if not demo['success']:
            continue  # a teleoperator would discard a failed demonstration
        episodes.append(Episode(observations=demo['observations'], actions=demo['actions'],
                                controllers=['human'] * len(demo['actions']),
                                outcome=Outcome.SUCCESS, instruction=INSTRUCTIONS[task],
                                kind=EpisodeKind.DEMO, episode_id=f'demo-{demo["seed"]}'))
    return episodes


def train_locator(recorded: list[dict], profile: BenchProfile, seed: int,
                  progress: bool = True):
    """Fit the pixel track's object locator on recorded demonstrations; return it, errors.

    Failed demonstrations count too: their frames are labelled all the same.
    """
    from habc_learner.locator import fit_locator, LocatorTraining
    from habc_policy.models.vision import LocatorConfig

    stride = profile.locator_stride
    images = np.concatenate([d['observations']['images'][::stride] for d in recorded])
    targets = np.concatenate([d['objects'][::stride] for d in recorded])
    episodes = np.concatenate([np.full(len(d['objects'][::stride]), d['seed'])
                               for d in recorded])
    config = LocatorConfig(num_views=len(profile.cameras), image_size=profile.image_size,
                           outputs=targets.shape[1])
    return fit_locator(images, targets, episodes, config,
                       LocatorTraining(steps=profile.locator_steps, seed=seed),
                       progress=progress)


def train_sft(task: str, track: str, seed: int, profile: BenchProfile, checkpoint: Path, *,
              version: PolicyVersion, workers: int = 2, progress: bool = True,
              pool=None, policy_kind: str = 'vla', policy_overrides: dict | None = None,
              device: str = 'cpu') -> tuple[list, dict]:
    """Record the expert demonstrations of one seed and train the track's policy on them.

    The SFT checkpoint (`version`) is written to `checkpoint`. Returns the demonstrations
    that succeeded (the online rounds keep them in their buffers) and the locator's errors
    ({} without one). Episodes run in `pool` (a WorkerPool) when given, else in `workers`
    new processes. On the pixel track `policy_kind` 'vla' is the small VLA with the
    profile's locator; another kind (e.g. 'transformers_vla', with its backbone_dir in
    `policy_overrides`) is built by habc_learner.policies.new_policy without a locator.

    Raises:
        RuntimeError: no demonstration succeeded.
    """
    from habc_learner.methods import MethodConfig
    from habc_learner.policies import new_policy
    from habc_learner.trainer import seed_everything, TrainConfig, Trainer
    from habc_sim.rollouts import run_parallel

    p = profile
    jobs = [EpisodeJob(task, track, DEMO_SEED_BASE + 10_000 * seed + i, p.max_steps,
                       p.image_size, p.cameras, demo_noise=p.noise_for(task))
            for i in range(p.demos)]
    description = f'demos {task}'
    recorded = (pool.map(run_job, jobs, description, progress) if pool is not None
                else run_parallel(run_job, jobs, workers, description, progress))
    recorded = list(recorded)
    demos = demo_episodes(recorded, task)
    if not demos:
        raise RuntimeError(f'no successful demonstration for {task} with noise '
                           f'{p.noise_for(task)}; lower demo_noise')
    config = MethodConfig(method='sft', horizon=p.horizon)
    locator_metrics: dict = {}
    buffer = config.make_buffer()
    for episode in demos:
        buffer.add(episode)
    seed_everything(seed)
    # The simulated cameras' images, recorded with the checkpoint (robot_fit).
    camera_shape = [p.image_size, p.image_size]
    if track == 'state':
        # The state track's state: 14 joints, then each object's position (cube; peg, socket).
        objects = 3 if task == 'transfer_cube' else 6
        policy = new_policy('lowdim', 14 + objects, 14, None, horizon=p.horizon)
    elif policy_kind != 'vla':
        policy = new_policy(policy_kind, 14, 14, (len(p.cameras), p.image_size, p.image_size),
                            horizon=p.horizon,
                            overrides={'camera_shape': camera_shape, **(policy_overrides or {})})
    else:
        overrides = {**dict(p.vla), 'camera_shape': camera_shape, **(policy_overrides or {})}
        if p.locator_steps:
            locator, locator_metrics = train_locator(recorded, p, seed, progress)
            overrides['locator'] = asdict(locator.config)
        policy = new_policy('vla', 14, 14, (len(p.cameras), p.image_size, p.image_size),
                            horizon=p.horizon, overrides=overrides)
        if p.locator_steps:
            policy.locator.load_state_dict(locator.state_dict())
    del recorded  # the failed demonstrations' frames (the locator's only use of them)
    trainer = Trainer(policy, buffer, config,
                      TrainConfig(steps=p.sft_steps, batch_size=p.batch_size,
                                  actor_lr=p.actor_lr, seed=seed, device=device),
                      progress=progress)
    trainer.fit(description=f'SFT {task}')
    trainer.save_checkpoint(checkpoint, version=version)
    return demos, locator_metrics


@dataclass
class MethodRun:
    """One method's state within a cell: its trainer (actor, critic, buffer) and checkpoint."""

    spec: str
    profile: BenchProfile
    trainer: object
    checkpoint: Path


class Cell:
    """Demonstrations, SFT and every method's two stages for one task, track and seed."""

    def __init__(self, context: RunContext, task: str, track: str, seed: int,
                 specs: list[str]) -> None:
        self.context, self.task, self.track, self.seed = context, task, track, seed
        self.specs = specs
        self.dir = context.out / f'{task}-{track}-seed{seed}'
        self.base = {'task': task, 'track': track, 'seed': seed}
        # Rollouts of a checkpoint that several methods start a round from: the SFT
        # checkpoint (round 1) and HABC's stage-1 checkpoint (HABC and HABC+IR, round R1+1).
        self._rollout_cache: dict[tuple, list[dict]] = {}
        self._shared_checkpoints: set[Path] = set()
        self.gate_rng = np.random.default_rng([seed, 4242])

    def run(self) -> None:
        context, p = self.context, self.context.profile
        sft_checkpoint = self.dir / SFT / 'round0'
        start = time.time()
        demos, locator = train_sft(self.task, self.track, self.seed, p, sft_checkpoint,
                                   version=STARTUP_VERSION, progress=context.progress,
                                   pool=context.pool)
        context.add_time('demos_and_sft_s', time.time() - start)
        self.demos = demos
        self.base['demos'] = len(demos)
        if locator:
            self.base['locator_heldout_error_cm'] = locator['heldout_error_cm']
        sft_eval = _evaluate(context, self.task, self.track, sft_checkpoint)
        for spec in self.specs:
            context.results.append({**self.base, 'method': spec, 'round': 0, 'stage': 0,
                                    **sft_eval, 'interventions': 0, 'rollouts': 0})
        self.sft_checkpoint = sft_checkpoint
        self._shared_checkpoints.add(sft_checkpoint)
        online = [s for s in self.specs if s != SFT and not s.startswith(IR_METHOD)]
        branches = [s for s in self.specs if s.startswith(IR_METHOD)]
        for spec in online:
            self._run_method(spec, branch_specs=[b for b in branches
                                                 if _trunk_of(b) == spec])
        # An IR branch whose trunk was not selected: run the trunk's stage 1 unreported.
        for spec in branches:
            if _trunk_of(spec) not in online:
                self._run_method(_trunk_of(spec), branch_specs=[spec], report_trunk=False)
        _write(context)

    def _run_method(self, spec: str, branch_specs: list[str],
                    report_trunk: bool = True) -> None:
        p = self.context.profile
        run = self._start(spec)
        for round_index in range(1, p.stage1_rounds + 1):
            self._round(run, round_index, stage=1, report=report_trunk)
        branches = []
        if branch_specs:
            self._shared_checkpoints.add(run.checkpoint)
        for branch_spec in branch_specs:
            _, branch_profile = parse_method(branch_spec, p)
            algorithm = run.trainer.algorithm.branch_with_intervention_reweighting(
                run.trainer.step)
            trainer = run.trainer.branch(algorithm, log_dir=self.dir / branch_spec /
                                         'tensorboard')
            branches.append(MethodRun(branch_spec, branch_profile, trainer, run.checkpoint))
        if report_trunk:
            for round_index in range(p.stage1_rounds + 1, p.rounds + 1):
                self._round(run, round_index, stage=2)
        for branch in branches:
            for round_index in range(p.stage1_rounds + 1, p.rounds + 1):
                self._round(branch, round_index, stage=2)

    def _start(self, spec: str) -> MethodRun:
        from habc_learner.methods import MethodConfig
        from habc_learner.trainer import TrainConfig, Trainer
        from habc_policy.models.base import load_policy

        method, profile = parse_method(spec, self.context.profile)
        config = MethodConfig(method=method, horizon=profile.horizon,
                              warmup_steps=profile.warmup_steps,
                              advantage_network=profile.advantage_network,
                              human_window_targets=profile.human_window_targets,
                              next_stride=profile.advantage_stride)
        buffer = config.make_buffer()
        for episode in self.demos:
            buffer.add(episode)
        trainer = Trainer(load_policy(self.sft_checkpoint), buffer, config,
                          TrainConfig(steps=profile.steps_per_round,
                                      batch_size=profile.batch_size,
                                      actor_lr=profile.online_actor_lr or profile.actor_lr,
                                      seed=self.seed),
                          log_dir=self.dir / spec / 'tensorboard',
                          progress=self.context.progress)
        return MethodRun(spec, profile, trainer, self.sft_checkpoint)

    def _rollouts(self, run: MethodRun, round_index: int) -> list[dict]:
        p = run.profile
        operator = operator_settings(p, self.task)
        key = (run.checkpoint, operator, round_index)
        if key in self._rollout_cache:
            return self._rollout_cache[key]
        jobs = [EpisodeJob(self.task, self.track,
                           ROLLOUT_SEED_BASE + 10_000 * self.seed + 1000 * round_index + i,
                           p.max_steps, p.image_size, p.cameras, str(run.checkpoint),
                           operator=operator, execute_steps=p.execute_steps)
                for i in range(p.rollouts_per_round)]
        rollouts = self.context.episodes(jobs, f'{run.spec} round {round_index} rollouts',
                                         'rollouts')
        if run.checkpoint in self._shared_checkpoints:
            self._rollout_cache[key] = rollouts
        return rollouts

    def _round(self, run: MethodRun, round_index: int, stage: int,
               report: bool = True) -> None:
        context = self.context
        round_start = time.time()
        rollouts = self._rollouts(run, round_index)
        for rollout in rollouts:
            run.trainer.buffer.add(rollout['episode'])
        start = time.time()
        history_from = len(run.trainer.history)
        run.trainer.fit(description=f'{run.spec} round {round_index}')
        run.checkpoint = self.dir / run.spec / f'round{round_index}'
        run.trainer.save_checkpoint(run.checkpoint, version=PolicyVersion(
            STARTUP_VERSION.number + round_index, run.spec.split('@')[0]))
        context.add_time('train_s', time.time() - start)
        if not report:
            return
        row = {**self.base, 'method': run.spec, 'round': round_index, 'stage': stage,
               **rollout_stats(rollouts),
               **weight_stats(run.trainer.history[history_from:],
                              run.trainer.algorithm.config.warmup_steps)}
        start = time.time()
        report_gates = run.trainer.algorithm.gate_report(run.trainer.buffer, self.gate_rng)
        context.add_time('gate_report_s', time.time() - start)
        for source, values in report_gates.items():
            row[f'g_mean_{source}'] = float(values.mean()) if len(values) else None
            context.gate_histograms.append({
                **self.base, 'method': run.spec, 'round': round_index, 'source': source,
                'counts': np.histogram(values, bins=20, range=(0.0, 2.0))[0].tolist()})
        if round_index in run.profile.eval_rounds():
            row.update(_evaluate(context, self.task, self.track, run.checkpoint))
        row['round_seconds'] = round(time.time() - round_start, 1)
        context.results.append(row)
        _write(context)


def _trunk_of(branch_spec: str) -> str:
    """Return the HABC spec an IR branch continues: `habc_ir@x=1` -> `habc@x=1`."""
    return IR_TRUNK + branch_spec[len(IR_METHOD):]


def rollout_stats(rollouts: list[dict]) -> dict:
    """Outcomes and human effort of one round's operator-watched rollouts."""
    successes = sum(r['success'] for r in rollouts)
    human_steps = int(sum(r['human_steps'] for r in rollouts))
    return {'rollouts': len(rollouts), 'rollout_successes': int(successes),
            'rollout_success_rate': successes / len(rollouts),
            'interventions': int(sum(r['interventions'] for r in rollouts)),
            'episodes_with_intervention': int(sum(r['interventions'] > 0 for r in rollouts)),
            'successes_with_intervention': int(sum(r['success'] and r['interventions'] > 0
                                                   for r in rollouts)),
            'human_steps': human_steps,
            'intervention_steps_per_success': human_steps / successes if successes else None}


def weight_stats(history: list[dict], warmup_steps: int) -> dict:
    """Means of the logged actor-weight statistics of one round, after the warm-up."""
    logged = [h for h in history if h['step'] > warmup_steps]
    stats = {}
    for key, name in (('weights/mean_g_rollout_success', 'train_g_rollout_success'),
                      ('weights/mean_g_human', 'train_g_human'),
                      ('weights/zero_share', 'train_zero_weight_share')):
        values = [h[key] for h in logged if key in h]
        stats[name] = float(np.mean(values)) if values else None
    return stats


def _write(context: RunContext) -> None:
    payload = {'profile': asdict(context.profile), 'schedule': context.profile.schedule(),
               'eval_seed_base': context.eval_seed_base,
               'timing_s': {k: round(v, 1) for k, v in sorted(context.timing.items())},
               'results': context.results, 'gate_histograms': context.gate_histograms}
    (context.out / 'results.json').write_text(json.dumps(payload, indent=1) + '\n')


# --- reporting --------------------------------------------------------------------------
def final_rows(results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Return the evaluated rows of each (method, column) at its last evaluated round."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        if 'success_rate' in r:
            cells.setdefault((r['method'], f"{r['task']} ({r['track']})"), []).append(r)
    final = {}
    for key, rows in cells.items():
        last = max(r['round'] for r in rows)
        final[key] = [r for r in rows if r['round'] == last]
    return final


def summary_table(results: list[dict], methods: list[str]) -> str:
    """Markdown table shaped like the paper's: methods x tasks, final evaluated round.

    Each cell: success pooled over seeds with its Wilson interval, the t-interval over the
    seed means, the per-seed successes, and the mean length of successful episodes.
    """
    cells = final_rows(results)
    columns = sorted({column for _, column in cells})
    lines = ['| method | ' + ' | '.join(columns) + ' |', '|---|' + '---|' * len(columns)]
    for method in methods:
        row = []
        for column in columns:
            runs = sorted(cells.get((method, column), []), key=lambda r: r['seed'])
            if not runs:
                row.append('-')
                continue
            successes = sum(r['successes'] for r in runs)
            n = sum(r['episodes'] for r in runs)
            low, high = wilson_interval(successes, n)
            _, t_low, t_high = seed_interval([r['success_rate'] for r in runs])
            per_seed = '/'.join(str(r['successes']) for r in runs)
            lengths = [r['mean_success_steps'] for r in runs if r['mean_success_steps']]
            length = f', {np.mean(lengths):.0f} steps' if lengths else ''
            row.append(f'{100 * successes / n:.0f}% [{100 * low:.0f}-{100 * high:.0f}] '
                       f'seeds [{100 * t_low:.0f}-{100 * t_high:.0f}] ({per_seed}{length})')
        lines.append(f'| {method} | ' + ' | '.join(row) + ' |')
    return '\n'.join(lines) + '\n'


def effort_table(results: list[dict], methods: list[str]) -> str:
    """Interventions and intervention steps per success, per round, pooled over seeds."""
    rounds = sorted({r['round'] for r in results if r['round'] > 0})
    columns = sorted({(r['task'], r['track']) for r in results})
    lines = []
    for task, track in columns:
        lines += [f'\n{task} ({track}): takeovers / rollouts, and human steps per successful '
                  'rollout, per round (pooled over seeds)\n',
                  '| method | ' + ' | '.join(f'round {r}' for r in rounds) + ' |',
                  '|---|' + '---|' * len(rounds)]
        for method in methods:
            row = []
            for rnd in rounds:
                at = [r for r in results if (r['task'], r['track'], r['method'], r['round'])
                      == (task, track, method, rnd)]
                if not at:
                    row.append('-')
                    continue
                n = sum(r['rollouts'] for r in at)
                successes = sum(r['rollout_successes'] for r in at)
                human = sum(r['human_steps'] for r in at)
                per = f'{human / successes:.0f}' if successes else '-'
                row.append(f'{sum(r["interventions"] for r in at)}/{n}, {per}')
            if any(cell != '-' for cell in row):
                lines.append(f'| {method} | ' + ' | '.join(row) + ' |')
    return '\n'.join(lines) + '\n'


def plot_results(results: list[dict], path: Path, stage1_rounds: int | None = None) -> None:
    """Success vs evaluated round per method: seed mean, pooled Wilson band; one panel each."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    evaluated = [r for r in results if 'success_rate' in r]
    panels = sorted({(r['task'], r['track']) for r in evaluated})
    methods = list(dict.fromkeys(r['method'] for r in evaluated))  # the profile's order
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (task, track) in zip(axes[0], panels, strict=True):
        for method in methods:
            rows = [r for r in evaluated if (r['task'], r['track'], r['method'])
                    == (task, track, method)]
            if method.startswith(IR_METHOD) and stage1_rounds:
                # HABC+IR starts from HABC's stage-1 checkpoint: draw it from there.
                rows = [r for r in evaluated if (r['task'], r['track'], r['method'])
                        == (task, track, _trunk_of(method)) and r['round'] == stage1_rounds
                        ] + [r for r in rows if r['round'] > stage1_rounds]
            rounds = sorted({r['round'] for r in rows})
            if method == SFT or len(rounds) < 2:
                continue
            rates, lows, highs = [], [], []
            for rnd in rounds:
                at = [r for r in rows if r['round'] == rnd]
                s, n = sum(r['successes'] for r in at), sum(r['episodes'] for r in at)
                low, high = wilson_interval(s, n)
                rates.append(s / n)
                lows.append(low)
                highs.append(high)
            line, = ax.plot(rounds, rates, marker='o', label=method)
            ax.fill_between(rounds, lows, highs, alpha=0.12)
            # Each seed thin and dashed: a pooled rate can hide seeds far apart (one at
            # 92%, one at 4%), which is what the t-interval over seeds reports.
            seeds = sorted({r['seed'] for r in rows})
            for seed in seeds if len(seeds) > 1 else ():
                points = sorted((r['round'], r['success_rate']) for r in rows
                                if r['seed'] == seed)
                ax.plot(*zip(*points, strict=True), color=line.get_color(), linewidth=0.8,
                        linestyle='--', alpha=0.6)
        if stage1_rounds:
            ax.axvline(stage1_rounds, color='grey', linestyle=':', linewidth=1)
            ax.text(stage1_rounds, 0.98, ' stage 2', fontsize=7, va='top', color='grey')
        ax.set_title(f'{task} ({track})')
        ax.set_xlabel('online round (0 = the shared SFT checkpoint)')
        ax.set_xticks(sorted({r['round'] for r in evaluated}))
        ax.set_ylabel('success rate, pooled over seeds (Wilson 95%);\ndashed: each seed',
                      fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lengths(results: list[dict], methods: list[str], path: Path) -> None:
    """Mean length of successful episodes per method (final evaluated round), per task."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    cells = final_rows(results)
    panels = sorted({column for _, column in cells})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, column in zip(axes[0], panels, strict=True):
        names, means, errors = [], [], []
        for method in methods:
            lengths = [r['mean_success_steps'] for r in cells.get((method, column), [])
                       if r['mean_success_steps']]
            if lengths:
                names.append(method)
                means.append(float(np.mean(lengths)))
                errors.append(float(np.std(lengths)) if len(lengths) > 1 else 0.0)
        ax.bar(names, means, yerr=errors, capsize=3, color='tab:blue', alpha=0.8)
        ax.set_title(f'{column}: length of successful episodes\n'
                     '(final round; error bars: std over seeds)', fontsize=10)
        ax.set_ylabel('control steps at 50 Hz')
        ax.tick_params(axis='x', rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gates(histograms: list[dict], path: Path) -> bool:
    """Histograms of g_t per data source at each HABC method's last round; False if none."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    if not histograms:
        return False
    last = {}
    for h in histograms:
        key = (h['task'], h['track'], h['method'])
        last[key] = max(last.get(key, 0), h['round'])
    panels = sorted(last)
    columns = min(4, len(panels))
    rows_n = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows_n, columns, figsize=(4 * columns, 3.2 * rows_n),
                             squeeze=False)
    edges = np.linspace(0.0, 2.0, 21)
    centres = (edges[:-1] + edges[1:]) / 2
    for ax, key in zip(axes.flat, panels, strict=False):
        for source, colour in (('rollout_success', 'tab:green'), ('rollout_failure', 'tab:red'),
                               ('human', 'tab:orange'), ('demo', 'tab:blue')):
            counts = np.sum([h['counts'] for h in histograms
                             if (h['task'], h['track'], h['method']) == key
                             and h['round'] == last[key] and h['source'] == source], axis=0)
            if np.ndim(counts) and counts.sum():
                share = counts / counts.sum()
                mean = float((share * centres).sum())
                ax.step(centres, share, where='mid', color=colour,
                        label=f'{source} (mean {mean:.2f})')
        ax.set_title(f'{key[2]}\n{key[0]} round {last[key]}', fontsize=9)  # long specs wrap
        ax.set_xlabel('g_t (before normalisation)')
        ax.set_ylabel('share of samples')
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- command line -----------------------------------------------------------------------
PROFILES = {
    # A smoke run of the whole pipeline (used by tests): tiny budgets, results meaningless.
    'quick': BenchProfile(name='quick', tasks=('transfer_cube',), seeds=1, demos=6,
                          methods=('sft', 'imit_dagger', 'habc', 'habc_ir'),
                          sft_steps=60, stage1_rounds=1, stage2_rounds=1,
                          rollouts_per_round=3, steps_per_round=30, eval_episodes=3,
                          batch_size=64, online_actor_lr=1e-4, max_steps=200,
                          warmup_steps=10, locator_steps=20,
                          vla=(('token_grid', 0), ('keypoints', 0))),
    # The state track: both tasks, the paper's methods, 3 seeds. The naive-credit and AWR
    # baselines run separately (`--methods habc_naive awr`), so that each run fits ~90 min.
    'full': BenchProfile(name='full'),
    # The pixel track: the small VLA on two cameras, reading the cube's place from a frozen
    # object locator fitted on the demonstrations' frames (without it, SFT stayed at 0-1/30
    # on tuning states; with it, 14/30: tools/probe_vision_sft.py). Protocol v2's rounds
    # (R1 = 5, R2 = 2) with 20 rollouts a round and 50 held-out states per checkpoint, so 2
    # seeds fit in about 90 minutes on 2 cores. The online rounds train the actor at 1e-4:
    # 500 more steps on the SFT checkpoint's own demonstrations at SFT's 1e-3 took it from
    # 26/30 to 3/30 tuning states, at 1e-4 to 30/30 (the first pixel run, at 1e-3, fell from
    # 82% to 2-18%: benchmarks/results/sim_pixels_v2).
    'pixels': BenchProfile(name='pixels', tasks=('transfer_cube',), tracks=('pixels',),
                           methods=('sft', 'imit_dagger', 'habc', 'habc_ir'), seeds=2,
                           demos=100, demo_noise=0.01, demo_noise_by_task=(),
                           cameras=('top', 'angle'), locator_steps=1500,
                           vla=(('token_grid', 0), ('keypoints', 0)),
                           sft_steps=3000, batch_size=32, online_actor_lr=1e-4,
                           rollouts_per_round=20, eval_episodes=50),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `habc bench` options."""
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument('--quick', action='store_true',
                         help='smoke run of the whole protocol (minutes; results meaningless)')
    profile.add_argument('--full', action='store_true',
                         help="the state track: both tasks, the paper's methods, 3 seeds "
                         '(default)')
    profile.add_argument('--pixels', action='store_true',
                         help='the pixel track: the small VLA on TransferCube, 2 seeds')
    parser.add_argument('--help-requests', action='store_true',
                        help='the help-request benchmark instead (habc_sim.help_bench): '
                        'continuous watching vs help requests at calibrated thresholds, state '
                        'track; with --quick, its smoke run')
    from habc_sim import help_bench  # it builds on this module
    help_bench.add_arguments(parser)
    parser.add_argument('--tasks', nargs='+', choices=['transfer_cube', 'insertion'])
    parser.add_argument('--tracks', nargs='+', choices=['state', 'pixels'])
    parser.add_argument('--methods', nargs='+',
                        help='methods, each optionally with overrides for an ablation: '
                        f'NAME@KEY=VALUE,... with KEY in {", ".join(METHOD_KEYS)}, or '
                        'NAME@operator=clean. habc_ir branches from habc (with the same '
                        'overrides) after stage 1')
    parser.add_argument('--seeds', type=int, help='number of seeds')
    parser.add_argument('--first-seed', type=int,
                        help='first seed (default 0): `--first-seed 2 --seeds 1` runs seed 2 '
                        'alone, with the same numbers as in a run of seeds 0-2 on the same '
                        'machine')
    parser.add_argument('--stage1-rounds', type=int, help='R1: online rounds of every method')
    parser.add_argument('--stage2-rounds', type=int,
                        help='R2: rounds of HABC+IR after its branch, and extra rounds of '
                        'every other method')
    parser.add_argument('--rollouts', type=int, dest='rollouts_per_round',
                        help='E: operator-watched rollouts per round')
    parser.add_argument('--steps-per-round', type=int, help='K: gradient steps per round')
    parser.add_argument('--eval-episodes', type=int,
                        help='held-out evaluation episodes per checkpoint (>= 50 for results)')
    parser.add_argument('--eval-every', type=int,
                        help='also evaluate every N rounds (default: SFT and stage ends)')
    parser.add_argument('--demos', type=int, help='expert demonstrations recorded per seed')
    parser.add_argument('--demo-noise', type=float,
                        help='waypoint noise (m) of the demonstrations, for every task')
    parser.add_argument('--sft-steps', type=int, help='gradient steps of SFT')
    parser.add_argument('--workers', type=int, default=min(2, os.cpu_count() or 1),
                        help='parallel rollout processes (default 2)')
    parser.add_argument('--out', type=Path, default=Path('runs/bench'),
                        help='output folder (default runs/bench)')
    parser.add_argument('--tuning', action='store_true',
                        help='evaluate on the tuning states (seeds 1,000,000+) instead of the '
                        'held-out ones: for choosing budgets; its numbers are not results')
    parser.add_argument('--no-progress', action='store_true')


def make_profile(args: argparse.Namespace) -> BenchProfile:
    """Return the profile the options select, with overrides (ValueError if invalid)."""
    profile = PROFILES['quick' if args.quick else 'pixels' if args.pixels else 'full']
    overrides = {k: tuple(v) if isinstance(v, list) else v
                 for k in ('tasks', 'tracks', 'methods', 'seeds', 'first_seed', 'stage1_rounds',
                           'stage2_rounds', 'rollouts_per_round', 'steps_per_round',
                           'eval_episodes', 'eval_every', 'demos', 'sft_steps')
                 if (v := getattr(args, k, None)) is not None}
    if args.demo_noise is not None:
        overrides.update(demo_noise=args.demo_noise, demo_noise_by_task=())
    profile = replace(profile, **overrides)
    for spec in profile.methods:
        parse_method(spec, profile)
    if profile.rounds > MAX_ROUNDS or profile.stage1_rounds < 1 or profile.stage2_rounds < 0:
        raise ValueError(f'stage1_rounds >= 1, stage2_rounds >= 0 and at most {MAX_ROUNDS} '
                         'rounds in all')
    if profile.first_seed < 0 or profile.seeds < 1 or profile.first_seed + profile.seeds > 10:
        raise ValueError('seeds 0-9 only (each seed has its own block of demonstration and '
                         'rollout states): first_seed >= 0, seeds >= 1')
    if profile.rollouts_per_round > 1000:
        raise ValueError('at most 1000 rollouts per round (each round has its own block of '
                         'initial states)')
    return profile


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; write results.json, results.md and the plots."""
    import torch

    from habc_sim.rollouts import WorkerPool
    if args.help_requests:
        if args.pixels:
            print('habc bench: --help-requests runs the state track; drop --pixels',
                  file=sys.stderr)
            return 2
        from habc_sim import help_bench
        return help_bench.run(args)
    try:
        profile = make_profile(args)
    except ValueError as exc:
        print(f'habc bench: {exc}', file=sys.stderr)
        return 2
    torch.set_num_threads(profile.train_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with WorkerPool(args.workers) as pool:
        context = RunContext(profile, args.out, pool, not args.no_progress,
                             eval_seed_base=TUNE_SEED_BASE if args.tuning else EVAL_SEED_BASE)
        for task in profile.tasks:
            for track in profile.tracks:
                for seed in range(profile.first_seed, profile.first_seed + profile.seeds):
                    Cell(context, task, track, seed, list(profile.methods)).run()
    context.add_time('total_s', time.time() - start)
    _write(context)
    methods = list(profile.methods)
    table = summary_table(context.results, methods)
    states = ('TUNING states (a tuning run: not a result)' if args.tuning
              else 'held-out initial states')
    header = (f'# habc bench ({profile.name})\n\nCommand: `habc bench '
              f'{" ".join(sys.argv[2:])}`\n\nSuccess on {profile.eval_episodes} {states} per '
              f'checkpoint at the last evaluated round ({profile.rounds}: {profile.stage1_rounds}'
              f' + {profile.stage2_rounds} rounds of {profile.rollouts_per_round} rollouts); '
              f'pooled over {profile.seeds} seed(s) with its Wilson 95% interval, then the '
              't-interval over seed means, successes per seed and the mean length of '
              f'successful episodes. Wall time {time.time() - start:.0f} s.\n\n')
    effort = effort_table(context.results, methods)
    timing = '\n'.join(f'| {k} | {v:.0f} |' for k, v in sorted(context.timing.items()))
    (args.out / 'results.md').write_text(
        header + table + effort + '\nTime per phase (s; worker_* are summed over worker '
        'processes)\n\n| phase | seconds |\n|---|---|\n' + timing + '\n')
    plot_results(context.results, args.out / 'success_vs_round.png', profile.stage1_rounds)
    plot_lengths(context.results, methods, args.out / 'success_length.png')
    plots = 'success_vs_round.png, success_length.png'
    if plot_gates(context.gate_histograms, args.out / 'gate_histograms.png'):
        plots += ', gate_histograms.png'
    print(table + effort)
    print(f'wrote {args.out}/results.json, results.md, {plots}')
    return 0
