"""Intervention-aware credit assignment: who gets the episode's outcome label (no rclpy).

Rules (spec/habc.md, "Intervention-aware credit assignment"), per window anchored at t with
the next H executed steps:
  - human window: at least k of its steps were human-controlled (k = 10 of H = 50 in the
    paper, scaled with H; a window cut short by the episode end needs min(k, its length)).
    Never outcome-labelled. Imitation data for the actor (weight 1, or g_t with IR) and, in
    a successful episode, a progress target for the efficiency head.
  - no intervention in the episode: every policy window gets the label y.
  - with interventions: only windows anchored after the last human step (the
    post-intervention policy suffix) get y; earlier non-human windows stay unlabelled: no
    critic head, no actor weight.
  - labelled policy windows train the viability head; those of successful episodes also the
    efficiency head and get actor weight g_t; those of failed episodes get weight 0.
  - hold steps (watchdog, e-stop) are nobody's behaviour: excluded.
  - naive credit (a baseline the paper lacks): every window of the episode, human ones
    included, gets y.
  - unlabelled episodes give no labels; discarded episodes train nothing.
"""

import argparse
from dataclasses import asdict, dataclass
import enum
import json
import sys
from typing import Any

import numpy as np

from habc_episodes.episode import segment_ids
from habc_episodes.vocabulary import Controller, Outcome

PAPER_HORIZON = 50
PAPER_MIN_HUMAN_STEPS = 10


class Role(enum.StrEnum):
    """What a window is for credit assignment."""

    POLICY_LABELLED = 'policy_labelled'
    POLICY_UNLABELLED = 'policy_unlabelled'
    HUMAN = 'human'
    HOLD = 'hold'


class ActorWeight(enum.StrEnum):
    """Which actor weight a window gets (before unit-mean normalisation)."""

    GATE = 'gate'          # g_t of the HABC gate
    ZERO = 'zero'          # trains the actor with weight 0 (failed rollouts)
    ONE = 'one'            # plain imitation (human windows without IR)
    EXCLUDED = 'excluded'  # not in the actor loss at all


def scaled_min_human_steps(horizon: int) -> int:
    """Scale the paper's 10-of-50 human-window threshold to horizon H (at least 1)."""
    return max(1, round(PAPER_MIN_HUMAN_STEPS * horizon / PAPER_HORIZON))


@dataclass(frozen=True)
class CreditConfig:
    """Credit-assignment settings.

    Attributes:
        horizon: chunk length H of a window.
        min_human_steps: k, human steps that make a window a human window; None scales the
            paper's 10 of 50 to H.
        intervention_reweighting: IR, human windows weighted by g_t instead of 1.
        naive: give the outcome to every window, interventions included (baseline).
    """

    horizon: int = PAPER_HORIZON
    min_human_steps: int | None = None
    intervention_reweighting: bool = False
    naive: bool = False

    def __post_init__(self) -> None:
        if self.horizon < 1:
            raise ValueError(f'horizon must be at least 1, got {self.horizon}')
        if self.min_human_steps is not None and not 1 <= self.min_human_steps <= self.horizon:
            raise ValueError(f'min_human_steps must be in [1, horizon={self.horizon}], got '
                             f'{self.min_human_steps}')

    @property
    def k(self) -> int:
        """The human-window threshold in effect."""
        if self.min_human_steps is not None:
            return self.min_human_steps
        return scaled_min_human_steps(self.horizon)


@dataclass(frozen=True)
class CreditArrays:
    """Credit of every anchor step of one episode, as arrays of length T."""

    segment: np.ndarray            # int, segment id of the anchor step
    role: np.ndarray               # object array of Role
    label: np.ndarray              # float: 1.0 success, 0.0 failure, nan no label
    trains_viability: np.ndarray   # bool
    trains_efficiency: np.ndarray  # bool
    actor_weight: np.ndarray       # object array of ActorWeight
    terminal_success: np.ndarray   # bool: t is the last step of a successful episode


