"""A whole study's diagnosis: how its trials ended, which hyperparameter regions explain the
unhealthy ones, which hyperparameters mattered, and a narrower search space for the next sweep.

Pure: plain trial records in, plain data out (no database, no web layer, no torch), so the API,
the CLI and unit tests share it. Optuna serves for parameter importance only.

Regions (`find_regions`). Only ended trials with a diagnosis count (a running trial's verdict
may still change). The unhealthy trials are sought as one group, whatever their unhealthy
verdict (`UNHEALTHY_VERDICTS`): bad trials above lr 1 split among diverged, oscillating and
underfitting make one region, where each verdict apart would be too few. For each swept
hyperparameter, every threshold between two neighbouring observed values splits those trials in
two, and each side is a candidate region ("lr > 0.21", "batch_size <= 32"). A region qualifies
when at least `MIN_REGION_TRIALS` of its trials are unhealthy, and their share (its precision) is
at least `MIN_REGION_PRECISION` and at least the unhealthy share among all the trials plus
`MIN_LIFT`. Each side of each hyperparameter takes the qualifying region with the best F1, i.e.
precision balanced with the share of the unhealthy trials it covers: 2·unhealthy inside /
(matching + unhealthy trials), and keeps it if chance alone would put that many unhealthy trials
in a region that size less than `MAX_CHANCE` of the time (the hypergeometric tail times the
number of regions tried on that hyperparameter, both sides, as Bonferroni would): without this,
a few trials at the edge of a small study "explain" anything (a third of random studies without
any effect got a region). Both sides are kept only when they share no trial (low learning
rates underfit, high ones diverge), else the better one. The same search then runs for each
unhealthy verdict with `MIN_REGION_TRIALS` trials alone, its chance also multiplied by the
number of verdicts searched (random studies of 20 to 100 trials without any effect: 1-5% get a
region, all searches together), and keeps a region only on a side of a hyperparameter where the
group found none, the best of the verdicts' there: a verdict concentrated on that side whose
share the others hide (trials that oscillate everywhere, but diverge only above lr 0.3). The
group's best `MAX_REGIONS_PER_SEARCH` regions come first, then up to as many of each verdict's.
Whichever search found it, a region reads the same, all its unhealthy trials by verdict, most
frequent first: "lr > 0.3: 6 of 6 trials unhealthy: diverged 3, oscillating 2, underfitting 1"
("... unhealthy: diverged 5" when they share one). A float threshold is the roundest number
between the two neighbours (0.21, not 0.2134), so a log or a linear scale splits alike; integers
(batch_size choices too) read ">= 128" or "<= 32" on an observed value.

Recommendation (`recommend`). With at least `MIN_RECOMMEND_TRIALS` completed trials, each swept
range becomes the span of the best quarter of them, widened on each side by `MARGIN` of the
original width (log width on a log scale), rounded outward (two significant digits, or whole
numbers) and clipped to the original range. Then each unhealthy region on that hyperparameter
is cut away at its threshold, unless the cut would leave nothing. An integer range keeps two
values at least; a range that would lose less than `MIN_NARROWING` of its width and avoids no
region stays as it was. Choices keep those the best trials used plus one
neighbour each side, less unhealthy ones, never fewer than two. Fixed values stay fixed. A
parameter the spec's validators would refuse keeps its original range, and the whole spec is
checked by `parse_spec`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Union

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from converge.studies.diagnosis import HEALTHY_VERDICTS, UNHEALTHY_VERDICTS
from converge.studies.spec import FloatRange, IntChoices, IntRange, SearchSpace, SpecError, StudySpec, parse_spec

Swept = Union[FloatRange, IntRange, IntChoices]

ENDED_STATES = ("complete", "pruned", "failed")

MIN_REGION_TRIALS = 2  # trials counted (unhealthy, or with the one verdict searched) inside a region
MIN_REGION_PRECISION = 0.6
MIN_LIFT = 0.2  # a region's share of those trials must beat the whole study's by this much
MAX_CHANCE = 0.05  # how often chance alone may produce a region, all thresholds of one parameter tried together
MAX_REGIONS_PER_SEARCH = 3  # regions kept from the unhealthy group's search, and from each verdict's

IMPORTANCE_EVALUATOR = "PedAnovaImportanceEvaluator"
MIN_IMPORTANCE_TRIALS = 10
MAX_IMPORTANCE_TRIALS = 5000  # ~0.15 s of PED-ANOVA; more completed trials are subsampled evenly

MIN_RECOMMEND_TRIALS = 4  # completed trials needed to move a range toward the best ones
TOP_FRACTION = 0.25
MARGIN = 0.1  # of the original width, added to each side of the best trials' span
MIN_NARROWING = 0.1  # of the original width: less is noise, not a recommendation
NEXT_SUFFIX = "-next"
MAX_NAME_LENGTH = 100  # the spec's name rule


@dataclass(frozen=True)
class TrialRecord:
    """What the study diagnosis needs of one trial; `state` is running/waiting/complete/pruned/failed."""

    number: int
    state: str
    params: Mapping[str, Any]
    value: float | None = None
    verdict: str | None = None


@dataclass(frozen=True)
class Region:
    """A hyperparameter region where trials were mostly unhealthy, whatever their unhealthy verdicts.

    `with_verdict` and `precision` count every unhealthy trial inside; `verdicts` splits them by
    verdict, most frequent first, and `verdict` is that first one (so a region reads as before to
    a client that knows one verdict per region).
    """

    verdict: str  # the most frequent unhealthy verdict inside
    param: str
    op: str  # ">" or "<" for floats, ">=" or "<=" for integers
    threshold: float | int
    matching: int  # ended, diagnosed trials inside the region
    with_verdict: int  # of those, the trials with an unhealthy verdict
    precision: float  # with_verdict / matching
    text: str  # e.g. "lr > 0.3: 6 of 6 trials unhealthy: diverged 3, oscillating 2, underfitting 1"
    verdicts: dict[str, int] = field(default_factory=dict, hash=False)  # unhealthy trials inside, per verdict
    score: float = field(default=0.0, compare=False)  # F1: how well the region explains what its search sought

    def contains(self, value: float) -> bool:
        return {">": value > self.threshold, "<": value < self.threshold,
                ">=": value >= self.threshold, "<=": value <= self.threshold}[self.op]

    def label(self) -> str:
        """E.g. "lr > 0.3 (diverged, oscillating, underfitting)"."""
        return f"{self.param} {self.op} {_fmt(self.threshold)} ({', '.join(self.verdicts or [self.verdict])})"


@dataclass(frozen=True)
class Importance:
    """Optuna's parameter importances (summing to 1, largest first), or None with the reason."""

    importances: dict[str, float] | None
    reason: str | None
    evaluator: str
    trials_used: int


