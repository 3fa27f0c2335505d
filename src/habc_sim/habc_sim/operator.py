"""The scripted operator: a stand-in for the human who watches the robot and takes over.

It watches a policy episode through the privileged simulator state. When a detector fires
(the robot stalls, drops the object, or pushes it away with a bad approach) it takes over,
after a reaction delay and only with some probability (the paper's operator intervened on
about half of the failures), and completes the task with the scripted expert. Once the
expert has made progress it sometimes hands control back to the policy. At the end it
labels the outcome. Episodes therefore come out mixed the way real ones do: pure policy,
policy -> human, and policy -> human -> policy.

It watches in one of two ways (`OperatorConfig.watch`):
  continuous  every step, as a person who does nothing but watch this robot;
  on_request  only while the robot asks for help (habc_policy.help_request), plus
              spontaneous checks at a low rate. Asked (`answer`), the person either comes
              over and takes over (take_over: after the same reaction delay, with
              `answer_probability`, deciding once per request), or watches the robot
              while the request is open and judges with the continuous watcher's
              detectors (judge). A spontaneous check judges the same way. The stall
              window counts watched steps only (a glance cannot tell a stall). The skill
              (the expert driving a takeover) and the hand-back are the same.
`attention_steps` counts the steps the operator spent watching or driving.

This core knows nothing about ROS; the simulation benchmark calls it in-process and the
ROS scripted_operator_node drives the same logic through the teleop topics.
"""

from dataclasses import dataclass, field
import enum

import numpy as np

from habc_episodes.vocabulary import Controller, Outcome


class Detector(enum.StrEnum):
    STALL = 'stall'
    DROP = 'drop'
    BAD_APPROACH = 'bad_approach'


class Watch(enum.StrEnum):
    """How the operator watches the robot (module docstring)."""

    CONTINUOUS = 'continuous'
    ON_REQUEST = 'on_request'


class Answer(enum.StrEnum):
    """What the on-request operator does when asked (module docstring)."""

    TAKE_OVER = 'take_over'   # trusts the robot: takes over after the reaction delay
    JUDGE = 'judge'           # watches while the request is open, with the detectors


# Why a takeover happened, besides a detector's name: the robot asked for help.
HELP_REQUEST = 'help_request'


@dataclass(frozen=True)
class OperatorConfig:
    """How the scripted operator watches, reacts and hands back."""

    detectors: tuple[str, ...] = ('stall', 'drop', 'bad_approach')
    stall_steps: int = 50              # no progress for this long counts as a stall
    stall_progress: float = 0.02       # m: approach or object motion that counts as progress
    push_distance: float = 0.03        # m: object pushed this far before any grasp
    lifted_height: float = 0.07        # m: object centre above this counts as lifted
    reaction_delay_steps: int = 10     # 0.2 s at 50 Hz
    takeover_probability: float = 0.5
    handback_probability: float = 0.3  # per takeover: hand back once the object is in hand
    handback_min_steps: int = 30       # human control at least this long before handing back
    max_takeovers: int = 2
    objects: tuple[str, ...] = field(default=('box',))
    watch: str = Watch.CONTINUOUS
    answer: str = Answer.TAKE_OVER     # on_request: what the operator does when asked
    answer_probability: float = 1.0    # on_request, take_over: take over when asked
    check_rate_hz: float = 0.0         # on_request: spontaneous checks per second (Poisson)
    check_steps: int = 50              # on_request: how long a spontaneous check watches
    step_s: float = 0.02               # one control step (s): converts check_rate_hz

    def __post_init__(self) -> None:
        unknown = [d for d in self.detectors if d not in Detector.__members__.values()]
        if unknown:
            raise ValueError(f'unknown detector(s) {unknown}; choose from '
                             f'{[d.value for d in Detector]}')
        if self.watch not in Watch.__members__.values():
            raise ValueError(f'OperatorConfig.watch must be one of {[w.value for w in Watch]}, '
                             f'got {self.watch!r}')
        if self.answer not in Answer.__members__.values():
            raise ValueError(f'OperatorConfig.answer must be one of '
                             f'{[a.value for a in Answer]}, got {self.answer!r}')
        if self.check_rate_hz < 0 or self.check_steps < 1 or self.step_s <= 0:
            raise ValueError('OperatorConfig: check_rate_hz >= 0, check_steps >= 1 and '
                             'step_s > 0')
        for name in ('takeover_probability', 'handback_probability', 'answer_probability'):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f'OperatorConfig.{name} must be in [0, 1]')
        if min(self.stall_steps, self.reaction_delay_steps + 1, self.max_takeovers + 1) < 1:
            raise ValueError('OperatorConfig step counts must be >= 0')


