"""The scripted operator's episode loop, as the ROS node runs it (no rclpy).

A person at the robot does this, episode after episode: reset the scene (sim/reset), start
recording (recorder/episode_control START), watch the policy and take over when it goes
wrong (teleop/engage True, then drive the leader arm: teleop/joint_command), hand back
(teleop/engage False), and when the episode is over stop recording (END) and label it
(recorder/label_episode). Who takes over when is ScriptedOperator's decision; the driving is
the ScriptedExpert's, running on an ExpertMirror of the scene.

OperatorSession is that loop as a state machine. The node adapter feeds it robot ticks
(joint state and privileged state of one stamp, paired by StampPairer), the arbiter's
intervention state, the robot's help requests (habc_msgs/HelpRequest: watched with
`watch` 'on_request') and service responses, and performs what it asks for: the service
calls of `next_call` and the publications of each TickOutput. Nothing here reads a clock or
talks to DDS, so the tests drive whole episodes with injected ticks.
"""

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
import enum
from typing import Any, Protocol

import numpy as np

from habc_common.params import param, validate_params
from habc_episodes.vocabulary import Controller, Outcome
from habc_sim.aloha import DT, TASK_OBJECTS
from habc_sim.expert_mirror import ExpertMirror
from habc_sim.operator import (
    Answer,
    HELP_REQUEST,
    OperatorConfig,
    ScriptedOperator,
    Watch,
)

LABELER = 'scripted_operator'


@dataclass(frozen=True)
class ScriptedOperatorParams:
    """Parameters of scripted_operator_node."""

    episodes: int = param(0, 'Episodes to run before the node exits (0: run forever).', min=0)
    seed_base: int = param(0, 'Episode i resets the simulator with seed seed_base + i.', min=0)
    max_steps: int = param(
        300, 'End an episode (label it failure) after this many robot ticks since its reset; '
        'it also ends when sim/privileged reports truncated (the sim_robot max_steps).',
        min=1)
    watch: str = param(
        'continuous', "How the operator watches: 'continuous' (every tick, the detectors "
        "decide) or 'on_request' (only while the robot asks for help on help_request, plus "
        'spontaneous checks at check_rate_hz).', choices=tuple(w.value for w in Watch))
    takeover_probability: float = param(
        0.5, 'Probability of taking over when a detector (stall, drop, bad approach) fires.',
        min=0.0, max=1.0)
    answer: str = param(
        'take_over', "watch 'on_request': what the operator does when the robot asks: "
        "'take_over' (after reaction_delay_steps, with answer_probability) or 'judge' "
        '(watch with the detectors while the request is open; takeover_probability).',
        choices=tuple(a.value for a in Answer))
    answer_probability: float = param(
        1.0, "watch 'on_request', answer 'take_over': probability of taking over when the "
        'robot asks for help (reaction_delay_steps after the request opened; once per '
        'request).', min=0.0, max=1.0)
    check_rate_hz: float = param(
        0.0, "watch 'on_request': spontaneous checks per second of robot time (Poisson) "
        'while no request is open; a check runs the detectors for check_steps ticks. 0: '
        'the operator looks only when asked.', min=0.0, max=50.0)
    check_steps: int = param(
        50, "watch 'on_request': robot ticks one spontaneous check watches.", min=1,
        max=100000)
    reaction_delay_steps: int = param(
        10, "Robot ticks between a detection and the takeover (a person's reaction time).",
        min=0, max=10000)
    handback_probability: float = param(
        0.3, 'Probability, per takeover, of handing back to the policy once the object is '
        'in hand and lifted.', min=0.0, max=1.0)
    operator_seed: int = param(
        0, "Seed of the operator's random decisions; combined with the episode seed, so "
        'each episode is reproducible on its own.', min=0)
    wait_for_services_s: float = param(
        120.0, "Exit with an error when sim/reset, the recorder's services or the robot's "
        'topics are still missing, or the recorder still refuses to start an episode, after '
        'this long (s); 0 waits forever.', min=0.0)
    confirm_takeover_ticks: int = param(
        25, 'Press engage again when the arbiter has not switched to teleop this many ticks '
        'after a takeover (e.g. it refused an engage that came before the first teleop '
        'command); 0 never presses again.', min=0, max=10000)

    def __post_init__(self) -> None:
        validate_params(self)


class Phase(enum.StrEnum):
    """Where the operator is in its episode loop."""

    WAITING = 'waiting'     # for the services and the first robot tick
    RESET = 'reset'         # sim/reset called
    START = 'start'         # recorder START called
    RUNNING = 'running'     # watching (and sometimes driving) the episode
    END = 'end'             # recorder END called
    LABEL = 'label'         # recorder label called
    DONE = 'done'           # all episodes done, or a fatal error (see `fatal`)