@dataclass(frozen=True)
class Recommendation:
    """A complete spec for the next sweep, and what changed, in words."""

    spec: dict[str, Any]
    changes: list[str]


@dataclass(frozen=True)
class StudyDiagnosis:
    study: str
    trials: int
    verdicts: dict[str, int]
    healthy: int
    undiagnosed: int
    provisional: int
    regions: list[Region]
    importance: Importance
    recommendation: Recommendation

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for region in out["regions"]:
            del region["score"]
        return out


def diagnose_study(spec: StudySpec, trials: Sequence[TrialRecord]) -> StudyDiagnosis:
    """The study's verdict counts, unhealthy regions, parameter importance and next search space."""
    verdicts = Counter(t.verdict for t in trials if t.verdict is not None)
    regions = find_regions(spec.search_space, trials)
    return StudyDiagnosis(
        study=spec.name, trials=len(trials), verdicts=dict(verdicts.most_common()),
        healthy=sum(n for verdict, n in verdicts.items() if verdict in HEALTHY_VERDICTS),
        undiagnosed=sum(t.verdict is None for t in trials),
        provisional=sum(t.verdict is not None and t.state not in ENDED_STATES for t in trials),
        regions=regions, importance=param_importance(spec, trials), recommendation=recommend(spec, trials, regions),
    )