def assign_credit(controllers: Any, outcome: Any, config: CreditConfig) -> CreditArrays:
    """Apply the credit rules to one episode's per-step controllers and its outcome."""
    controllers = np.asarray([Controller.parse(c) for c in controllers], dtype=np.int8)
    outcome = Outcome.parse(outcome)
    n = len(controllers)
    if n == 0:
        raise ValueError('an episode needs at least one step')
    horizon, k = config.horizon, config.k

    human = controllers == Controller.HUMAN
    cumulative = np.concatenate([[0], np.cumsum(human)])
    starts = np.arange(n)
    ends = np.minimum(starts + horizon, n)
    human_in_window = cumulative[ends] - cumulative[starts]
    window_length = ends - starts
    is_human_window = (human_in_window >= np.minimum(k, window_length)) & (human_in_window > 0)
    is_hold = (controllers == Controller.HOLD) & ~is_human_window
    last_human = int(np.flatnonzero(human)[-1]) if human.any() else -1

    labelled_outcome = outcome in (Outcome.SUCCESS, Outcome.FAILURE)
    y = 1.0 if outcome == Outcome.SUCCESS else 0.0
    role = np.empty(n, dtype=object)
    label = np.full(n, np.nan)
    trains_v = np.zeros(n, dtype=bool)
    trains_e = np.zeros(n, dtype=bool)
    weight = np.empty(n, dtype=object)
    for t in range(n):
        if is_human_window[t]:
            role[t] = Role.HUMAN
        elif is_hold[t]:
            role[t] = Role.HOLD
        elif labelled_outcome and (config.naive or t > last_human):
            role[t] = Role.POLICY_LABELLED
        else:
            role[t] = Role.POLICY_UNLABELLED

        if outcome == Outcome.DISCARDED or role[t] in (Role.HOLD, Role.POLICY_UNLABELLED):
            weight[t] = ActorWeight.EXCLUDED
            continue
        gets_outcome = role[t] == Role.POLICY_LABELLED or (config.naive and labelled_outcome)
        if gets_outcome:
            label[t] = y
            trains_v[t] = True
            weight[t] = ActorWeight.GATE if y == 1.0 else ActorWeight.ZERO
        else:  # a human window without the naive rule
            weight[t] = (ActorWeight.GATE if config.intervention_reweighting
                         else ActorWeight.ONE)
        trains_e[t] = outcome == Outcome.SUCCESS
    terminal = np.zeros(n, dtype=bool)
    terminal[-1] = outcome == Outcome.SUCCESS
    return CreditArrays(segment=segment_ids(controllers), role=role, label=label,
                        trains_viability=trains_v, trains_efficiency=trains_e,
                        actor_weight=weight, terminal_success=terminal)


@dataclass(frozen=True)
class WindowCredit:
    """The credit of one anchor step, as `habc credit` prints it."""

    t: int
    segment: int
    role: str
    label: int | None
    trains_viability: bool
    trains_efficiency: bool
    actor_weight: str


def credit_records(credit: CreditArrays) -> list[WindowCredit]:
    """Convert CreditArrays into one record per anchor step."""
    records = []
    for t in range(len(credit.segment)):
        label = None if np.isnan(credit.label[t]) else int(credit.label[t])
        records.append(WindowCredit(
            t=t, segment=int(credit.segment[t]), role=credit.role[t].value, label=label,
            trains_viability=bool(credit.trains_viability[t]),
            trains_efficiency=bool(credit.trains_efficiency[t]),
            actor_weight=credit.actor_weight[t].value))
    return records


def credit_from_json(data: Any) -> list[dict[str, Any]]:
    """Evaluate the `habc credit` JSON input; raise ValueError with an actionable message."""
    if not isinstance(data, dict):
        raise ValueError('expected a JSON object like {"controllers": ["policy", "human"], '
                         '"outcome": "success", "horizon": 50, "min_human_steps": 10}')
    known = {'controllers', 'outcome', 'horizon', 'min_human_steps', 'ir', 'naive'}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f'unknown key(s) {unknown}; known: {sorted(known)}')
    controllers = data.get('controllers')
    if not isinstance(controllers, list) or not controllers:
        raise ValueError('"controllers" must be a non-empty list of "policy", "human" or '
                         '"hold"')
    horizon = data.get('horizon', PAPER_HORIZON)
    k = data.get('min_human_steps')
    for name, value in (('horizon', horizon), ('min_human_steps', k)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f'"{name}" must be an integer, got {value!r}')
    config = CreditConfig(horizon=horizon, min_human_steps=k,
                          intervention_reweighting=bool(data.get('ir', False)),
                          naive=bool(data.get('naive', False)))
    credit = assign_credit(controllers, data.get('outcome'), config)
    return [asdict(r) for r in credit_records(credit)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `habc credit` options to a parser."""
    parser.add_argument('file', nargs='?', help='JSON input file (default: standard input)')
    parser.add_argument('--indent', type=int, default=None,
                        help='pretty-print with this indent (default: one compact line)')


def run(args: argparse.Namespace) -> int:
    """Print the credit of every anchor step; exit code 2 on bad input."""
    try:
        if args.file:
            with open(args.file, encoding='utf-8') as stream:
                text = stream.read()
        else:
            text = sys.stdin.read()
        records = credit_from_json(json.loads(text))
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        print(f'habc credit: {exc}', file=sys.stderr)
        return 2
    print(json.dumps(records, indent=args.indent))
    return 0


HELP = """Show the credit assignment of one episode, to debug intervention data.

Input (JSON, from FILE or standard input):
  {"controllers": ["policy", "policy", "human", ...],   one entry per control step
   "outcome": "success" | "failure" | null,
   "horizon": H, "min_human_steps": k,                   optional, defaults 50 and 10*H/50
   "ir": false, "naive": false}                          optional switches
Output: a JSON list, one object per anchor step t:
  {"t", "segment", "role": policy_labelled|policy_unlabelled|human|hold, "label": 1|0|null,
   "trains_viability", "trains_efficiency", "actor_weight": gate|zero|one|excluded}

example:
  echo '{"controllers": ["policy","policy","human","human","policy"],
         "outcome": "success", "horizon": 2, "min_human_steps": 1}' | habc credit --indent 1
"""


def main(argv: list[str] | None = None) -> None:
    """Console script `credit` of habc_learner (same as `habc credit`)."""
    parser = argparse.ArgumentParser(prog='credit', description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run(parser.parse_args(argv)))
