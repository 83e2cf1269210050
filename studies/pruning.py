"""The `convergence` pruner's own rules: stop a trial whose live diagnosis says it is beyond saving.

The pruner is two things: a multi-fidelity Optuna pruner over epochs (the spec's `base`,
Hyperband by default), which the objective reports to as with any pruner, and these rules,
which the objective checks against each epoch's diagnosis first. A trial that diverged or
whose gradients exploded or vanished will not recover, so it stops at once; one that learns
too slowly or not enough stops only once the diagnosis is confident and the trial has run a
fair share of its epochs (`min_fraction`), since early epochs of a healthy run can look slow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PRUNED_BY_ATTR = "converge_pruned_by"  # the trial's user attribute: {"rule": ..., "epoch": ..., "reason": ...}
HOPELESS = frozenset({"diverged", "exploding_gradients", "vanishing_gradients"})
POOR = frozenset({"slow_convergence", "underfitting"})
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
                   min_fraction: float, min_confidence: float) -> PruneDecision | None:
    """The rule that prunes the trial at this epoch, from its latest diagnosis; None to go on."""
    verdict = diagnosis["verdict"]
    confidence = float(diagnosis["confidence"])
    if verdict in HOPELESS:
        return PruneDecision(verdict, epoch, f"{verdict} (confidence {confidence:.2f}): {diagnosis['summary']}")
    if verdict in POOR and confidence >= min_confidence and epochs_seen >= min_fraction * max_epochs:
        return PruneDecision(verdict, epoch, f"{verdict} with confidence {confidence:.2f} after {epochs_seen} of "
                                             f"{max_epochs} epochs: {diagnosis['summary']}")
    return None