# ---------------------------------------------------------------- shared helpers


def swept_params(space: SearchSpace) -> dict[str, Swept]:
    """The hyperparameters the study varies (fixed values and single choices do not vary)."""
    swept: dict[str, Swept] = {}
    for name in SearchSpace.model_fields:
        p = getattr(space, name)
        if isinstance(p, (FloatRange, IntRange)) or (isinstance(p, IntChoices) and len(p.choices) > 1):
            swept[name] = p
    return swept


def _number(value: Any) -> float | None:
    """A param value as a finite number, or None (absent or not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _within(p: Swept, value: Any) -> bool:
    """Whether the value lies in the spec's range or choices (Optuna's distribution holds it)."""
    number = _number(value)
    if number is None:
        return False
    if isinstance(p, IntChoices):
        return number in p.choices
    return p.low <= number <= p.high and (isinstance(p, FloatRange) or float(number).is_integer())


def _completed(trials: Sequence[TrialRecord]) -> list[TrialRecord]:
    return [t for t in trials if t.state == "complete" and t.value is not None and math.isfinite(t.value)]


def _fmt(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- regions


def find_regions(space: SearchSpace, trials: Sequence[TrialRecord]) -> list[Region]:
    """The regions that explain the unhealthy trials (rule in the module docstring): the unhealthy
    group's, best first, then those that only one verdict's own search finds, best first per verdict."""
    ended = [t for t in trials if t.verdict is not None and t.state in ENDED_STATES]
    grouped: list[Region] = []
    single: list[tuple[str, Region]] = []  # (the verdict searched, its region)
    for name, p in swept_params(space).items():
        observed = [(t.params[name], t.verdict) for t in ended if _within(p, t.params.get(name))]
        if len(observed) < 2:
            continue
        observed.sort(key=lambda pair: pair[0])
        values = np.array([value for value, _ in observed], dtype=float)
        verdicts = [verdict for _, verdict in observed]
        is_float = isinstance(p, FloatRange)
        found = _best_splits(name, is_float, values, verdicts, np.array([v in UNHEALTHY_VERDICTS for v in verdicts]))
        grouped += found
        sides = {_side(r.op) for r in found}
        extra: dict[str, tuple[str, Region]] = {}  # a side the group left empty: one verdict's best region there
        each = np.array(verdicts, dtype=object)
        searched = [v for v in UNHEALTHY_VERDICTS if int((each == v).sum()) >= MIN_REGION_TRIALS]
        for verdict in searched:
            for region in _best_splits(name, is_float, values, verdicts, each == verdict, searches=len(searched)):
                side = _side(region.op)
                if side not in sides and (side not in extra or _rank(region) < _rank(extra[side][1])):
                    extra[side] = (verdict, region)
        single += extra.values()
    kept = sorted(grouped, key=_rank)[:MAX_REGIONS_PER_SEARCH]
    for verdict in UNHEALTHY_VERDICTS:
        kept += sorted((r for found_for, r in single if found_for == verdict), key=_rank)[:MAX_REGIONS_PER_SEARCH]
    return kept


def _rank(region: Region) -> tuple[float, float, str]:
    return -region.score, -region.precision, region.param


def _side(op: str) -> str:
    return "above" if op in (">", ">=") else "below"


def _best_splits(param: str, is_float: bool, values: np.ndarray, verdicts: Sequence[str],
                 hits: np.ndarray, searches: int = 1) -> list[Region]:
    """The best region below a threshold and the best above one, of those that pass the rule for the
    trials `hits` marks (the unhealthy ones, or those with one verdict); both only when they share
    no trial, else the better one.

    `values` are sorted; `hits[i]` says whether the trial at `values[i]` counts, `verdicts[i]` is its verdict;
    `searches`: how many such searches the chance of a region is shared between (Bonferroni).
    """
    total, with_verdict = len(values), int(hits.sum())
    if with_verdict < MIN_REGION_TRIALS:
        return []
    needed = max(MIN_REGION_PRECISION, with_verdict / total + MIN_LIFT)
    splits = np.flatnonzero(values[:-1] != values[1:])  # a threshold between values[i] and values[i + 1]
    below = splits + 1
    below_hits = np.cumsum(hits)[splits]
    best: dict[str, tuple[int, float, float, int]] = {}  # side: (index into splits, score, precision, hits)
    for side, matching, inside in (("below", below, below_hits), ("above", total - below, with_verdict - below_hits)):
        precision = inside / matching
        passes = (inside >= MIN_REGION_TRIALS) & (precision >= needed)
        if not passes.any():
            continue
        score = np.where(passes, 2 * inside / (matching + with_verdict), -1.0)
        i = int(np.lexsort((inside, precision, score))[-1])  # best score, then precision, then trials
        tried = 2 * len(splits) * searches
        if chance_of_region(total, with_verdict, int(matching[i]), int(inside[i])) * tried >= MAX_CHANCE:
            continue
        best[side] = (i, float(score[i]), float(precision[i]), int(inside[i]))
    if len(best) == 2 and best["below"][0] > best["above"][0]:  # they overlap: keep the better (below on a tie)
        del best["above" if best["above"][1:] <= best["below"][1:] else "below"]
    regions = []
    for side, (i, score, _, _) in best.items():
        op, threshold = _threshold(side, values[splits[i]], values[splits[i] + 1], is_float)
        inside_verdicts = verdicts[:splits[i] + 1] if side == "below" else verdicts[splits[i] + 1:]
        regions.append(_region(param, op, threshold, inside_verdicts, score))
    return regions


def _region(param: str, op: str, threshold: float | int, inside: Sequence[str], score: float) -> Region:
    """A region described by all its unhealthy trials, e.g. "lr > 0.3: 6 of 6 trials unhealthy:
    diverged 3, oscillating 2, underfitting 1" (most frequent first, ties in `UNHEALTHY_VERDICTS` order)."""
    counts = Counter(verdict for verdict in inside if verdict in UNHEALTHY_VERDICTS)
    breakdown = dict(sorted(counts.items(), key=lambda item: (-item[1], UNHEALTHY_VERDICTS.index(item[0]))))
    unhealthy, matching = sum(counts.values()), len(inside)
    return Region(verdict=next(iter(breakdown)), param=param, op=op, threshold=threshold, matching=matching,
                  with_verdict=unhealthy, precision=round(unhealthy / matching, 4), verdicts=breakdown, score=score,
                  text=f"{param} {op} {_fmt(threshold)}: {unhealthy} of {matching} trials unhealthy: "
                       + ", ".join(f"{verdict} {n}" for verdict, n in breakdown.items()))