class Service(enum.StrEnum):
    """The services the operator calls (the adapter maps them to clients)."""

    RESET = 'reset'
    START = 'start'
    END = 'end'
    ABORT = 'abort'
    LABEL = 'label'


@dataclass(frozen=True)
class Call:
    """One service call for the adapter to make."""

    service: Service
    seed: int = 0              # RESET
    episode_id: str = ''       # LABEL
    outcome: Outcome = Outcome.UNLABELLED  # LABEL
    note: str = ''             # LABEL


@dataclass(frozen=True)
class Tick:
    """One robot tick: joint positions (ALOHA order) and sim/privileged of the same stamp."""

    joints: np.ndarray
    privileged: dict


@dataclass(frozen=True)
class TickOutput:
    """What to publish for a tick, in order: each `engage` value, then `command` if any."""

    engage: tuple[bool, ...] = ()
    command: np.ndarray | None = None


NOTHING = TickOutput()


class Expert(Protocol):
    def replan(self) -> None: ...

    def act(self) -> np.ndarray: ...


def scripted_expert(mirror: ExpertMirror, seed: int) -> Expert:
    """Return the clean ScriptedExpert on the mirror (the session's default expert)."""
    from habc_sim.expert import ExpertConfig, ScriptedExpert
    return ScriptedExpert(mirror, ExpertConfig(), seed)


@dataclass
class EpisodeRecord:
    """What the operator did in one episode (logged, and kept for tests)."""

    seed: int
    episode_id: str = ''
    success: bool = False
    end_reason: str = ''
    steps: int = 0
    takeovers: int = 0
    human_ticks: int = 0
    detections: list = field(default_factory=list)
    recorded: bool = False     # END accepted
    labelled: bool = False     # label accepted
    # The episode broke (the simulator restarted under it): labelled discarded, so that
    # nothing trains on it.
    discarded: bool = False
    answered: list = field(default_factory=list)   # takeover steps that answered a request
    requests_seen: int = 0     # help requests the operator came to (watch 'on_request')
    attention_steps: int = 0   # ticks the operator watched or drove

    @property
    def outcome(self) -> Outcome:
        """Return the label the operator gives this episode."""
        return Outcome.DISCARDED if self.discarded else ScriptedOperator.label(self.success)

    def note(self) -> str:
        causes = sorted([(s, d) for s, d, acted in self.detections if acted]
                        + [(s, HELP_REQUEST) for s in self.answered])
        takeovers = ', '.join(f'{d} at {s}' for s, d in causes)
        return (f'seed {self.seed}; {self.end_reason} at step {self.steps}; '
                f'{self.takeovers} takeover(s){": " + takeovers if takeovers else ""}')


class StampPairer:
    """Pairs the joint state and the privileged state that one robot tick published.

    The two come on different topics, so either may arrive first; a tick is complete when
    both with the same stamp are here. Unmatched older messages are dropped (counted).
    """

    def __init__(self, depth: int = 20) -> None:
        self.depth = depth
        self.dropped = 0
        self._joints: OrderedDict[int, np.ndarray] = OrderedDict()
        self._privileged: OrderedDict[int, dict] = OrderedDict()

    def add_joints(self, stamp_ns: int, joints: np.ndarray) -> Tick | None:
        """Add a joint state; return the completed tick if its privileged state is here."""
        return self._add(stamp_ns, self._joints, joints, self._privileged, first=True)

    def add_privileged(self, stamp_ns: int, privileged: dict) -> Tick | None:
        """Add a privileged state; return the completed tick if its joint state is here."""
        return self._add(stamp_ns, self._privileged, privileged, self._joints, first=False)

    def _add(self, stamp: int, mine: OrderedDict, value: Any, other: OrderedDict,
             first: bool) -> Tick | None:
        if stamp in other:
            match = other.pop(stamp)
            # Everything older can no longer be completed: both topics arrive in order.
            for buffer in (mine, other):
                for old in [s for s in buffer if s < stamp]:
                    del buffer[old]
                    self.dropped += 1
            return Tick(value, match) if first else Tick(match, value)
        mine[stamp] = value
        while len(mine) > self.depth:
            mine.popitem(last=False)
            self.dropped += 1
        return None