class ScriptedOperator:
    """Decides, step by step, who controls the robot: the policy or the (scripted) human."""

    def __init__(self, config: OperatorConfig, rng: np.random.Generator) -> None:
        self.config = config
        self.rng = rng
        self.reset({})

    def reset(self, privileged: dict) -> None:
        """Start watching a new episode from its initial privileged state."""
        self.controller = Controller.POLICY
        self.takeovers = 0
        self.pending_takeover: int | None = None
        self.human_since: int | None = None
        self.will_hand_back = False
        self.declined: set[str] = set()
        self.fired: list[tuple[int, str, bool]] = []     # (step, detector, acted on it)
        self.causes: list[str] = []     # per takeover: the detector, or HELP_REQUEST
        self.attention_steps = 0        # steps spent watching or driving
        self.requests_seen = 0          # help requests the operator came to
        self._pending_cause = ''
        self._request_since: int | None = None
        self._request_decided = False
        self._check_until = -1
        self._attending = False
        self._start = {name: np.asarray(privileged.get(f'{name}_pos', np.zeros(3)))
                       for name in self.config.objects}
        self._was_lifted = dict.fromkeys(self.config.objects, False)
        self._history: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        self._calls = 0

    def detect(self, privileged: dict, t: int | None = None) -> str | None:
        """Return the first detector that fires on this state (at step t), if any.

        The stall window spans `stall_steps` control steps of t, not calls: a watcher that
        sees only some ticks (a ROS operator under load) judges the same time span. Without
        t, each call counts as one step.
        """
        c = self.config
        if t is None:
            t = self._calls
        self._calls += 1
        objects = np.stack([privileged[f'{name}_pos'] for name in c.objects])
        # Distance of each object to its nearest gripper: falls while the robot approaches.
        grippers = np.stack([privileged['left_gripper_pos'], privileged['right_gripper_pos']])
        reach = np.linalg.norm(objects[:, None] - grippers[None], axis=-1).min(axis=1)
        self._history.append((t, int(privileged['stage']), objects, reach))
        window_start = t - (c.stall_steps - 1)
        while len(self._history) > 1 and self._history[1][0] <= window_start:
            self._history.pop(0)
        for index, name in enumerate(c.objects):
            z = float(objects[index][2])
            if z > c.lifted_height:
                self._was_lifted[name] = True
            if (Detector.DROP in c.detectors and self._was_lifted[name]
                    and z < c.lifted_height - 0.02 and not privileged['strict_success']):
                return Detector.DROP
            pushed = np.linalg.norm(objects[index][:2] - self._start[name][:2])
            if (Detector.BAD_APPROACH in c.detectors and not self._was_lifted[name]
                    and pushed > c.push_distance):
                return Detector.BAD_APPROACH
        if (Detector.STALL in c.detectors and self._history[0][0] <= window_start
                and not privileged['strict_success']):
            _, first_stage, first_objects, first_reach = self._history[0]
            moved = np.linalg.norm(objects - first_objects, axis=-1).max()
            approached = (first_reach - reach).max()
            if (privileged['stage'] <= first_stage and moved < c.stall_progress
                    and approached < c.stall_progress):
                return Detector.STALL
        return None

    def step(self, t: int, privileged: dict,
             help_requested: bool = False) -> tuple[Controller, bool]:
        """Who controls step t, and whether control switched to the human on this step.

        `help_requested`: the robot's help request is open at step t (on_request watching).
        """
        c = self.config
        took_over = False
        if self.controller == Controller.POLICY:
            if self.pending_takeover is not None and t >= self.pending_takeover:
                self._take_over(t, self._pending_cause)
                took_over = True
            elif self.pending_takeover is None and self.takeovers < c.max_takeovers:
                if c.watch == Watch.CONTINUOUS:
                    self.attention_steps += 1
                    self._watch(t, privileged)
                elif self._answer_request(t, help_requested):
                    self._take_over(t, HELP_REQUEST)
                    took_over = True
                elif self._attend(t, help_requested):
                    asked = help_requested and c.answer == Answer.JUDGE
                    self._watch(t, privileged, HELP_REQUEST if asked else '')
            elif c.watch == Watch.CONTINUOUS or self.pending_takeover is not None:
                self.attention_steps += 1  # a reaction under way; or watching all along
        else:
            self.attention_steps += 1
            if (self.will_hand_back and t - self.human_since >= c.handback_min_steps
                    and self._progress(privileged)):
                self.controller = Controller.POLICY
                self.human_since = None
                self._history = []
                self._attending = False
        return self.controller, took_over

    def _take_over(self, t: int, cause: str) -> None:
        self.controller = Controller.HUMAN
        self.pending_takeover = None
        self.human_since = t
        self.takeovers += 1
        self.causes.append(cause)
        self.attention_steps += 1
        self.will_hand_back = bool(self.rng.random() < self.config.handback_probability)

    def _watch(self, t: int, privileged: dict, cause: str = '') -> None:
        # Run the detectors on this step; one that fires may schedule a takeover (whose
        # cause is `cause` when given: the robot asked, the detector confirmed).
        c = self.config
        detector = self.detect(privileged, t)
        if detector is not None and detector not in self.declined:
            act = bool(self.rng.random() < c.takeover_probability)
            self.fired.append((t, str(detector), act))
            if act:
                self.pending_takeover = t + c.reaction_delay_steps
                self._pending_cause = cause or str(detector)
            else:
                # A person who decided to let this one go does not keep reconsidering.
                self.declined.add(detector)

    def _answer_request(self, t: int, help_requested: bool) -> bool:
        # On request: the person arrives `reaction_delay_steps` after the request opened and
        # takes over with answer_probability (once per request).
        if not help_requested:
            self._request_since, self._request_decided = None, False
            return False
        if self._request_since is None:
            self._request_since = t
            self.requests_seen += 1
        if self.config.answer == Answer.JUDGE:
            return False  # watched with the detectors instead (_attend)
        if self._request_decided or t - self._request_since < self.config.reaction_delay_steps:
            return False
        self._request_decided = True
        return bool(self.rng.random() < self.config.answer_probability)

    def _attend(self, t: int, help_requested: bool) -> bool:
        # On request: count the steps spent coming to a request; return whether the
        # detectors watch step t: a spontaneous check, or (answer judge) an open request.
        # Answering take_over, a request is the request path's alone: the person decides on
        # it once, and a declined one is left alone.
        c = self.config
        if help_requested and c.answer == Answer.JUDGE:
            checking = True   # asked: watch with the detectors while the request is open
        elif help_requested and not self._request_decided:
            self.attention_steps += 1
            self._attending = False
            return False
        else:
            checking = self._checking(t, help_requested)
        if checking and not self._attending:
            self._history = []  # the stall window counts watched time only
        self._attending = checking
        if checking:
            self.attention_steps += 1
        return checking

    def _checking(self, t: int, help_requested: bool) -> bool:
        # Whether a spontaneous check (started now at check_rate_hz, or earlier) covers t;
        # none starts while a request is open.
        c = self.config
        if (not help_requested and t >= self._check_until and c.check_rate_hz > 0
                and self.rng.random() < c.check_rate_hz * c.step_s):
            self._check_until = t + c.check_steps
        return t < self._check_until

    def _progress(self, privileged: dict) -> bool:
        # Hand back only once the expert has the object in hand and lifted.
        return privileged['stage'] >= 2 and not privileged['strict_success']

    @staticmethod
    def label(success: bool) -> Outcome:
        """Return the outcome the operator reports for a finished episode."""
        return Outcome.SUCCESS if success else Outcome.FAILURE
