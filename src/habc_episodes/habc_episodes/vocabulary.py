"""The words of an episode, each defined once: controller, outcome, status, policy version.

Integer values match the habc_msgs constants (InterventionState.SOURCE_*,
ExecutedAction.SOURCE_*, LabelEpisode.OUTCOME_*, EpisodeEvent.OUTCOME_*), so a message field
converts with `Controller(msg.source)` / `Outcome(msg.outcome)`. Text values (`.label`) are
the one spelling used in the episode index, on the command line, in CSV/sidecar labels and
on the dashboard: lower-case names ('policy', 'unlabelled', 'complete').
"""

from __future__ import annotations

from dataclasses import dataclass
import enum
import re


class _Labelled(enum.IntEnum):
    """An IntEnum whose members also have one lower-case text spelling."""

    @property
    def label(self) -> str:
        """The member's text spelling: its lower-case name."""
        return self.name.lower()

    @classmethod
    def labels(cls) -> tuple[str, ...]:
        """Every member's text spelling, in value order."""
        return tuple(member.label for member in cls)

    @classmethod
    def from_label(cls, text: str) -> _Labelled:
        """Return the member spelled `text` (any case, surrounding blanks ignored).

        Raises:
            ValueError: no member has that spelling; the message lists those that do.
        """
        try:
            return cls[str(text).strip().upper()]
        except KeyError:
            raise ValueError(f'unknown {cls.__name__.lower()} {text!r}; use one of '
                             f'{", ".join(cls.labels())}') from None


class Controller(_Labelled):
    """Who controlled a step (whose command the robot executed); = SOURCE_* of the msgs."""

    POLICY = 0
    HUMAN = 1
    HOLD = 2  # position held: watchdog, e-stop or no active source

    @classmethod
    def parse(cls, value: str | int | Controller) -> Controller:
        """Accept 'policy' / 'human' / 'hold' (any case) or the integer source value."""
        if isinstance(value, str):
            return cls.from_label(value)
        return cls(int(value))


class Outcome(_Labelled):
    """How an episode ended; = LabelEpisode.OUTCOME_* (and EpisodeEvent.OUTCOME_*)."""

    UNLABELLED = 0  # nobody has said yet
    SUCCESS = 1
    FAILURE = 2
    DISCARDED = 3   # looked at and excluded from training

    @property
    def trainable(self) -> bool:
        """True for the outcomes the learner trains on (success and failure)."""
        return self in (Outcome.SUCCESS, Outcome.FAILURE)

    @classmethod
    def parse(cls, value: str | int | bool | None | Outcome) -> Outcome:
        """Accept a label ('success', 'failure', 'discarded', 'unlabelled'), None, a bool, an int.

        None and the empty string are 'unlabelled'; True / False are success / failure. Hand-
        written label files (CSV, sidecars) may also say 'none', 'null', 'unknown' or
        'unlabeled' for no label.

        Raises:
            ValueError: anything else; the message lists the spellings.
        """
        if value is None:
            return cls.UNLABELLED
        if isinstance(value, bool):
            return cls.SUCCESS if value else cls.FAILURE
        if isinstance(value, str):
            if value.strip().lower() in _NO_LABEL_SPELLINGS:
                return cls.UNLABELLED
            return cls.from_label(value)
        return cls(int(value))


_NO_LABEL_SPELLINGS = ('', 'none', 'null', 'unknown', 'unlabeled')
# The outcomes a person can give an episode (the dashboard's buttons, `habc episodes label`).
LABEL_OUTCOMES = (Outcome.SUCCESS, Outcome.FAILURE, Outcome.DISCARDED)


class RecorderEvent(enum.IntEnum):
    """What happened to an episode in the recorder; = habc_msgs/EpisodeEvent.EVENT_*."""

    START = 0      # recording started
    END = 1        # recording finished; the bag is closed and indexed
    LABELLED = 2   # an outcome label was set or changed
    DISCARDED = 3  # excluded from training