def chance_of_region(total: int, with_verdict: int, matching: int, hits: int) -> float:
    """How likely `matching` trials drawn at random from `total` hold `hits` or more of the
    `with_verdict` trials with the verdict: the hypergeometric upper tail."""

    def log_comb(n: int, k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)

    log_all = log_comb(total, matching)
    return min(1.0, sum(math.exp(log_comb(with_verdict, x) + log_comb(total - with_verdict, matching - x) - log_all)
                        for x in range(hits, min(matching, with_verdict) + 1)
                        if matching - x <= total - with_verdict))


def _threshold(side: str, lower: float, upper: float, is_float: bool) -> tuple[str, float | int]:
    """How a split between two neighbouring values reads: a round number between them for floats,
    the observed value on the region's side for integers."""
    if is_float:
        return ("<" if side == "below" else ">"), roundest_between(float(lower), float(upper))
    return ("<=", int(lower)) if side == "below" else (">=", int(upper))


def roundest_between(low: float, high: float) -> float:
    """The number with the fewest significant digits strictly between `low` and `high` (low < high)."""
    magnitude = max(abs(low), abs(high))
    for digits in range(1, 17) if 1e-300 < magnitude < math.inf else ():
        step = 10.0 ** (math.floor(math.log10(magnitude)) - digits + 1)
        candidate = float(f"{(math.floor(low / step + 1e-9) + 1) * step:.{digits + 1}g}")  # 1e-9: 0.50213 / 1e-5
        if low < candidate < high:
            return candidate
    return (low + high) / 2


