"""What the figures show, computed from plain records: no plotly, no database, no torch.

`trial_figure_data` turns one trial's epoch rows and its diagnosis into the series of its
convergence figure (losses, validation accuracy, gradient norm, learning rate) with each finding
placed at its epoch; `study_figure_data` turns a study's trials into the series of its five
figures, each coloured by the trials' verdicts. `studies.plots.draw` draws them; tests check
the data itself.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from converge.studies.diagnosis import HEALTHY_VERDICTS, VERDICTS
from converge.studies.spec import PARAM_NAMES

UNDIAGNOSED = "undiagnosed"  # a trial without a diagnosis (no epoch recorded)
VERDICT_ORDER = (*VERDICTS, UNDIAGNOSED)
LOG_PARAMS = frozenset({"lr", "weight_decay"})
MAX_CURVES = 200  # trials overlaid in the study's loss-curve figure, evenly spread over the study
TRIAL_METRICS = ("train_loss", "val_loss", "val_acc", "grad_norm", "lr")


def finite(value: Any) -> float | None:
    """A plottable number: None for null, NaN, infinities and strings ("NaN", "Infinity")."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _non_finite(value: Any) -> bool:
    """A value that was recorded but is NaN or infinite (evidence: a diverged loss)."""
    if value is None or isinstance(value, bool):
        return False
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------- one trial


@dataclass(frozen=True)
class FindingMark:
    """A finding of the diagnosis, placed at its epoch (`y`: the loss there, for the marker)."""

    kind: str
    epoch: int
    evidence: str
    y: float | None
    primary: bool  # the verdict's own finding (the others are secondary evidence)


@dataclass(frozen=True)
class TrialFigureData:
    study: str
    trial: int
    state: str | None
    verdict: str | None
    healthy: bool | None
    confidence: float | None
    title: str
    epochs: list[int]
    series: dict[str, list[float | None]]  # TRIAL_METRICS, one value per epoch, None where not finite
    non_finite: dict[str, list[int]]  # epochs where a metric was NaN or infinite
    findings: list[FindingMark]
    remedies: list[dict[str, Any]]
    summary: str | None

    def has(self, metric: str) -> bool:
        return any(v is not None for v in self.series[metric])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdict_title(study: str, trial: int, state: str | None, diagnosis: Mapping[str, Any] | None) -> str:
    head = f"{study} · trial {trial}" + (f" ({state})" if state else "")
    if not diagnosis:
        return f"{head}: not diagnosed yet"
    confidence = finite(diagnosis.get("confidence"))
    tail = f", confidence {confidence:.2f}" if confidence is not None else ""
    onset = diagnosis.get("onset_epoch")
    since = f", from epoch {onset}" if onset is not None and not diagnosis.get("healthy") else ""
    return f"{head}: {diagnosis.get('verdict')}{tail}{since}"


def trial_figure_data(study: str, trial: int, epochs: Sequence[Mapping[str, Any]],
                      diagnosis: Mapping[str, Any] | None = None, state: str | None = None) -> TrialFigureData:
    """One trial's figure data: `epochs` are its metric rows (`epoch` and any of TRIAL_METRICS, NaN
    kept), `diagnosis` its stored diagnosis (the contract's output) or None."""
    rows = sorted(epochs, key=lambda r: int(r["epoch"]))
    numbers = [int(r["epoch"]) for r in rows]
    series = {m: [finite(r.get(m)) for r in rows] for m in TRIAL_METRICS}
    non_finite = {m: [int(r["epoch"]) for r in rows if _non_finite(r.get(m))] for m in TRIAL_METRICS}
    loss_at = {}
    for number, train, val in zip(numbers, series["train_loss"], series["val_loss"]):
        loss_at[number] = val if val is not None else train
    verdict = diagnosis.get("verdict") if diagnosis else None
    findings = []
    for finding in (diagnosis or {}).get("findings") or []:
        epoch = finding.get("epoch")
        if epoch is None:
            continue
        findings.append(FindingMark(kind=str(finding.get("kind")), epoch=int(epoch),
                                    evidence=str(finding.get("evidence", "")), y=loss_at.get(int(epoch)),
                                    primary=finding.get("kind") == verdict))
    return TrialFigureData(
        study=study, trial=trial, state=state, verdict=verdict,
        healthy=None if not diagnosis else bool(diagnosis.get("healthy", verdict in HEALTHY_VERDICTS)),
        confidence=finite(diagnosis.get("confidence")) if diagnosis else None,
        title=verdict_title(study, trial, state, diagnosis), epochs=numbers, series=series, non_finite=non_finite,
        findings=findings, remedies=list((diagnosis or {}).get("remedies") or []),
        summary=(diagnosis or {}).get("summary"))