class HelpReason(enum.Enum):
    """Why the robot raised or cleared a help request; = habc_msgs/HelpRequest.reason."""

    LOW = 'low'              # raised: the viability p_v stayed below the threshold
    STALLED = 'stalled'      # raised: p_v stopped rising
    ANSWERED = 'answered'    # cleared: a human took over
    RECOVERED = 'recovered'  # cleared: p_v recovered without help
    RESET = 'reset'          # cleared: new weights, no critic, or a reset of the monitor

    @property
    def label(self) -> str:
        return self.value

    @classmethod
    def labels(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)

    @property
    def raises(self) -> bool:
        """True for the reasons of raising a request (low, stalled)."""
        return self in (HelpReason.LOW, HelpReason.STALLED)


class EpisodeKind(enum.IntEnum):
    """Where an episode comes from: D_SFT demonstrations or rollouts of the policy."""

    DEMO = 0
    ROLLOUT = 1


class EpisodeStatus(enum.Enum):
    """How far the recording of an episode got."""

    RECORDING = 'recording'    # the recorder is writing its bag now
    COMPLETE = 'complete'      # ended normally; the bag is closed
    INCOMPLETE = 'incomplete'  # cut short (an error, or rescued after a recorder crash)

    @property
    def label(self) -> str:
        return self.value

    @classmethod
    def labels(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)

    @property
    def finished(self) -> bool:
        """True once the bag is closed (complete or incomplete)."""
        return self is not EpisodeStatus.RECORDING


_VERSION_TEXT = re.compile(r'(\d+)(?::(.+))?')


@dataclass(frozen=True, order=True)
class PolicyVersion:
    """Which weights produced an action: a monotonic number, plus an optional tag.

    The number orders the weights of one robot's policy: the start-up checkpoint is
    STARTUP_VERSION (1, tagged 'sft'), the learner publishes 2, 3, ... (PolicyUpdate.version
    is the number). A tag names weights that share a number: 'sft' for the first
    checkpoint, 'manual-<sha256 prefix>' for weights an operator loaded by hand. The text
    form, `str(version)`, is the one spelling on every message (ActionChunk, PolicyCommand,
    ExecutedAction, EpisodeEvent), in checkpoints' config.json, in bags and in the episode
    index: '3', or '1:sft' with a tag. `parse` reads it back.
    """

    number: int
    tag: str = ''

    def __post_init__(self) -> None:
        if isinstance(self.number, bool) or not isinstance(self.number, int) \
                or self.number < 0:
            raise ValueError(f'policy version number must be an integer >= 0, got '
                             f'{self.number!r}')
        if ':' in self.tag or self.tag != self.tag.strip():
            raise ValueError(f'policy version tag {self.tag!r} must not contain ":" or '
                             'surrounding blanks')

    def __str__(self) -> str:
        return f'{self.number}:{self.tag}' if self.tag else str(self.number)

    @classmethod
    def parse(cls, text: str | int | PolicyVersion) -> PolicyVersion:
        """Read a version's text form ('3', '1:sft') or number.

        A bare tag without a number ('sft', 'untrained': checkpoints written before
        versions had numbers) is the start-up number with that tag.

        Raises:
            ValueError: empty text (no version is known: keep '' apart from versions).
        """
        if isinstance(text, PolicyVersion):
            return text
        if isinstance(text, int) and not isinstance(text, bool):
            return cls(text)
        value = str(text).strip()
        if not value:
            raise ValueError('empty policy version (no weights are known to have acted)')
        match = _VERSION_TEXT.fullmatch(value)
        if match is None:
            return cls(STARTUP_VERSION.number, value.replace(':', '-'))
        return cls(int(match.group(1)), match.group(2) or '')

    @staticmethod
    def sort_key(text: str) -> tuple[int, int, str]:
        """Order version texts as the weights ran; '' (no version) first."""
        if not str(text).strip():
            return (0, -1, '')
        version = PolicyVersion.parse(text)
        return (1, version.number, version.tag)


# The version of the weights a policy starts with (the SFT checkpoint): defined here once.
STARTUP_VERSION = PolicyVersion(1, 'sft')