# ---------------------------------------------------------------- importance


def param_importance(spec: StudySpec, trials: Sequence[TrialRecord]) -> Importance:
    """Optuna's PED-ANOVA importances over the completed trials with a finite value.

    PED-ANOVA (Optuna 5's default evaluator) compares where the best trials lie with where all
    of them lie: ~0.1 s on 3,000 trials, where fANOVA takes 17 s on 500 and MDI ~1 s on 2,000.
    Its best `target_quantile` is made to hold 5 trials at least, as its documentation advises.
    """
    swept = swept_params(spec.search_space)
    usable = [t for t in _completed(trials) if all(_within(p, t.params.get(name)) for name, p in swept.items())]
    if not swept:
        return Importance(None, "every hyperparameter is fixed", IMPORTANCE_EVALUATOR, 0)
    if len(usable) < MIN_IMPORTANCE_TRIALS:
        return Importance(None, f"needs {MIN_IMPORTANCE_TRIALS} completed trials with a finite value, "
                          f"has {len(usable)}", IMPORTANCE_EVALUATOR, len(usable))
    if len(usable) > MAX_IMPORTANCE_TRIALS:
        usable = [usable[i * len(usable) // MAX_IMPORTANCE_TRIALS] for i in range(MAX_IMPORTANCE_TRIALS)]
    raw = _ped_anova(spec.objective.direction, swept, usable)
    total = sum(raw.values())
    if not total > 0:
        return Importance(None, "no hyperparameter separates the best trials from the others",
                          IMPORTANCE_EVALUATOR, len(usable))
    ranked = sorted(raw.items(), key=lambda item: -item[1])
    return Importance({name: round(v / total, 4) for name, v in ranked}, None, IMPORTANCE_EVALUATOR, len(usable))


def _distribution(p: Swept) -> BaseDistribution:
    if isinstance(p, IntChoices):
        return CategoricalDistribution(p.choices)
    kind = FloatDistribution if isinstance(p, FloatRange) else IntDistribution
    return kind(p.low, p.high, log=p.log)


def _ped_anova(direction: str, swept: Mapping[str, Swept], usable: Sequence[TrialRecord]) -> dict[str, float]:
    distributions = {name: _distribution(p) for name, p in swept.items()}
    frozen = [FrozenTrial(number=i, state=TrialState.COMPLETE, value=float(t.value), datetime_start=None,
                          datetime_complete=None, params={name: t.params[name] for name in swept},
                          distributions=distributions, user_attrs={}, system_attrs={}, intermediate_values={},
                          trial_id=i)
              for i, t in enumerate(usable)]
    evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=min(0.5, max(0.1, 5 / len(frozen))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-argument and small-sample warnings
        return optuna.importance.get_param_importances(
            _trials_as_study(direction, frozen), evaluator=evaluator, params=sorted(swept), normalize=False)


class _FrozenTrialsStudy(optuna.Study):
    """A study serving given trials as they are (optuna-dashboard's `StudyWrapper` does the same):
    `add_trials` into an in-memory study would deep-copy each one, ~0.2 ms a trial, more than
    the evaluator takes."""

    trials_given: list[FrozenTrial]

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return [t for t in self.trials_given if states is None or t.state in states]


def _trials_as_study(direction: str, trials: list[FrozenTrial]) -> optuna.Study:
    study = _FrozenTrialsStudy(study_name=direction, storage=_direction_studies())
    study.trials_given = trials
    return study


@lru_cache(maxsize=1)
def _direction_studies() -> optuna.storages.InMemoryStorage:
    """One empty in-memory study per direction, named after it, made once per process without
    Optuna's "A new study created in memory" log lines."""
    storage = optuna.storages.InMemoryStorage()
    log = logging.getLogger("optuna.storages._in_memory")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        for direction in ("minimize", "maximize"):
            storage.create_new_study([optuna.study.StudyDirection[direction.upper()]], direction)
    finally:
        log.setLevel(level)
    return storage


# ---------------------------------------------------------------- recommendation


def recommend(spec: StudySpec, trials: Sequence[TrialRecord], regions: Sequence[Region]) -> Recommendation:
    """A complete spec for the next sweep: this study's, renamed, each swept range narrowed (module docstring).

    Valid for `POST /v1/studies` as it is: each narrowed parameter passes the spec's own
    validators or stays as it was, and the whole spec passes `parse_spec`.
    """
    top = top_trials(spec, trials)
    narrowed: dict[str, Swept] = {}
    changes: list[str] = []
    for name, original in swept_params(spec.search_space).items():
        top_values = [t.params[name] for t in top if _within(original, t.params.get(name))]
        own_regions = [r for r in regions if r.param == name]
        narrow = _narrow_choices if isinstance(original, IntChoices) else _narrow_range
        new, avoided = narrow(original, top_values, own_regions)
        if new is not None and new != original and _valid_param(name, new):
            narrowed[name] = new
            changes.append(_change_text(name, original, new, avoided))
    space = spec.search_space.model_copy(update=narrowed)
    try:
        next_spec = parse_spec(spec.model_copy(update={"name": next_name(spec.name), "search_space": space})
                               .model_dump(mode="json"))
    except SpecError:  # pragma: no cover - each parameter passed the validators; a last guard
        next_spec, changes = parse_spec({**spec.model_dump(mode="json"), "name": next_name(spec.name)}), []
    return Recommendation(spec=next_spec.model_dump(mode="json"), changes=changes or [_no_change_reason(spec, top)])


def top_trials(spec: StudySpec, trials: Sequence[TrialRecord]) -> list[TrialRecord]:
    """The best quarter of the completed trials with a finite value; none while fewer than the minimum."""
    completed = _completed(trials)
    if len(completed) < MIN_RECOMMEND_TRIALS:
        return []
    completed.sort(key=lambda t: t.value, reverse=spec.objective.direction == "maximize")
    return completed[:math.ceil(len(completed) * TOP_FRACTION)]


def next_name(name: str) -> str:
    """`NAME-next`, within the spec's 100 characters."""
    return name[:MAX_NAME_LENGTH - len(NEXT_SUFFIX)] + NEXT_SUFFIX


def _valid_param(name: str, param: Swept) -> bool:
    """The spec's own validators on one parameter (its bounds, low < high, positive log bounds)."""
    try:
        SearchSpace.model_validate({name: param.model_dump()})
    except ValueError:
        return False
    return True


def _narrow_range(original: FloatRange | IntRange, top_values: Sequence[float],
                  regions: Sequence[Region]) -> tuple[FloatRange | IntRange | None, list[Region]]:
    """The best trials' span, widened, rounded outward and clipped; then each unhealthy region cut
    away at its own threshold if something is left."""
    is_int = isinstance(original, IntRange)
    scale = math.log10 if original.log else float
    width = scale(original.high) - scale(original.low)
    if not width > 0:  # a range a few floats wide: nothing to narrow
        return None, []
    low, high = original.low, original.high
    if top_values:
        low, high = _widened_span(original, min(top_values), max(top_values))
    avoided = []
    for region in regions:
        last_kept = region.threshold + {">=": -1, "<=": 1}.get(region.op, 0)
        cut_low, cut_high = (low, min(high, last_kept)) if region.op in (">", ">=") else (max(low, last_kept), high)
        if cut_low < cut_high:
            low, high = cut_low, cut_high
            avoided.append(region)
    if low >= high:  # an integer span that rounding could not widen
        if not is_int:
            return None, []
        low, high = (high, high + 1) if high < original.high else (high - 1, high)
    if not avoided and (scale(high) - scale(low)) / width > 1 - MIN_NARROWING:
        return None, []
    return type(original)(low=low, high=high, log=original.log), avoided


def _widened_span(original: FloatRange | IntRange, low: float, high: float) -> tuple[float, float]:
    """`low`..`high` widened by `MARGIN` of the original width on its scale, rounded outward (to two
    significant digits, or to integers) and clipped to the original range."""
    to_scale, from_scale = (math.log10, lambda x: 10.0 ** x) if original.log else (float, float)
    margin = MARGIN * (to_scale(original.high) - to_scale(original.low))
    low, high = from_scale(to_scale(low) - margin), from_scale(to_scale(high) + margin)
    if isinstance(original, IntRange):
        low, high = math.floor(low + 1e-9), math.ceil(high - 1e-9)  # 1e-9: 10 ** log10(63) is 63.00000000000001
    else:
        low, high = round_sig(low, math.floor), round_sig(high, math.ceil)
    return max(original.low, low), min(original.high, high)


def round_sig(x: float, direction: Callable[[float], int], digits: int = 2) -> float:
    """`x` to `digits` significant digits, rounded down (`math.floor`) or up (`math.ceil`)."""
    if not 1e-300 < abs(x) < math.inf:  # zero, subnormal or infinite: nothing to round
        return x
    step = 10.0 ** (math.floor(math.log10(abs(x))) - digits + 1)
    return float(f"{direction(x / step) * step:.{digits + 1}g}")


def _narrow_choices(original: IntChoices, top_values: Sequence[float],
                    regions: Sequence[Region]) -> tuple[IntChoices | None, list[Region]]:
    """The choices the best trials used plus one neighbour each side, less unhealthy ones, two at least."""
    ordered = sorted(original.choices)
    keep = ordered
    if top_values:
        first, last = ordered.index(min(top_values)), ordered.index(max(top_values))
        keep = ordered[max(0, first - 1):last + 2]
    avoided = []
    for region in regions:
        remaining = [c for c in keep if not region.contains(c)]
        if len(remaining) >= 2:
            keep = remaining
            avoided.append(region)
    if len(keep) < 2:
        return None, []
    return IntChoices(choices=[c for c in original.choices if c in keep]), avoided  # in the user's order


def _describe(param: Swept) -> str:
    if isinstance(param, IntChoices):
        return str(param.choices)
    return f"{_fmt(param.low)}..{_fmt(param.high)}"


def _change_text(name: str, original: Swept, new: Swept, avoided: Sequence[Region]) -> str:
    """E.g. "lr: 1e-05..1 → 0.00031..0.026, avoiding lr > 0.21 (diverged)"."""
    text = f"{name}: {_describe(original)} → {_describe(new)}"
    return text + (", avoiding " + ", ".join(r.label() for r in avoided) if avoided else "")


def _no_change_reason(spec: StudySpec, top: Sequence[TrialRecord]) -> str:
    if not swept_params(spec.search_space):
        return "no change: every hyperparameter is fixed"
    if not top:
        return f"no change: {MIN_RECOMMEND_TRIALS} completed trials with a finite value are needed to narrow the ranges"
    return "no change: the best trials and the unhealthy regions span the whole search space"