# ---------------------------------------------------------------- a study


@dataclass(frozen=True)
class StudyTrial:
    """One trial as the study figures see it."""

    number: int
    state: str  # Optuna's state name, lower case: complete, pruned, fail, running, waiting
    value: float | None  # the objective (the last reported one for a pruned trial); None when not finite
    params: dict[str, Any]
    verdict: str | None
    curve: list[tuple[int, float | None]] = field(default_factory=list)  # (epoch, loss) for the overlay


@dataclass(frozen=True)
class VerdictGroup:
    verdict: str
    numbers: list[int]
    values: list[Any]


@dataclass(frozen=True)
class StudyFigureData:
    study: str
    direction: str
    metric: str
    verdict_counts: dict[str, int]  # in VERDICT_ORDER, only verdicts that occur
    history: list[VerdictGroup]  # objective value by trial number, per verdict
    best: tuple[list[int], list[float]]  # best value so far, at each trial that had a value
    parallel: dict[str, Any]  # {"dimensions": [{"label", "values", "log"}], "verdicts": [...], "numbers": [...]}
    lr_objective: list[VerdictGroup]  # values: [(lr, objective)] per verdict
    curves: list[dict[str, Any]]  # {"number", "verdict", "epochs", "loss"} for each overlaid trial
    curves_metric: str  # val_loss, or train_loss when no trial has a validation loss
    curves_shown: int
    curves_total: int
    trials: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdict_of(trial: StudyTrial) -> str:
    return trial.verdict or UNDIAGNOSED


def _groups(trials: Sequence[StudyTrial], value: Any) -> list[VerdictGroup]:
    by_verdict: dict[str, VerdictGroup] = {}
    for t in trials:
        v = value(t)
        if v is None:
            continue
        group = by_verdict.setdefault(verdict_of(t), VerdictGroup(verdict_of(t), [], []))
        group.numbers.append(t.number)
        group.values.append(v)
    return [by_verdict[v] for v in VERDICT_ORDER if v in by_verdict]


def spread(items: Sequence[Any], at_most: int) -> list[Any]:
    """At most `at_most` items, evenly spread, first and last kept."""
    if len(items) <= at_most:
        return list(items)
    if at_most <= 1:
        return list(items[:at_most])
    step = (len(items) - 1) / (at_most - 1)
    return [items[round(i * step)] for i in range(at_most)]


def study_figure_data(study: str, direction: str, metric: str, trials: Sequence[StudyTrial],
                      max_curves: int = MAX_CURVES, curves_metric: str = "val_loss",
                      curves_total: int | None = None) -> StudyFigureData:
    """The study's five figures' data, from its trials (attempts that were rerun left out by the caller).

    The loss-curve overlay shows at most `max_curves` trials with a curve, evenly spread over the
    study; `curves_total` is how many had one, when the caller already left curves out."""
    trials = sorted(trials, key=lambda t: t.number)
    counts = Counter(verdict_of(t) for t in trials)
    best_numbers: list[int] = []
    best_values: list[float] = []
    best: float | None = None
    for t in trials:
        if t.state != "complete" or t.value is None:
            continue
        if best is None or (t.value < best if direction == "minimize" else t.value > best):
            best = t.value
        best_numbers.append(t.number)
        best_values.append(best)

    with_value = [t for t in trials if t.value is not None]
    complete_params = [t for t in with_value if all(finite(t.params.get(p)) is not None for p in PARAM_NAMES)]
    dimensions = [{"label": p, "values": [float(t.params[p]) for t in complete_params], "log": p in LOG_PARAMS}
                  for p in PARAM_NAMES]
    dimensions.append({"label": metric, "values": [t.value for t in complete_params], "log": False})
    parallel = {"dimensions": dimensions, "verdicts": [verdict_of(t) for t in complete_params],
                "numbers": [t.number for t in complete_params]}

    def lr_and_value(t: StudyTrial) -> tuple[float, float] | None:
        lr = finite(t.params.get("lr"))
        return None if lr is None or t.value is None else (lr, t.value)

    with_curve = [t for t in trials if any(loss is not None for _, loss in t.curve)]
    shown = spread(with_curve, max_curves)
    curves = [{"number": t.number, "verdict": verdict_of(t), "epochs": [e for e, _ in t.curve],
               "loss": [loss for _, loss in t.curve]} for t in shown]
    return StudyFigureData(
        study=study, direction=direction, metric=metric,
        verdict_counts={v: counts[v] for v in VERDICT_ORDER if counts[v]},
        history=_groups(trials, lambda t: t.value), best=(best_numbers, best_values),
        parallel=parallel, lr_objective=_groups(trials, lr_and_value), curves=curves,
        curves_metric=curves_metric, curves_shown=len(shown),
        curves_total=len(with_curve) if curves_total is None else max(curves_total, len(shown)), trials=len(trials))


