"""The online learner (no rclpy): labelled episode bags in, versioned checkpoints out.

The learner keeps one training buffer (a SampleBuffer of the configured method) and one
Trainer across rounds. It polls the episode index for labels given since its cursor
(`EpisodeIndex.labelled_since`), reads each new trainable episode's bag into the buffer, and
when `episodes_per_round` new episodes have arrived it runs `steps_per_round` gradient steps
and writes the next checkpoint version:

    work_dir/
        learner_state.json          the only state; replaced atomically after each round
        checkpoints/v<N>/           model.safetensors, config.json, critic.safetensors,
                                    trainer_state.pt, metrics.json (Trainer.save_checkpoint)
        tensorboard/                scalars of every round

Versions are habc_episodes.vocabulary.PolicyVersion: the init checkpoint's own (the SFT one is
STARTUP_VERSION, 1:sft), and round r writes version number 1 + r (PolicyUpdate.version).

Crash safety. learner_state.json is written (with os.replace) only after the checkpoint of a
round is complete in place, and the checkpoint itself is written into a scratch folder and
renamed, so a kill at any moment leaves either the old state or the new one. The state names
the episodes in the buffer (with the outcome they were trained with) and the index cursor at
that round. A restarted learner reloads its latest checkpoint (policy, critic, step count),
rebuilds the buffer from those episodes' bags and polls from the saved cursor, so episodes
consumed after the last round are simply read again: none is lost and none is counted twice.
The checkpoint's trainer state (AdamW moments, target critic) goes on too, in process and in
torchrun's processes (`nproc`) alike.

Relabels. The learner asks the index for every label change, not just the trainable ones: an
episode relabelled success <-> failure is re-credited and one relabelled 'discarded' is
removed (both rebuild the buffer). A relabel does not count as a new episode.
"""

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
import json
import os
from pathlib import Path
import shutil
import time
from typing import Any

from habc_common import checkpoints
from habc_common.params import param, validate_params
from habc_common.update_trust import DEFAULT_POLICY_NAME, DEFAULT_SIGNING_KEY
from habc_episodes.episode import Episode
from habc_episodes.episode_bags import episode_from_bag
from habc_episodes.vocabulary import EpisodeKind, EpisodeStatus, Outcome, PolicyVersion
from habc_learner.methods import Method, MethodConfig
from habc_learner.policies import fit_problems
from habc_learner.trainer import TRAINER_STATE_FILE
from habc_policy.models.base import LEROBOT_PREFIX, load_policy, sha256_file, WEIGHTS_FILE
from habc_policy.models.critic import CRITIC_FILE

STATE_FILE = 'learner_state.json'
# 2: one label cursor per episode store (format 1 had one cursor, for index_path).
STATE_FORMAT = 2
READABLE_STATE_FORMATS = (1, 2)
CHECKPOINT_DIR = 'checkpoints'
# PolicyUpdate.format of a checkpoint folder (model.safetensors + config.json) at the URI.
CHECKPOINT_FORMAT = 'safetensors'