class OperatorSession:
    """The scripted operator's loop over episodes (see the module docstring)."""

    def __init__(self, params: ScriptedOperatorParams,
                 log: Callable[[str, str], None] | None = None,
                 mirror_factory: Callable[[str], Any] = ExpertMirror,
                 expert_factory: Callable[[Any, int], Expert] = scripted_expert) -> None:
        """Create the session.

        Args:
            params: the node's parameters.
            log: log(level, text) with level 'info', 'warn' or 'error'.
            mirror_factory: task -> an ExpertMirror (or a stand-in with update_from_privileged
                and privileged()).
            expert_factory: (mirror, seed) -> an expert with replan() and act().
        """
        self.params = params
        self._log = log or (lambda level, text: None)
        self._mirror_factory = mirror_factory
        self._expert_factory = expert_factory
        self.phase = Phase.WAITING
        self.fatal = ''
        self.episode = 0                         # index of the current episode
        self.records: list[EpisodeRecord] = []   # finished episodes
        self.record: EpisodeRecord | None = None
        self.mirror = None
        self.operator: ScriptedOperator | None = None
        self.expert: Expert | None = None
        self.in_control = False                  # the operator drives (engage True)
        self.has_tick = False
        self._last_reset_count = -1
        self._stale_reset_count = -1             # ticks up to this reset are not ours
        self._stale_episode = ''                 # a recording left by a crashed operator
        self._pending = False                    # a service call is out
        self._retry_at: float | None = None
        self._refused_since: float | None = None   # the recorder refused a START since
        self._refusal_logged = ''
        self._waiting_since: float | None = None
        self._waiting_logged: tuple[float, tuple[str, ...]] | None = None
        self._arbiter_seen = False
        self._arbiter_human = False
        self._unconfirmed = 0
        self._repressed = False
        self._help: tuple[bool, int] = (False, -1)   # the newest request: active, stamp (ns)
        self._episode_start_ns = 0

    @property
    def seed(self) -> int:
        """Seed of the current episode."""
        return self.params.seed_base + self.episode

    @property
    def done(self) -> bool:
        return self.phase == Phase.DONE

    # --- waiting for the rest of the loop --------------------------------------------------
    def wait(self, missing: Sequence[str], now: float) -> bool:
        """Report what is still missing at `now` (s); return True once nothing is.

        `missing` lists the services (and topics) not yet available. A robot tick must have
        arrived too (the reset must know which ticks come before it). Logs what it waits for
        when that changes and every 10 s; gives up after wait_for_services_s.
        """
        if self.phase != Phase.WAITING:
            return True
        missing = tuple(missing) + (() if self.has_tick else
                                    ('a robot tick (joint_states + sim/privileged of one '
                                     'stamp, from sim_robot_node)',))
        if self._waiting_since is None:
            self._waiting_since = now
        if not missing:
            self._log('info', 'services and robot are up: starting episode 0')
            self.phase = Phase.RESET
            return True
        limit = self.params.wait_for_services_s
        if limit and now - self._waiting_since > limit:
            self._fail(f'gave up after {limit:g} s waiting for: {"; ".join(missing)}')
            return False
        if (self._waiting_logged is None or self._waiting_logged[1] != missing
                or now - self._waiting_logged[0] >= 10.0):
            self._waiting_logged = (now, missing)
            self._log('info', f'waiting for: {"; ".join(missing)}')
        return False

    # --- service calls ---------------------------------------------------------------------
    def next_call(self, now: float) -> Call | None:
        """Return the service call to make now, if any (one at a time)."""
        if self._pending or (self._retry_at is not None and now < self._retry_at):
            return None
        self._retry_at = None
        call = None
        if self.phase == Phase.RESET:
            # Ticks that carry this reset count or an older one came before our reset.
            self._stale_reset_count = self._last_reset_count
            call = Call(Service.RESET, seed=self.seed)
        elif self.phase == Phase.START and self._stale_episode:
            call = Call(Service.ABORT, episode_id=self._stale_episode)
        elif self.phase == Phase.START:
            call = Call(Service.START)
        elif self.phase == Phase.END:
            call = Call(Service.END)
        elif self.phase == Phase.LABEL:
            record = self.record
            call = Call(Service.LABEL, episode_id=record.episode_id,
                        outcome=record.outcome, note=record.note())
        self._pending = call is not None
        return call

    def on_response(self, call: Call, ok: bool, message: str = '', episode_id: str = '',
                    now: float = 0.0) -> None:
        """Feed the answer to `call` (ok False also for no answer in time)."""
        self._pending = False
        if call.service == Service.RESET:
            if not ok:
                self._fail(f'sim/reset with seed {call.seed} failed: {message}')
                return
            self.phase = Phase.START
        elif call.service == Service.ABORT:
            self._stale_episode = ''
            self._log('info' if ok else 'error',
                      f'episode {call.episode_id} aborted (discarded)' if ok
                      else f'could not abort episode {call.episode_id}: {message}')
        elif call.service == Service.START:
            if not ok and episode_id and self.record is None:
                # An episode is still recording that this operator never started: its
                # predecessor's, which crashed mid-episode. Nobody can label it: abort it.
                self._stale_episode = episode_id
                self._log('warn', f'episode {episode_id} is still recording from before this '
                          'operator started: aborting it (discarded), then starting anew')
                return
            if not ok:
                # A recorder that is not ready yet (its required topics are silent while the
                # loop starts up) refuses for a while: retry, up to wait_for_services_s.
                if self._refused_since is None:
                    self._refused_since = now
                limit = self.params.wait_for_services_s
                if limit and now - self._refused_since > limit:
                    self._fail(f'the recorder refused to start an episode for {limit:g} s: '
                               f'{message}')
                    return
                if self._refusal_logged != message:
                    self._refusal_logged = message
                    self._log('warn', f'the recorder did not start an episode ({message}); '
                              'trying again every 1 s')
                self._retry_at = now + 1.0
                return
            self._refused_since = None
            self._refusal_logged = ''
            self.record = EpisodeRecord(seed=self.seed, episode_id=episode_id)
            self.operator = None       # set up at the first tick of the episode
            self.phase = Phase.RUNNING
            self._log('info', f'episode {self.episode} ({episode_id}) started: seed '
                      f'{self.seed}')
        elif call.service == Service.END:
            self.record.recorded = ok
            if episode_id and not self.record.episode_id:
                self.record.episode_id = episode_id
            if not ok:
                self._log('error', f'the recorder did not end episode '
                          f'{self.record.episode_id}: {message}')
            self.phase = Phase.LABEL
        elif call.service == Service.LABEL:
            self.record.labelled = ok
            outcome = self.record.outcome.name.lower()
            if ok:
                self._log('info', f'episode {self.record.episode_id} labelled {outcome}: '
                          f'{self.record.note()}')
            else:
                self._log('error', f'label {outcome} of episode {self.record.episode_id} '
                          f'refused: {message}')
            self.records.append(self.record)
            self.record = None
            self.episode += 1
            if self.params.episodes and self.episode >= self.params.episodes:
                successes = sum(r.success for r in self.records)
                self._log('info', f'done: {self.episode} episodes, {successes} successes')
                self.phase = Phase.DONE
            else:
                self.phase = Phase.RESET

    def _fail(self, message: str) -> None:
        self.fatal = message
        self.phase = Phase.DONE
        self._log('error', message)

    # --- robot ticks -----------------------------------------------------------------------
    def on_intervention(self, human_active: bool) -> None:
        """Feed the arbiter's InterventionState (whether the human command is executed)."""
        self._arbiter_seen = True
        self._arbiter_human = bool(human_active)

    def on_help_request(self, active: bool, stamp_ns: int) -> None:
        """Feed the robot's newest help request (HelpRequest.active and its header stamp).

        Only a request stamped at or after the running episode's first tick counts: the
        topic is latched, so a request of an earlier episode (or an earlier run) may arrive.
        """
        self._help = (bool(active), int(stamp_ns))

    @property
    def help_requested(self) -> bool:
        """Whether the robot asks for help in the running episode (its newest request)."""
        active, stamp_ns = self._help
        return active and self.operator is not None and stamp_ns >= self._episode_start_ns

    def on_tick(self, tick: Tick) -> TickOutput:
        """Feed one robot tick; return what to publish on the teleop topics.

        Raises ValueError (or KeyError) for a malformed tick, which is then ignored.
        """
        privileged = tick.privileged
        self.has_tick = True
        reset_count = int(privileged.get('reset_count', 0))
        if reset_count < self._last_reset_count:
            # The count went back: a new simulator (restarted after a crash). The running
            # episode cannot go on: discard it, and reset the new one for the next.
            self._last_reset_count = reset_count
            self._stale_reset_count = min(self._stale_reset_count, reset_count - 1)
            if self.phase == Phase.RUNNING and self.record is not None:
                self.record.discarded = True
                return self._end_episode('the simulator restarted', False)
        self._last_reset_count = max(self._last_reset_count, reset_count)
        task = privileged.get('task')
        if task not in TASK_OBJECTS:
            raise ValueError(f'sim/privileged names unknown task {task!r}; expected one of '
                             f'{sorted(TASK_OBJECTS)}')
        if self.mirror is None or self.mirror.task != task:
            # Built at the first tick seen, before any episode: loading the scene takes a
            # moment that should not fall into a running episode.
            self.mirror = self._mirror_factory(task)
        if self.phase != Phase.RUNNING or not self._ours(privileged):
            return NOTHING
        self.mirror.update_from_privileged(tick.joints, privileged)
        state = self.mirror.privileged()
        step = int(privileged['step'])
        if self.operator is None:
            self._begin_episode(task, state, int(privileged.get('stamp_ns', 0)))
        record = self.record
        record.steps = step
        end = self._end_reason(privileged, step)
        if end:
            return self._end_episode(end, bool(privileged.get('success')))
        controller, took_over = self.operator.step(step, state, self.help_requested)
        record.takeovers = self.operator.takeovers
        record.detections = list(self.operator.fired)
        record.requests_seen = self.operator.requests_seen
        record.attention_steps = self.operator.attention_steps
        if took_over and self.operator.causes[-1] == HELP_REQUEST:
            record.answered.append(step)
        if controller != Controller.HUMAN:
            if not self.in_control:
                # Silent, like a released pedal: a steady stream of False would also undo a
                # takeover from another source (a dashboard button) at once.
                return NOTHING
            self._log('info', f'step {step}: handing back to the policy')
            self.in_control = False
            return TickOutput(engage=(False,))
        # Held True on every tick in control, as a pressed pedal: an arbiter that missed the
        # first one (started late) still sees it; only its changes act there.
        engage: tuple[bool, ...] = (True,)
        if not self.in_control:   # the takeover step
            cause = self.operator.causes[-1] if self.operator.causes else 'detector'
            self._log('info', f'step {step}: taking over ({cause})')
            self.expert.replan()
            self.in_control = True
            self._unconfirmed = 0
            self._repressed = False
        elif self._arbiter_seen and not self._arbiter_human:
            self._unconfirmed += 1
            limit = self.params.confirm_takeover_ticks
            if limit and self._unconfirmed >= limit:
                if not self._repressed:   # once per takeover: an e-stop would repeat it
                    self._log('warn', f'step {step}: the arbiter has not switched to teleop '
                              f'{limit} ticks after engage (refused, e-stop or watchdog); '
                              'pressing engage again')
                self._repressed = True
                engage = (False, True)
                self._unconfirmed = 0
        else:
            self._unconfirmed = 0
        record.human_ticks += 1
        return TickOutput(engage=engage, command=np.asarray(self.expert.act(), dtype=float))

    def _ours(self, privileged: dict) -> bool:
        """Whether a tick comes after this episode's reset (not one still in flight)."""
        return (int(privileged.get('reset_count', 0)) > self._stale_reset_count
                and int(privileged.get('seed', -1)) == self.seed)

    def _begin_episode(self, task: str, state: dict, start_ns: int) -> None:
        p = self.params
        # step_s: a sim tick is one physics control period of simulated time, whatever the
        # sim's wall rate; check_rate_hz is per second of that time.
        config = OperatorConfig(
            objects=TASK_OBJECTS[task], reaction_delay_steps=p.reaction_delay_steps,
            takeover_probability=p.takeover_probability,
            handback_probability=p.handback_probability, watch=p.watch, answer=p.answer,
            answer_probability=p.answer_probability, check_rate_hz=p.check_rate_hz,
            check_steps=p.check_steps, step_s=DT)
        self._episode_start_ns = start_ns
        rng = np.random.default_rng([self.params.operator_seed, self.seed])
        self.operator = ScriptedOperator(config, rng)
        self.operator.reset(state)
        self.expert = self._expert_factory(self.mirror, self.seed)
        self.in_control = False
        self._unconfirmed = 0

    def _end_reason(self, privileged: dict, step: int) -> str:
        if privileged.get('success'):
            return 'success'
        if privileged.get('failure'):
            return 'physics error' if privileged.get('physics_error') else 'failure'
        if privileged.get('truncated') or step >= self.params.max_steps:
            return 'time limit'
        return ''

    def _end_episode(self, reason: str, success: bool) -> TickOutput:
        self.record.success = success
        self.record.end_reason = reason
        record = self.record
        # Attention is what watching on request saves (the operator's counts, ScriptedOperator).
        self._log('info', f'episode {record.episode_id} over: {reason} at step {record.steps}; '
                  f'{record.attention_steps} ticks watched or driven, {record.requests_seen} '
                  f'help request(s) seen, {len(record.answered)} answered')
        self.phase = Phase.END
        # Hand back so that the policy drives the next episode from its start.
        engage = (False,) if self.in_control else ()
        self.in_control = False
        return TickOutput(engage=engage)