def loss_curve(rows: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[int, float | None]]]:
    """The curve a trial shows in the overlay: its validation loss, else its training loss."""
    metric = "val_loss" if any(finite(r.get("val_loss")) is not None for r in rows) else "train_loss"
    return metric, [(int(r["epoch"]), finite(r.get(metric))) for r in rows]


# ---------------------------------------------------------------- notes


def _plain(value: Any) -> str:
    """A value as people read it, not as Python prints it: 3 significant digits for a float
    (0.000316, not 0.00031622776601683794), a whole float without ".0", true/false, and a mapping
    or a list as "key value, ..." rather than their Python form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.3g}" if math.isfinite(value) else str(value).lower()  # nan, inf, -inf
    if isinstance(value, Mapping):
        return ", ".join(f"{key} {_plain(v)}" for key, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    return str(value)


def _remedy_text(remedy: Mapping[str, Any]) -> str:
    param, action = remedy.get("param"), remedy.get("action") or "change"
    target = f" `{param}`" if param else ""
    if action == "set" and remedy.get("value") is not None:
        change = f"set{target} to {_plain(remedy['value'])}"
    elif remedy.get("factor") is not None:
        change = f"{action}{target} ×{_plain(remedy['factor'])}"
    else:
        change = f"{action}{target}"
    reason = remedy.get("reason")
    return f"{change}: {_plain(reason)}" if reason else change


def _finding_text(finding: Mapping[str, Any]) -> str:
    """E.g. "- **overfitting** (epoch 3): val_loss rose 34% above its minimum"; no epoch part for a
    finding without one (a trend over the whole run)."""
    epoch, evidence = finding.get("epoch"), finding.get("evidence")
    return (f"- **{finding.get('kind') or 'finding'}**" + (f" (epoch {_plain(epoch)})" if epoch is not None else "")
            + (f": {_plain(evidence)}" if evidence else ""))


def diagnosis_note(trial: int, diagnosis: Mapping[str, Any] | None, epoch: int | None = None) -> str:
    """A trial's diagnosis as the Markdown of its optuna-dashboard note: verdict, evidence, remedies."""
    if not diagnosis:
        return f"## Converge: trial {trial}\n\nNo diagnosis: no epoch was recorded.\n"
    verdict = diagnosis.get("verdict") or "no verdict"
    confidence = finite(diagnosis.get("confidence"))
    health = "healthy" if diagnosis.get("healthy", verdict in HEALTHY_VERDICTS) else "unhealthy"
    onset = diagnosis.get("onset_epoch")
    lines = [f"## Converge: {verdict}", "",
             f"**Verdict:** `{verdict}` ({health}" + (f", confidence {confidence:.2f}" if confidence is not None
                                                      else "") + ")"
             + (f", from epoch {_plain(onset)}" if onset is not None else "")
             + (f"; last epoch seen {epoch}" if epoch is not None else "") + "."]
    if diagnosis.get("summary"):
        lines += ["", _plain(diagnosis["summary"])]
    findings = [f for f in diagnosis.get("findings") or [] if isinstance(f, Mapping)]
    if findings:
        lines += ["", "### Evidence", ""]
        lines += [_finding_text(f) for f in findings]
    remedies = [r for r in diagnosis.get("remedies") or [] if isinstance(r, Mapping)]
    if remedies:
        lines += ["", "### Remedies", ""]
        lines += [f"{i}. {_remedy_text(r)}" for i, r in enumerate(remedies, 1)]
    return "\n".join(lines) + "\n"