@dataclass(frozen=True)
class LearnerParams:
    """Parameters of learner_node (and of the Learner core)."""

    index_path: str = param('~/.habc/episodes/episodes.sqlite',
                            'Episode index (SQLite) the recorder writes: <storage_dir>/'
                            'episodes.sqlite. ~ and $VARIABLES are expanded.')
    index_paths: list[str] = param(
        [], 'Episode indices of several robots (a fleet: one store per robot), read instead '
        'of index_path; the learner trains on the episodes of all of them, and a store that '
        'is missing or unreadable is reported and skipped without holding up the others.')
    work_dir: str = param(checkpoints.LEARNER_WORK_DIR, 'Learner state, checkpoints and '
                          'TensorBoard logs '
                          '(~ and $VARIABLES are expanded).')
    init_checkpoint: str = param('', 'Checkpoint folder of the SFT policy (its version, '
                                 'STARTUP_VERSION, is the one the learner counts on from). '
                                 'Needed on the first start; a restart resumes from work_dir. '
                                 'Empty: learner_node takes the newest `habc demo` checkpoint '
                                 '(habc_common.checkpoints) and waits until there is one.')
    method: str = param('habc', 'Training method.', choices=tuple(m.value for m in Method))
    episodes_per_round: int = param(2, 'New labelled episodes that start a training round.',
                                    min=1)
    max_episodes: int = param(
        0, 'Keep at most this many robot episodes in the training buffer, the newest; older '
        'ones leave it (their bags stay). 0: all. The buffer lives in memory: a 400-step '
        'episode with two 96 px cameras takes about 22 MB, so a robot that runs for days '
        'needs a bound.', min=0)
    steps_per_round: int = param(200, 'Gradient steps per round.', min=1)
    batch_size: int = param(64, 'Minibatch size.', min=1)
    actor_lr: float = param(1e-3, 'Actor learning rate (habc bench uses 1e-3).', min=1e-12)
    critic_lr: float = param(1e-3, 'Critic learning rate.', min=1e-12)
    warmup_steps: int = param(300, 'Gradient steps with gate g_t = 1 (counted over all '
                              'rounds).', min=0)
    poll_period_s: float = param(1.0, 'How often the episode index is polled (s).',
                                 min=0.01, max=3600.0)
    torch_threads: int = param(
        0, 'CPU threads of torch; 0: half the CPUs the process may use (at least 1), so the '
        'robot-side nodes stay fed.', min=0, max=256)
    cameras: list[int] = param([], 'Indices into Observation.images of the views to train '
                               'on, in order; empty = all.')
    image_size: int = param(0, 'Resize images to this square size (px); 0 keeps them (a '
                            'policy that takes only its own size, transformers_vla, gets '
                            'its image_size).',
                            min=0)
    demos_dir: str = param('', 'Folder of demonstration bags (one rosbag2 folder each), '
                           'added to every round as D_SFT; empty = none.')
    seed: int = param(0, 'Seed of the minibatch sampling.', min=0)
    device: str = param('cpu', "Torch device for training, e.g. 'cpu' or 'cuda'.")
    nproc: int = param(
        1, 'Processes a round trains in: above 1 each round runs data-parallel under '
        'torchrun --nproc-per-node nproc (DDP: gloo on cpu, NCCL on cuda, one GPU per '
        'process; habc_learner.round_worker); the node stays the only publisher of '
        'PolicyUpdate. Optimizer moments then start afresh every round.', min=1, max=64)
    signing_key: str = param(DEFAULT_SIGNING_KEY, 'Ed25519 private key that signs every '
                             'PolicyUpdate (policy nodes apply only signed ones). Created with '
                             'its .pub beside it on the first start when missing.')
    policy_name: str = param(DEFAULT_POLICY_NAME, 'Name of the policy the updates are for '
                             "(the policy nodes' policy_name).")

    def __post_init__(self) -> None:
        for name in ('cameras', 'index_paths'):
            if getattr(self, name) is None:
                # declare_node_parameters reads an empty-list default without an override
                # back as None (rclpy declares it by type only); None means the default here.
                object.__setattr__(self, name, [])
        validate_params(self)
        stores = [store_key(path) for path in self.index_paths]
        repeated = sorted({key for key in stores if stores.count(key) > 1})
        if repeated:
            raise ValueError(f'parameter index_paths names {repeated} more than once; each '
                             'robot store once')
        if any(c < 0 for c in self.cameras):
            raise ValueError(f'parameter cameras of LearnerParams must hold indices >= 0, got '
                             f'{self.cameras}')


    def store_paths(self) -> list[Path]:
        """Return the episode indices the learner reads (index_paths, else index_path)."""
        return [expand_path(path) for path in (self.index_paths or [self.index_path])]


@dataclass(frozen=True)
class RoundResult:
    """What one training round produced."""

    version: PolicyVersion
    sha256: str
    path: Path
    metrics: dict[str, float]
    round: int
    episodes: int
    written_at: float


@dataclass
class _Entry:
    """One episode in the buffer, and where it came from."""

    episode: Episode
    outcome: str
    bag_path: str
    robot: str = ''
    store: str = ''


@dataclass
class _State:
    version: str = ''  # PolicyVersion text; '' before the first round: the init checkpoint's
    round: int = 0
    cursor: int = 0  # format 1 only: the cursor of index_path
    cursors: dict[str, int] = field(default_factory=dict)  # store_key -> label_seq
    checkpoint: str = ''
    sha256: str = ''
    trainer_step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    written_at: float = 0.0
    episodes: list[dict[str, str]] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    method: str = ''


