"""The `convergence` pruner's own rules: stop a trial whose live diagnosis says it is beyond saving.

The pruner is two things: a multi-fidelity Optuna pruner over epochs (the spec's `base`,
Hyperband by default), which the objective reports to as with any pruner, and these rules,
which the objective checks against each epoch's diagnosis first. A trial that diverged or
whose gradients exploded or vanished will not recover, so it stops at once; except a diverged
trial whose training loss is back under its first epoch's (`came_back`): a first epoch blown far above
an untrained network's loss that settles again is how unscaled inputs start, and some such runs go
on to learn. That one, and one that learns too slowly, not enough, or oscillates, stops only when
all of these hold: the diagnosis is confident; the trial has run a fair share of its epochs
(`min_fraction`), since early epochs of a healthy run can look slow; its loss is not still
falling at a rate that would read as improving over its whole run (`still_falling`); and its best
objective so far is behind the median of the study's ended trials' best by the same epoch
(`behind_peers`).

A third rule reads the objective's curve rather than its diagnosis (`extrapolation_rule`): past
`min_fraction`, the curve so far is extrapolated to the trial's last epoch (`studies.extrapolation`)
and the trial stops when it would very probably (`extrapolation_probability`) not end better than
the study's `extrapolation_top_k`-th best completed trial.

Apart from pruning, a trial whose diagnosis says it is done (converged: flat near its best;
overfitting: its validation loss rising while training loss falls) is completed early with its
objective at that epoch: the epochs it would still train buy nothing (`early_stop_rule`).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from converge.studies import extrapolation
from converge.studies.diagnosis import signals

log = logging.getLogger("converge.pruning")

PRUNED_BY_ATTR = "converge_pruned_by"  # the trial's user attribute: {"rule": ..., "epoch": ..., "reason": ...}
STOPPED_EARLY_ATTR = "converge_stopped_early"  # the same, for a trial completed early (`early_stop_rule`)
DONE = frozenset({"converged", "overfitting"})  # more epochs would not improve the objective
HOPELESS = frozenset({"diverged", "exploding_gradients", "vanishing_gradients"})
POOR = frozenset({"slow_convergence", "underfitting", "oscillating"})
MIN_PEERS = 2  # ended trials with a value by the epoch before a poor trial can be "behind"
# A loss that would still fall by this share over the last fifth of the full run is still falling:
# between the diagnosis' flat (2%) and improving (5%) marks, on the safe side of slow.
STILL_FALLING = 0.03
DIAGNOSIS_RULES = HOPELESS | POOR  # the rules that prune by diagnosis
EXTRAPOLATION = "extrapolation"  # the rule that prunes by the learning curve's forecast (`extrapolation_rule`)
CONVERGENCE_RULES = DIAGNOSIS_RULES | {EXTRAPOLATION}  # the pruner's own rules; any other is the base pruner


@dataclass(frozen=True)
class PruneDecision:
    """Why a trial was pruned: the rule (a verdict, or the base pruner's name) and the epoch."""

    rule: str
    epoch: int
    reason: str

    def as_attr(self) -> dict[str, Any]:
        return {"rule": self.rule, "epoch": self.epoch, "reason": self.reason}


def diagnosis_rule(diagnosis: dict[str, Any], epoch: int, epochs_seen: int, max_epochs: int, *,
                   min_fraction: float, min_confidence: float,
                   behind_peers: Callable[[], bool] = lambda: False,
                   still_falling: Callable[[], bool] = lambda: False,
                   came_back: Callable[[], bool] = lambda: False) -> PruneDecision | None:
    """The rule that prunes the trial at this epoch, from its latest diagnosis; None to go on.

    `came_back` (asked of a diverged trial only) says whether its training loss is back under its
    first epoch's; such a trial is judged as a poor one. The other two callables are asked only for a
    confident poor trial past `min_fraction`.
    `behind_peers` says whether its objective is worse than its peers' by this epoch: a trial's
    history alone cannot tell a slow run from a task whose best loss is high (a noisy regression
    target, a run with dropout whose training loss stays above its validation loss), and such
    runs often end healthy. `still_falling` (not asked of an oscillating trial, whose slope is
    noise) says whether its loss falls fast enough to end as still improving.
    """
    verdict = diagnosis["verdict"]
    confidence = float(diagnosis["confidence"])
    recovering = verdict == "diverged" and came_back()
    if verdict in HOPELESS and not recovering:
        return PruneDecision(verdict, epoch, f"{verdict} (confidence {confidence:.2f}): {diagnosis['summary']}")
    if ((verdict in POOR or recovering) and confidence >= min_confidence and epochs_seen >= min_fraction * max_epochs
            and (verdict == "oscillating" or not still_falling()) and behind_peers()):
        return PruneDecision(verdict, epoch, f"{verdict} with confidence {confidence:.2f} after {epochs_seen} of "
                                             f"{max_epochs} epochs, behind the median of its peers: "
                                             f"{diagnosis['summary']}")
    return None


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def kth_best(values: Iterable[float], k: int, direction: str) -> float | None:
    """The k-th best finite value (the lowest first when minimising); None with fewer than `k`."""
    ranked = sorted((v for v in values if math.isfinite(v)), reverse=direction == "maximize")
    return ranked[k - 1] if len(ranked) >= k else None


def extrapolation_rule(reported: Mapping[int, float], epoch: int, max_epochs: int,
                       completed: Callable[[], Sequence[float]], *, direction: str, top_k: int, probability: float,
                       min_fraction: float, trial_number: int | None = None) -> PruneDecision | None:
    """Prune a trial whose objective, extrapolated to its last epoch, would very probably
    (`probability`) not beat the study's `top_k`-th best completed value; None to go on.

    `reported`: the trial's objective by epoch so far; `completed`: the study's completed values, asked
    only once there is a forecast. The rule abstains, saying why in the debug log, where
    `studies.extrapolation.predict` does (too few points, non-finite values, a flat start) and with
    fewer than `top_k` completed trials; before `min_fraction` of the epochs it is not asked.
    """
    if len(reported) < min_fraction * max_epochs:
        return None
    forecast = extrapolation.predict(dict(reported), max_epochs - 1)
    if isinstance(forecast, extrapolation.Abstain):
        log.debug("trial %s, epoch %d: no extrapolation: %s", trial_number, epoch, forecast.reason)
        return None
    kth = kth_best(completed(), top_k, direction)
    if kth is None:
        log.debug("trial %s, epoch %d: no extrapolation: fewer than %d completed trials", trial_number, epoch, top_k)
        return None
    if forecast.probability_better_than(kth, direction) > 1.0 - probability:
        return None
    return PruneDecision(EXTRAPOLATION, epoch, f"predicted {forecast.mean:.4g} ± {forecast.std:.2g} at epoch "
                                               f"{forecast.epoch}; {_ordinal(top_k)} best is {kth:.4g}")


def came_back(losses: Sequence[float | None]) -> bool:
    """Whether the latest loss is finite and below the first: a run that blew up and is still up there,
    or is not finite, has not."""
    finite = [v for v in losses if v is not None and math.isfinite(v)]
    return bool(finite) and losses[-1] is not None and math.isfinite(losses[-1]) and losses[-1] < finite[0]


def _tail_span(epochs: int) -> int:
    """How many epochs the diagnosis' last-fifth window spans after `epochs` epochs."""
    return max(1, epochs - signals.tail_start(epochs) - 1)


def still_falling(losses: Sequence[float | None], max_epochs: int) -> bool:
    """Whether the loss, at the rate of its last fifth so far, would fall by `STILL_FALLING` or more
    over the last fifth of the full run.

    The diagnosis reads a trend over the last fifth of the epochs so far: 2 epochs early in a
    30-epoch run, 5 at its end. A steady run therefore reads slow (or flat: underfitting) early
    and still improving at its end; this rescales the early rate to the full run's window.
    """
    values = np.array([math.nan if v is None else v for v in losses], dtype=float)
    if len(values) < 2:
        return True
    with np.errstate(all="ignore"):
        drop = signals.tail_drop(values)
    return drop * _tail_span(max_epochs) / _tail_span(len(values)) >= STILL_FALLING


def best_until(values: Mapping[int, float], epoch: int, direction: str) -> float | None:
    """A peer's best finite value at or before `epoch`: what it had reached by then.

    A peer stopped before `epoch` counts with where it stopped, which flatters the trial being
    judged against it (the peer would have gone on improving), so no trial is called behind
    on a peer's missing epochs.
    """
    seen = [v for step, v in values.items() if step <= epoch and math.isfinite(v)]
    if not seen:
        return None
    return min(seen) if direction == "minimize" else max(seen)


def behind_peers(value: float | None, peer_values: Iterable[float], direction: str,
                 min_peers: int = MIN_PEERS) -> bool:
    """Whether `value` is worse than the median of the peers' values by the same epoch; False with
    fewer than `min_peers` finite ones (too early in the study to call anyone slow)."""
    finite = [v for v in peer_values if math.isfinite(v)]
    if value is None or not math.isfinite(value) or len(finite) < min_peers:
        return False
    median = statistics.median(finite)
    return value > median if direction == "minimize" else value < median


def early_stop_rule(diagnosis: dict[str, Any], epoch: int, epochs_seen: int, max_epochs: int, *,
                    min_fraction: float, min_confidence: float) -> PruneDecision | None:
    """The reason to complete the trial now, with its objective at this epoch; None to go on.

    Converged or overfitting, confidently, after `min_fraction` of its epochs (a short history's
    plateau can be a pause): the remaining epochs would keep its objective flat or make it worse.
    """
    verdict = diagnosis["verdict"]
    confidence = float(diagnosis["confidence"])
    if verdict in DONE and confidence >= min_confidence and epochs_seen >= min_fraction * max_epochs:
        return PruneDecision(verdict, epoch, f"{verdict} with confidence {confidence:.2f} after {epochs_seen} of "
                                             f"{max_epochs} epochs: {diagnosis['summary']}")
    return None
