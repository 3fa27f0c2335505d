"""The words of an episode, each defined once: who controlled a step, how it ended, its status.

Integer values match the habc_msgs constants (InterventionState.SOURCE_*,
ExecutedAction.SOURCE_*, LabelEpisode.OUTCOME_*, EpisodeEvent.OUTCOME_*), so a message field
converts with `Controller(msg.source)` / `Outcome(msg.outcome)`. Text values (`.label`) are
the one spelling used in the episode index, on the command line, in CSV/sidecar labels and
on the dashboard: lower-case names ('policy', 'unlabelled', 'complete').
"""

from __future__ import annotations

import enum


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