class Learner:
    """Consume labelled episodes from an EpisodeIndex and train rounds on them."""

    def __init__(self, params: LearnerParams,
                 log: Callable[[str], None] | None = None) -> None:
        """Load the latest checkpoint (own after a restart, else `init_checkpoint`).

        Raises:
            ValueError: no state in work_dir and no init_checkpoint, a checkpoint that does
                not exist, or a state file that cannot be used.
        """
        self.params = params
        self._log = log or (lambda message: None)
        self.work_dir = expand_path(params.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.work_dir / STATE_FILE
        state = self._read_state()
        if state is None:
            if not params.init_checkpoint:
                raise ValueError(f'no learner state in {self.work_dir} and no init_checkpoint: '
                                 'set init_checkpoint to the SFT checkpoint folder')
            # `lerobot:PATH` names a LeRobot policy folder, as for the policy node and `habc
            # train --init`: the folder is PATH, the prefix only tells load_policy its format.
            explicit = params.init_checkpoint.startswith(LEROBOT_PREFIX)
            checkpoint = expand_path(params.init_checkpoint.removeprefix(LEROBOT_PREFIX))
            state = _State(checkpoint=str(checkpoint), method=params.method)
            self._resumed = False
        else:
            explicit = False
            checkpoint = self.work_dir / state.checkpoint
            self._resumed = True
            if state.method != params.method:
                self._log(f'method changed from {state.method!r} to {params.method!r}: the '
                          'critic starts afresh')
        try:
            self.policy = load_policy(f'{LEROBOT_PREFIX}{checkpoint}' if explicit else checkpoint,
                                      map_location=params.device)
        except FileNotFoundError as exc:
            raise ValueError(f'cannot start from checkpoint {checkpoint}: {exc}') from exc
        if not state.sha256:
            state.sha256 = sha256_file(checkpoint / WEIGHTS_FILE)
        self.version = PolicyVersion.parse(state.version or self.policy.version)
        self._clean_checkpoints(self.version)
        self.round = state.round
        # One label cursor per store; a format-1 state's single cursor was index_path's.
        self.cursors: dict[str, int] = dict(state.cursors)
        if state.cursor and not state.cursors:
            self.cursors[store_key(params.index_path)] = state.cursor
        # Per store: why it could not be read at the last poll (cleared once it reads).
        self.store_problems: dict[str, str] = {}
        self._new_by_robot: Counter[str] = Counter()
        self.sha256 = state.sha256
        self.checkpoint = checkpoint
        self.metrics = dict(state.metrics)
        self.written_at = state.written_at
        self.rejected: dict[str, str] = dict(state.rejected)
        # Episodes that left the buffer for max_episodes (since this start).
        self.evicted = 0
        self._trainer_step = state.trainer_step
        # A checkpoint this learner trained for this method: its critic and training state
        # go on (the SFT checkpoint's, or another method's, start afresh).
        self._own_checkpoint = (checkpoint if self._resumed and state.method == params.method
                                else None)
        self._to_restore = list(state.episodes)
        self.method_config = MethodConfig(method=params.method, horizon=self.policy.horizon,
                                          warmup_steps=params.warmup_steps,
                                          ir_start_step=params.steps_per_round)
        self.buffer = self.method_config.make_buffer()
        self._episodes: dict[str, _Entry] = {}
        self._demos: list[Episode] = []
        self._restored = False
        self._new_since_round = 0
        self._stalled = False
        self.trainer = None
        if self._resumed:
            self._log(f'resuming at version {self.version} (round {self.round}) from '
                      f'{checkpoint}; {len(self._to_restore)} episodes to reload')
        else:
            self._log(f'starting from {checkpoint} as version {self.version}')

    # --- state ------------------------------------------------------------------------------
    @property
    def resumed(self) -> bool:
        """Return True when this learner continued from its own state in work_dir."""
        return self._resumed

    @property
    def episode_ids(self) -> list[str]:
        """Return the ids of the rollout episodes in the buffer, in the order they came."""
        return list(self._episodes)

    @property
    def pending(self) -> int:
        """Return the new episodes since the last round."""
        return self._new_since_round

    def _read_state(self) -> _State | None:
        if not self.state_path.is_file():
            return None
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f'{self.state_path} is unreadable ({exc}); restore it or delete it '
                             'to start over from init_checkpoint') from exc
        if data.get('format') not in READABLE_STATE_FORMATS:
            raise ValueError(f'{self.state_path} has format {data.get("format")!r}, this code '
                             f'reads formats {list(READABLE_STATE_FORMATS)}')
        known = set(_State.__dataclass_fields__)
        state = _State(**{k: v for k, v in data.items() if k in known})
        if not (self.work_dir / state.checkpoint / 'model.safetensors').is_file():
            raise ValueError(f'{self.state_path} names checkpoint {state.checkpoint!r}, which '
                             f'is not in {self.work_dir}; restore it or delete the state file '
                             'to start over from init_checkpoint')
        return state

    def _state_dict(self, **changes: Any) -> dict[str, Any]:
        state = {
            'format': STATE_FORMAT,
            'version': str(self.version),
            'round': self.round,
            'cursors': self.cursors,
            'checkpoint': str(self.checkpoint),
            'sha256': self.sha256,
            'method': self.params.method,
            'trainer_step': self.trainer.step if self.trainer is not None else self._trainer_step,
            'metrics': self.metrics,
            'written_at': self.written_at,
            'episodes': [{'episode_id': episode_id, 'outcome': entry.outcome,
                          'bag_path': entry.bag_path, 'robot': entry.robot,
                          'store': entry.store}
                         for episode_id, entry in self._episodes.items()],
            'rejected': self.rejected,
        }
        state.update(changes)
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        scratch = self.state_path.with_name(self.state_path.name + '.tmp')
        with open(scratch, 'w') as stream:
            stream.write(json.dumps(state, indent=1, default=str) + '\n')
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(scratch, self.state_path)

    def _clean_checkpoints(self, version: PolicyVersion) -> None:
        """Remove scratch folders and versions newer than the state (a round cut short)."""
        root = self.work_dir / CHECKPOINT_DIR
        if not root.is_dir():
            return
        for path in root.iterdir():
            stale = path.name.startswith('.') and path.name.endswith('.tmp')
            if path.name.startswith('v') and path.name[1:].isdigit():
                # Written by a round whose state never made it to disk: never published.
                stale = int(path.name[1:]) > version.number
            if stale and path.is_dir():
                self._log(f'removing {path}: left by a round that did not finish')
                shutil.rmtree(path)

    # --- episodes ---------------------------------------------------------------------------
    def poll(self, indexes: Any | Sequence[Any]) -> list[str]:
        """Take the label changes since each store's cursor; return the ids added.

        `indexes` is one EpisodeIndex or several (a fleet: one store per robot), each with
        its own cursor, so each episode is taken exactly once per label change, across
        restarts too. A store that cannot be read now is kept in `store_problems` and
        skipped; the others are read as usual (a robot that is down stalls nobody).
        The first call also rebuilds the buffer of a restarted learner (bags are read again).
        Episodes whose bag cannot be used are logged and kept in `rejected` with the reason;
        they are retried when they are labelled again.
        """
        indexes = [indexes] if not isinstance(indexes, Sequence) else list(indexes)
        if not self._restored:
            self._restore()
        added: list[str] = []
        rebuild = False
        for index in indexes:
            key = store_key(index.path)
            try:
                records = index.labelled_since(self.cursors.get(key, 0), trainable_only=False)
            except Exception as exc:  # noqa: BLE001 - one robot's store must not stop the rest
                reason = f'{type(exc).__name__}: {exc}'
                if self.store_problems.get(key) != reason:
                    self._log(f'episode store {index.path} unreadable, skipped: {reason}')
                self.store_problems[key] = reason
                continue
            self.store_problems.pop(key, None)
            for record in records:
                self.cursors[key] = max(self.cursors.get(key, 0), int(record.label_seq or 0))
                changed, new = self._take(record, index, key)
                rebuild = rebuild or changed
                if new:
                    added.append(record.episode_id)
        cap = self.params.max_episodes
        if cap and len(self._episodes) > cap:
            # Insertion order is arrival order: the oldest leave first.
            for episode_id in list(self._episodes)[:len(self._episodes) - cap]:
                del self._episodes[episode_id]
                self.evicted += 1
            rebuild = True
        if rebuild:
            self._rebuild_buffer()
        if added:
            self._new_since_round += len(added)
            self._stalled = False
        return added

    def _take(self, record: Any, index: Any, key: str) -> tuple[bool, bool]:
        """Apply one label change of store `key`; return (buffer to rebuild, episode added)."""
        episode_id = record.episode_id
        entry = self._episodes.get(episode_id)
        if entry is not None and entry.store and entry.store != key:
            # Ids carry the robot and its clock: the same id in two stores is a copied store.
            self._log(f'episode {episode_id} of {index.path} is already in the buffer from '
                      f'{entry.store}: ignored (copied stores hold the same episodes)')
            return False, False
        if not record.trainable:
            if entry is None:
                return False, False
            del self._episodes[episode_id]
            self._log(f'episode {episode_id} is now {record.outcome} ({record.status}): '
                      'removed from the buffer')
            return True, False
        if entry is not None:
            if entry.outcome == record.outcome:
                return False, False
            self._log(f'episode {episode_id} relabelled {entry.outcome} -> {record.outcome}')
            entry.outcome = record.outcome
            entry.episode = replace(entry.episode, outcome=record.outcome)
            return True, False
        bag_path = _resolve_bag(record.bag_path, Path(index.path))
        try:
            episode = self._load(bag_path, record.outcome, episode_id, record.instruction)
        except Exception as exc:  # noqa: BLE001 - one bad bag must not stop the learner
            reason = f'{type(exc).__name__}: {exc}'
            if record.status == EpisodeStatus.INCOMPLETE.label:
                reason += (' (its recording was cut short: habc_episodes.recovery.'
                           'recover_bag rescues such a bag)')
            self.rejected[episode_id] = reason
            self._log(f'episode {episode_id} skipped: {reason}')
            return False, False
        self.rejected.pop(episode_id, None)
        # Rows always name their robot since the recorder writes them; a hand-made one
        # without counts as the robot of its store's folder.
        robot = record.robot or Path(index.path).parent.name
        self._episodes[episode_id] = _Entry(episode, record.outcome, str(bag_path), robot, key)
        self.buffer.add(episode)
        self._new_by_robot[robot] += 1
        self._log(f'episode {episode_id} added ({record.outcome}, {len(episode)} steps, '
                  f'{episode.num_interventions} interventions, robot {robot})')
        return False, True

    def ready(self) -> bool:
        """Return True when enough new episodes arrived for a round."""
        return (self._restored and not self._stalled
                and self._new_since_round >= self.params.episodes_per_round
                and len(self.buffer) > 0)

    def _restore(self) -> None:
        if self.params.demos_dir:
            self._demos = self._load_demos(expand_path(self.params.demos_dir))
        for item in self._to_restore:
            episode_id, outcome = item['episode_id'], item['outcome']
            try:
                episode = self._load(Path(item['bag_path']), outcome, episode_id, '')
            except Exception as exc:  # noqa: BLE001 - the rest of the buffer is still good
                reason = f'{type(exc).__name__}: {exc}'
                self.rejected[episode_id] = reason
                self._log(f'episode {episode_id} could not be reloaded, dropped: {reason}')
                continue
            self._episodes[episode_id] = _Entry(episode, outcome, item['bag_path'],
                                                item.get('robot', ''), item.get('store', ''))
        self._to_restore = []
        self._rebuild_buffer()
        self._restored = True
        if self._episodes or self._demos:
            self._log(f'buffer: {len(self._episodes)} episodes, {len(self._demos)} '
                      f'demonstrations, {len(self.buffer)} samples')

    def _rebuild_buffer(self) -> None:
        self.buffer = self.method_config.make_buffer()
        for episode in self._demos:
            self.buffer.add(episode)
        for entry in self._episodes.values():
            self.buffer.add(entry.episode)
        if self.trainer is not None:
            self.trainer.buffer = self.buffer

    def _load_demos(self, directory: Path) -> list[Episode]:
        if not directory.is_dir():
            raise ValueError(f'demos_dir {directory} is not a folder')
        demos = []
        for bag in sorted(p for p in directory.iterdir() if (p / 'metadata.yaml').is_file()):
            try:
                demos.append(self._load(bag, Outcome.SUCCESS, f'demo-{bag.name}', '',
                                        kind=EpisodeKind.DEMO))
            except Exception as exc:  # noqa: BLE001 - the other demonstrations still count
                self._log(f'demonstration {bag} skipped: {type(exc).__name__}: {exc}')
        self._log(f'{len(demos)} demonstrations from {directory}')
        return demos

    def _load(self, bag_path: Path, outcome: str | Outcome, episode_id: str, instruction: str,
              kind: EpisodeKind = EpisodeKind.ROLLOUT) -> Episode:
        p = self.params
        image_size = p.image_size or None
        if image_size is None and self.policy.exact_image_size:
            # A policy that takes only its own size (a pretrained vision tower's policy) gets
            # the recorded images resized to it, as the policy node does at run time.
            image_size = self.policy.config.image_size
        episode = episode_from_bag(bag_path, outcome, cameras=p.cameras or None,
                                   image_size=image_size, episode_id=episode_id, kind=kind)
        if not episode.instruction:
            episode.instruction = instruction
        # Not the image size: with image_size 0 the learner keeps the recorded size on purpose
        # (fit_problems still checks it for a policy that takes only its own size).
        problems = fit_problems(episode, self.policy, cameras='the cameras parameter',
                                check_image_size=False)
        if problems:
            raise ValueError(f'episode {episode.episode_id} does not fit the policy: '
                             + '; '.join(problems))
        return episode

    # --- training ---------------------------------------------------------------------------
    def _make_trainer(self):
        from habc_learner.trainer import TrainConfig, Trainer

        p = self.params
        train = TrainConfig(steps=p.steps_per_round, batch_size=p.batch_size,
                            actor_lr=p.actor_lr, critic_lr=p.critic_lr,
                            seed=p.seed + self.round, log_every=min(50, p.steps_per_round),
                            device=p.device, normalize_from_data=False)
        trainer = Trainer(self.policy, self.buffer, self.method_config, train,
                          log_dir=self.work_dir / 'tensorboard', progress=False)
        trainer.step = self._trainer_step
        if self._own_checkpoint is not None:
            trainer.resume_from(self._own_checkpoint, self._log)
        return trainer

    def train_round(self, on_progress: Callable[[int, int, dict[str, float]], None]
                    | None = None) -> RoundResult:
        """Run one round of `steps_per_round` gradient steps and write the next version.

        `on_progress(step, steps, metrics)` is called at every logged step of the round.
        A round that raises changes no version and no state file; the learner then waits for
        a new episode before it tries again.
        """
        if not self._restored:
            raise RuntimeError('poll() the index before training')
        p = self.params
        target, round_index = PolicyVersion(self.version.number + 1), self.round + 1
        try:
            if p.nproc > 1:
                return self._finish_round(*self._train_distributed(target, on_progress),
                                          target, round_index)
            if self.trainer is None:
                self.trainer = self._make_trainer()
            self.trainer.buffer = self.buffer
            start = self.trainer.step
            self._log(f'round {round_index}: training version {target} on '
                      f'{len(self._episodes)} episodes ({self._new_since_round} new, '
                      f'{len(self._demos)} demonstrations, {len(self.buffer)} samples), '
                      f'{p.steps_per_round} steps')

            def report(summary: dict[str, float]) -> None:
                done = int(summary['step']) - start
                losses = ', '.join(f'{k.split("/")[-1]} {v:.4g}' for k, v in summary.items()
                                   if k.startswith('losses/') and not k.endswith('grad_norm'))
                self._log(f'round {round_index}: step {done}/{p.steps_per_round}: {losses}')
                if on_progress is not None:
                    on_progress(done, p.steps_per_round, summary)

            started = time.monotonic()
            metrics = self.trainer.fit(p.steps_per_round, on_log=report)
            directory, sha = self._write_checkpoint(target)
            metrics = {k: float(v) for k, v in metrics.items()}
            metrics['round/seconds'] = time.monotonic() - started
            return self._finish_round(directory, sha, metrics, target, round_index)
        except BaseException:
            self._stalled = True
            raise

    def _finish_round(self, directory: Path, sha: str, metrics: dict[str, float],
                      target: PolicyVersion, round_index: int) -> RoundResult:
        """Record a round whose checkpoint is in place: state file first, then this object."""
        metrics['round/samples'] = float(len(self.buffer))
        metrics.update(self.episode_metrics())
        written_at = time.time()
        # The state goes to disk before this object changes: if writing it fails, the
        # round never happened (and the unpublished folder is overwritten next time).
        self._write_state(self._state_dict(
            version=str(target), round=round_index, checkpoint=str(directory.relative_to(
                self.work_dir)), sha256=sha, metrics=metrics, written_at=written_at))
        self.version, self.round = target, round_index
        self.sha256, self.checkpoint, self.metrics = sha, directory, metrics
        self.written_at = written_at
        self._new_since_round = 0
        self._new_by_robot.clear()
        self._log(f'round {round_index}: version {target} written to {directory} '
                  f'(sha256 {sha[:12]}..., {metrics["round/seconds"]:.1f} s)')
        return RoundResult(target, sha, directory, metrics, round_index, len(self._episodes),
                           written_at)

    def _train_distributed(self, target: PolicyVersion,
                           on_progress: Callable[[int, int, dict[str, float]], None] | None
                           ) -> tuple[Path, str, dict[str, float]]:
        """Train the round in `nproc` torchrun processes; return (folder, sha256, metrics).

        The processes start from the current checkpoint (policy and critic) and read the
        buffer's bags again; rank 0 writes the checkpoint, which is renamed into place here.
        """
        from dataclasses import asdict

        from habc_learner.round_worker import run_round
        from habc_learner.trainer import TrainConfig

        p = self.params
        root = self.work_dir / CHECKPOINT_DIR
        root.mkdir(parents=True, exist_ok=True)
        final, scratch = root / f'v{target.number}', root / f'.v{target.number}.tmp'
        train = TrainConfig(steps=p.steps_per_round, batch_size=p.batch_size,
                            actor_lr=p.actor_lr, critic_lr=p.critic_lr,
                            seed=p.seed + self.round, log_every=min(50, p.steps_per_round),
                            device=p.device, normalize_from_data=False)
        carried = [name for name in (CRITIC_FILE, TRAINER_STATE_FILE)
                   if (self.checkpoint / name).is_file()]
        spec = {'init_checkpoint': str(self.checkpoint),
                'episodes': [{'bag_path': entry.bag_path, 'outcome': entry.outcome,
                              'episode_id': episode_id,
                              'instruction': entry.episode.instruction}
                             for episode_id, entry in self._episodes.items()],
                'demos_dir': str(expand_path(p.demos_dir)) if p.demos_dir else '',
                'cameras': list(p.cameras), 'image_size': p.image_size,
                'method': asdict(self.method_config), 'train': asdict(train),
                'start_step': self._trainer_step, 'output': str(scratch),
                'version': str(target), 'log_dir': str(self.work_dir / 'tensorboard')}
        if carried and self._own_checkpoint is None:
            # As in-process: the round's processes go on only from this learner's own.
            spec['init_checkpoint'] = str(self._without_training_state(scratch, carried))
        self._log(f'round {self.round + 1}: training version {target} in {p.nproc} torchrun '
                  f'processes on {len(self._episodes)} episodes ({self._new_since_round} new)')
        started = time.monotonic()
        try:
            result = run_round(spec, p.nproc, self.work_dir / 'round', self._log)
        finally:
            if spec['init_checkpoint'] != str(self.checkpoint):
                shutil.rmtree(spec['init_checkpoint'], ignore_errors=True)
        seconds = time.monotonic() - started
        if final.exists():
            shutil.rmtree(final)  # left by a round whose state was never written
        os.replace(scratch, final)
        self._trainer_step = int(result['step'])
        self._own_checkpoint = final
        metrics = {k: float(v) for k, v in result['metrics'].items()}
        metrics['round/seconds'] = seconds
        metrics['round/processes'] = float(result['world_size'])
        if on_progress is not None:
            on_progress(p.steps_per_round, p.steps_per_round, metrics)
        return final, result['sha256'], metrics

    def _without_training_state(self, scratch: Path, names: list[str]) -> Path:
        # A copy of the start checkpoint without the files `names` (its critic, its trainer
        # state), beside the round's output (a scratch name: a kill leaves it to
        # _clean_checkpoints).
        folder = scratch.with_name(scratch.name.removesuffix('.tmp') + '.init.tmp')
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(self.checkpoint, folder, ignore=shutil.ignore_patterns(*names))
        return folder

    def _write_checkpoint(self, version: PolicyVersion) -> tuple[Path, str]:
        root = self.work_dir / CHECKPOINT_DIR
        final = root / f'v{version.number}'
        scratch = root / f'.v{version.number}.tmp'
        if scratch.exists():
            shutil.rmtree(scratch)
        info = self.trainer.save_checkpoint(scratch, version=version)
        if final.exists():
            shutil.rmtree(final)  # left by a round whose state was never written
        os.replace(scratch, final)
        return final, info['sha256']

    # --- reporting --------------------------------------------------------------------------
    def episode_metrics(self) -> dict[str, float]:
        """Per-robot and pooled statistics of the buffer's episodes, for the round's metrics.

        `robot/<robot>/...` and `round/...`: episodes, the new ones since the last round,
        success rate and interventions per episode.
        """
        groups: dict[str, list[_Entry]] = {}
        for entry in self._episodes.values():
            groups.setdefault(entry.robot or 'unknown', []).append(entry)
        metrics: dict[str, float] = {}
        for prefix, entries, new in (
                [('round', list(self._episodes.values()), sum(self._new_by_robot.values()))]
                + [(f'robot/{robot}', entries, self._new_by_robot[robot])
                   for robot, entries in sorted(groups.items())]):
            count = len(entries)
            metrics[f'{prefix}/episodes'] = float(count)
            metrics[f'{prefix}/new_episodes'] = float(new)
            if count:
                metrics[f'{prefix}/success_rate'] = sum(
                    entry.outcome == Outcome.SUCCESS.label for entry in entries) / count
                metrics[f'{prefix}/interventions_per_episode'] = sum(
                    entry.episode.num_interventions for entry in entries) / count
        metrics['round/robots'] = float(len(groups))
        return metrics

    def status(self, state: str = 'idle', **extra: Any) -> dict[str, Any]:
        """Return the learner's status as a JSON-ready dict ('idle' or 'training')."""
        return {'state': state, 'version': str(self.version), 'round': self.round,
                'episodes': len(self._episodes), 'pending': self._new_since_round,
                'episodes_per_round': self.params.episodes_per_round,
                'demos': len(self._demos), 'samples': len(self.buffer),
                'rejected': len(self.rejected), 'evicted': self.evicted,
                'robots': dict(Counter(entry.robot for entry in self._episodes.values())),
                'stores': {key: {'cursor': self.cursors.get(key, 0),
                                 'problem': self.store_problems.get(key, '')}
                           for key in sorted(set(self.cursors) | set(self.store_problems))},
                'method': self.params.method,
                'sha256': self.sha256, 'checkpoint': str(self.checkpoint),
                'metrics': self.metrics, **extra}

    def latest(self) -> RoundResult | None:
        """Return the newest version this learner wrote (None before its first round)."""
        if self.round == 0:
            return None
        return RoundResult(self.version, self.sha256, self.checkpoint, self.metrics,
                           self.round, len(self._episodes) + len(self._to_restore),
                           self.written_at)


def has_state(work_dir: str) -> bool:
    """Return True when `work_dir` holds a learner state: a restart needs no checkpoint."""
    return (expand_path(work_dir) / STATE_FILE).is_file()


def store_key(path: str | Path) -> str:
    """Return the name a store's cursor is kept under: its index file, absolute."""
    return str(expand_path(str(path)))


def expand_path(path: str) -> Path:
    """Return an absolute path with ~ and $VARIABLES expanded (as the recorder does)."""
    return Path(os.path.expandvars(os.path.expanduser(path))).resolve()


def _resolve_bag(bag_path: str, index_path: Path) -> Path:
    """Return the bag folder; a relative path is tried beside the index, then as given."""
    path = Path(bag_path).expanduser()
    if path.is_absolute():
        return path
    beside = index_path.parent / path
    return beside if beside.exists() else path.resolve()
