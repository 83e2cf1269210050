"""Remedies: each verdict's changes to the swept hyperparameters, most likely fix first.

`gradient_clip` and `model` appear only where no swept hyperparameter is the fix.
`apply_remedy` turns a remedy into new trial parameters (used to rerun a trial repaired).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from studies.diagnosis.history import History
from studies.diagnosis.result import Remedy
from studies.diagnosis.rules import Candidate


def remedies_for(candidate: Candidate, h: History) -> list[Remedy]:
    verdict, facts = candidate.verdict, candidate.facts
    if verdict == "diverged":
        if facts.get("collapsed"):
            first = Remedy("lr", "decrease", "the loss blew up and the network never recovered a useful level: "
                                             "steps are orders of magnitude too large", factor=0.01)
        else:
            first = Remedy("lr", "decrease", "the loss blew up: steps are far too large", factor=0.1)
        return [first,
                Remedy("gradient_clip", "enable", "caps the update a single bad batch can make", value=1.0),
                Remedy("batch_size", "increase", "larger batches give less noisy, safer steps", factor=2)]
    if verdict == "exploding_gradients":
        return [Remedy("lr", "decrease", "smaller steps keep the weights out of the steep region", factor=0.1),
                Remedy("gradient_clip", "enable", "clipping bounds the exploding updates directly", value=1.0),
                Remedy("weight_decay", "increase", "keeps weight norms, and with them gradients, bounded", factor=10)]
    if verdict == "vanishing_gradients":
        return [Remedy("model", "set", "gradients die on the way back through the layers; no learning-rate change "
                                       "fixes that", value="ReLU activations, fewer layers or normalisation layers"),
                Remedy("lr", "increase", "larger steps make tiny gradients count while the model is changed",
                       factor=10)]
    if verdict == "oscillating":
        return [Remedy("lr", "decrease", "the optimiser overshoots the minimum on every step; a decade down, as "
                                         "a third of the rate often still overshoots", factor=0.1),
                Remedy("batch_size", "increase", "averages out the gradient noise behind the swings", factor=2)]
    if verdict == "slow_convergence":
        return [Remedy("lr", "increase", "the loss falls steadily but slowly: steps are too small", factor=10),
                Remedy("epochs", "increase", "more epochs let the slow descent finish", factor=2)]
    if verdict == "overfitting":
        best = int(facts.get("best_epoch", candidate.onset or 0))
        return [Remedy("epochs", "set", f"validation loss was lowest at epoch {best}: stop there", value=best + 1),
                Remedy("weight_decay", "increase", "penalises the weights that fit noise in the training set",
                       factor=10),
                Remedy("dropout", "increase", "regularises the network so it generalises", factor=2)]
    if verdict == "underfitting":
        if facts.get("regularised"):
            return [Remedy("dropout", "decrease", "training loss stays above validation loss: dropout is holding "
                                                  "the network back", factor=0.3),
                    Remedy("weight_decay", "decrease", "less regularisation lets the model fit", factor=0.1),
                    Remedy("model", "increase", "a larger model can fit what this one cannot", value="wider or deeper")]
        if facts.get("progress", 1.0) < 0.2:
            return [Remedy("lr", "increase", "the loss has hardly moved from where it started: steps are too small "
                                             "to get anywhere", factor=10),
                    Remedy("weight_decay", "decrease", "strong weight decay can pin the weights near zero",
                           factor=0.1),
                    Remedy("model", "increase", "a larger model can fit what this one cannot", value="wider or deeper")]
        return [Remedy("weight_decay", "decrease", "strong weight decay can pin the weights near zero", factor=0.1),
                Remedy("model", "increase", "the loss settled at a poor level: the model lacks capacity",
                       value="wider or deeper"),
                Remedy("lr", "increase", "larger steps may escape the plateau", factor=3)]
    if verdict == "still_improving" and h.max_epochs is not None and len(h) >= h.max_epochs:
        return [Remedy("epochs", "increase", "the loss was still falling when the run ended", factor=2)]
    return []


def apply_remedy(params: Mapping[str, Any], remedy: Remedy) -> dict[str, Any]:
    """New trial parameters with `remedy` applied; raises ValueError for a remedy no parameter expresses."""
    out = dict(params)
    if remedy.param == "model":
        raise ValueError("a 'model' remedy changes the architecture; it cannot be applied as a parameter")
    if remedy.param == "gradient_clip":
        out["gradient_clip"] = float(remedy.value if remedy.value is not None else 1.0)
        return out
    if remedy.value is not None:
        out[remedy.param] = remedy.value
    elif remedy.factor is not None:
        current = out.get(remedy.param)
        if current is None:
            raise ValueError(f"params have no {remedy.param!r} to scale by {remedy.factor:g}")
        out[remedy.param] = _scaled(remedy.param, float(current), remedy.factor)
    return out


def _scaled(param: str, current: float, factor: float) -> float | int:
    if param in ("batch_size", "epochs"):
        return max(1, int(round(current * factor)))
    if param == "dropout":
        return min(0.9, current * factor) if current > 0 else (0.1 if factor > 1 else 0.0)
    if param == "weight_decay" and current == 0 and factor > 1:
        return 1e-4  # scaling zero changes nothing; start from a common small value
    return current * factor if math.isfinite(current) else current
