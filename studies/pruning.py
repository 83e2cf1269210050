"""The `convergence` pruner's own rules: stop a trial whose live diagnosis says it is beyond saving.

The pruner is two things: a multi-fidelity Optuna pruner over epochs (the spec's `base`,
Hyperband by default), which the objective reports to as with any pruner, and these rules,
which the objective checks against each epoch's diagnosis first. A trial that diverged or
whose gradients exploded or vanished will not recover, so it stops at once; one that learns
too slowly or not enough stops only once the diagnosis is confident, the trial has run a
fair share of its epochs (`min_fraction`), since early epochs of a healthy run can look slow,
and its objective is behind the median of the study's ended trials at the same epoch.

Apart from pruning, a trial whose diagnosis says it is done (converged: flat near its best;
overfitting: its validation loss rising while training loss falls) is completed early with its
objective at that epoch: the epochs it would still train buy nothing (`early_stop_rule`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

PRUNED_BY_ATTR = "converge_pruned_by"  # the trial's user attribute: {"rule": ..., "epoch": ..., "reason": ...}
STOPPED_EARLY_ATTR = "converge_stopped_early"  # the same, for a trial completed early (`early_stop_rule`)
DONE = frozenset({"converged", "overfitting"})  # more epochs would not improve the objective
HOPELESS = frozenset({"diverged", "exploding_gradients", "vanishing_gradients"})
POOR = frozenset({"slow_convergence", "underfitting"})
MIN_PEERS = 4  # ended trials with a value at the epoch before a slow or underfitting trial can be "behind"
DIAGNOSIS_RULES = HOPELESS | POOR  # the rules that prune by diagnosis (any other rule is the base pruner)


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
                   behind_peers: Callable[[], bool] = lambda: False) -> PruneDecision | None:
    """The rule that prunes the trial at this epoch, from its latest diagnosis; None to go on.

    `behind_peers` (asked only for a confident slow or underfitting trial) says whether its
    objective is worse than its peers' at this epoch: a trial's history alone cannot tell a slow
    run from a task whose best loss is high (a noisy regression target, a run with dropout
    whose training loss stays above its validation loss), and such runs often end healthy.
    """
    verdict = diagnosis["verdict"]
    confidence = float(diagnosis["confidence"])
    if verdict in HOPELESS:
        return PruneDecision(verdict, epoch, f"{verdict} (confidence {confidence:.2f}): {diagnosis['summary']}")
    if (verdict in POOR and confidence >= min_confidence and epochs_seen >= min_fraction * max_epochs
            and behind_peers()):
        return PruneDecision(verdict, epoch, f"{verdict} with confidence {confidence:.2f} after {epochs_seen} of "
                                             f"{max_epochs} epochs, behind the median of its peers: "
                                             f"{diagnosis['summary']}")
    return None


def behind_peers(value: float | None, peer_values: Iterable[float], direction: str,
                 min_peers: int = MIN_PEERS) -> bool:
    """Whether `value` is worse than the median of the peers' values at the same epoch; False with
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
