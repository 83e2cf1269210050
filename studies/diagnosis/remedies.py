"""Remedies: each verdict's changes to the swept hyperparameters, most likely fix first.

`gradient_clip` and `model` appear only where no swept hyperparameter is the fix.
`apply_remedy` turns a remedy into new trial parameters (used to rerun a trial repaired).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from converge.studies.diagnosis.history import History
from converge.studies.diagnosis.result import Remedy
from converge.studies.diagnosis.rules import PEER_POOR, Candidate, good_lr, lr_no_higher_than_peers, peer_gap


def remedies_for(candidate: Candidate, h: History) -> list[Remedy]:
    """The verdict's remedies, most likely fix first; with a context, sized toward the study's good
    trials and kept inside the search space (`fit_to_context`)."""
    remedies = _by_verdict(candidate, h)
    return fit_to_context(remedies, candidate, h) if h.context is not None else remedies


def _by_verdict(candidate: Candidate, h: History) -> list[Remedy]:
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
        if facts.get("regularised"):
            return [Remedy("dropout", "decrease", "training loss stays above validation loss: dropout is holding "
                                                  "the descent back", factor=0.3),
                    Remedy("weight_decay", "decrease", "less regularisation lets the model fit faster", factor=0.1),
                    Remedy("epochs", "increase", "more epochs let the slow descent finish", factor=2)]
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


# ---------------------------------------------------------------- with a context

LOG_PARAMS = ("lr", "weight_decay", "batch_size")  # compared on a log scale (ratios, not differences)
LR_MOVES = ("diverged", "exploding_gradients", "oscillating")  # verdicts whose first remedy lowers lr
MAX_LR_STEP = 10.0  # the most a run that still learns has its lr moved toward the good trials' in one repair
LR_WEIGHT = 2.0  # the learning rate matters most (Bengio 2012): its distance from the good trials' counts double
NEGLIGIBLE_DECAY = 1e-4  # weight decays below this all act alike within a sweep's epochs: compared as equal
SMALL_DROPOUT = 0.2  # a dropout below this is not what keeps a run's training loss above its validation loss


def fit_to_context(remedies: list[Remedy], candidate: Candidate, h: History) -> list[Remedy]:
    """The remedies as the trial's parameters, the study's bounds and its good trials allow, step by step:

    - `_size_lr_cut`: a too-large learning rate is lowered toward the good trials' lr;
    - `_separating_first`: a run far behind its peers with nothing in its own curve to blame first moves
      the hyperparameter that most separates it from the good trials;
    - `_drop_no_ops`: no change that cannot act (a negligible weight decay or small dropout lowered; an
      lr lowered for swings at an lr the good trials also used);
    - `_cap_lr_increase`: never `lr increase` at or above a good trial's lr or at the top of the range;
    - every change inside the bounds, or saying that the bounds forbid it ("widen the lr range below 1e-05").
    """
    ctx = h.context
    assert ctx is not None
    out = list(remedies)
    for step in (_size_lr_cut, _separating_first, _drop_no_ops, _cap_lr_increase):
        out = step(out, candidate, h)
    return [_inside_bounds(r, ctx) for r in out]


def _size_lr_cut(out: list[Remedy], candidate: Candidate, h: History) -> list[Remedy]:
    """An lr decrease sized toward the good trials' lr (their geometric mean), where theirs is lower: all the
    way where the evidence says the steps are far too large (a blow-up, a loss jumping 3x back above its
    start), a decade at most for a run that merely swings (the good trials may have taken more steps)."""
    lr, typical = h.context.params.get("lr"), good_lr(h)  # type: ignore[union-attr]
    if candidate.verdict not in LR_MOVES or not lr or not typical or typical >= lr:
        return out
    far_too_high = candidate.verdict == "diverged" or "jump" in candidate.facts
    target = typical if far_too_high else max(typical, lr / MAX_LR_STEP)
    return [_toward(r, "lr", lr, target, f"the study's good trials trained at lr near {typical:.3g}")
            if r.param == "lr" and r.action == "decrease" else r for r in out]


def _separating_first(out: list[Remedy], candidate: Candidate, h: History) -> list[Remedy]:
    """A poor underfitting, slow or overfit run first moves what most sets it apart from the good trials. A run
    whose loss has hardly moved risks little in a long lr move; one that learns, a decade at most."""
    if candidate.verdict not in ("underfitting", "slow_convergence", "overfitting") or not _behind_peers(h):
        return out  # (an overfit run far behind the best: stopping at its best epoch leaves it behind)
    stuck = candidate.facts.get("progress", 1.0) < 0.2
    separating = _separating_param(h.context, max_lr_step=math.inf if stuck else MAX_LR_STEP)
    return out if separating is None else [separating, *(r for r in out if r.param != separating.param)]


def _drop_no_ops(out: list[Remedy], candidate: Candidate, h: History) -> list[Remedy]:
    """Leave out what cannot act: lowering a weight decay that does nothing or a dropout too small to hold a
    run back, and lowering the lr of a run that swings (no 3x jump) at an lr no higher than the good trials':
    gradient noise, which a larger batch averages out."""
    params = h.context.params  # type: ignore[union-attr]
    decay, dropout = params.get("weight_decay"), params.get("dropout")
    noisy = candidate.verdict == "oscillating" and "jump" not in candidate.facts and lr_no_higher_than_peers(h)

    def no_op(r: Remedy) -> bool:
        if r.action != "decrease":
            return False
        return ((r.param == "weight_decay" and decay is not None and decay <= NEGLIGIBLE_DECAY)
                or (r.param == "dropout" and dropout is not None and dropout < SMALL_DROPOUT)
                or (r.param == "lr" and noisy))

    return [r for r in out if not no_op(r)]


def _cap_lr_increase(out: list[Remedy], candidate: Candidate, h: History) -> list[Remedy]:
    """No lr increase at or above a good trial's lr or at the range's top (a slow run gets more epochs
    instead); below the good trials', an increase goes as far as their lr, not a fixed decade."""
    ctx, typical = h.context, good_lr(h)
    lr = ctx.params.get("lr")  # type: ignore[union-attr]
    if not lr:
        return out
    if _lr_high_enough(ctx, lr):
        out = [r for r in out if not (r.param == "lr" and r.action == "increase")]
        if candidate.verdict == "slow_convergence" and not any(r.param == "epochs" for r in out):
            out.append(Remedy("epochs", "increase", "more epochs let the slow descent finish", factor=2))
        return out
    if typical and typical > lr:
        return [_toward(r, "lr", lr, typical, f"the study's good trials trained at lr near {typical:.3g}")
                if r.param == "lr" and r.action == "increase" and r.factor and lr * r.factor > typical else r
                for r in out]
    return out


def _behind_peers(h: History) -> bool:
    gap = peer_gap(h)
    return gap is not None and gap > PEER_POOR


def _lr_high_enough(ctx: Any, lr: float) -> bool:
    """At or above the lr of one of the good trials, or at the top of the lr range: a larger one is no remedy."""
    good = [float(p.params["lr"]) for p in ctx.peers.good() if p.params.get("lr")] if ctx.peers is not None else []
    bound = ctx.bounds.get("lr")
    return (bool(good) and lr >= min(good) * 0.999) or (bound is not None and lr >= bound.high * 0.999)


def _toward(remedy: Remedy, param: str, current: float, target: float, why: str) -> Remedy:
    factor = float(f"{target / current:.2g}")
    return Remedy(param, remedy.action, f"{remedy.reason}; {why}", factor=factor)


def _separating_param(ctx: Any, max_lr_step: float = MAX_LR_STEP) -> Remedy | None:
    """The swept hyperparameter by which the trial differs most from the good trials (in units of its
    search range, on a log scale where the range is), as a remedy moving it to their value."""
    apart: list[tuple[float, str, float, float]] = []  # (distance, name, mine, theirs)
    for name in ("lr", "weight_decay", "dropout", "batch_size"):
        mine, theirs = ctx.params.get(name), ctx.peers.typical(name) if ctx.peers is not None else None
        if mine is None or theirs is None or mine == theirs:
            continue
        if name in ("weight_decay", "dropout") and theirs > mine:
            continue  # more regularisation does not help a run that fits too little
        if name == "weight_decay" and max(mine, theirs) <= NEGLIGIBLE_DECAY:
            continue
        bound = ctx.bounds.get(name)
        logs = name in LOG_PARAMS and mine > 0 and theirs > 0
        if name == "weight_decay" and logs:
            distance = abs(math.log10(max(mine, NEGLIGIBLE_DECAY) / max(theirs, NEGLIGIBLE_DECAY)))
        else:
            distance = abs(math.log10(mine / theirs)) if logs else abs(mine - theirs)
        if bound is not None and bound.high > bound.low:
            span = (math.log10(bound.high / bound.low) if logs and bound.low > 0 else bound.high - bound.low)
            distance /= max(span, 1e-12)
        elif logs:
            distance /= 3.0  # three decades: a common range
        if name == "lr":
            distance *= LR_WEIGHT
        if distance >= 0.2:  # below that no parameter stands out: the curve's own remedies apply
            apart.append((distance, name, mine, theirs))
    # Batch size trades speed for gradient noise: rarely what keeps a run poor, so only when nothing else differs.
    ranked = [a for a in apart if a[1] != "batch_size"] or apart
    if not ranked:
        return None
    _, name, mine, theirs = max(ranked)
    action = "increase" if theirs > mine else "decrease"
    if name == "lr":  # the good trials' lr may go with more epochs or other settings: `max_lr_step` at most
        theirs = min(max(theirs, mine / max_lr_step), mine * max_lr_step)
    why = (f"the run sits far behind the study's good trials, and {name} is what sets it apart most: "
           f"{mine:.3g} here against {theirs:.3g} there")
    if mine == 0:
        return Remedy(name, "set", why, value=float(f"{theirs:.2g}"))
    return Remedy(name, action, why, factor=float(f"{theirs / mine:.2g}"))


def _inside_bounds(remedy: Remedy, ctx: Any) -> Remedy:
    """The remedy clipped into the study's search space, or saying that the bounds forbid it."""
    bound = ctx.bounds.get(remedy.param)
    current = ctx.params.get(remedy.param)
    if bound is None or current is None or remedy.param not in ("lr", "batch_size", "epochs", "weight_decay",
                                                                  "dropout"):
        return remedy
    if remedy.value is not None and isinstance(remedy.value, int | float):
        wanted = float(remedy.value)
    elif remedy.factor is not None:
        wanted = float(_scaled(remedy.param, current, remedy.factor))
    else:
        return remedy
    fitted = bound.clip(wanted)
    if fitted == wanted:
        return remedy
    if fitted == current or (wanted - current) * (fitted - current) <= 0:
        below = wanted < current
        edge = bound.low if below else bound.high
        return Remedy(remedy.param, remedy.action, f"{remedy.reason}; but {remedy.param} {current:.3g} is already at "
                                                   f"the {'bottom' if below else 'top'} of the search space: widen the "
                                                   f"{remedy.param} range {'below' if below else 'above'} {edge:g}",
                      factor=remedy.factor, value=remedy.value)
    reason = f"{remedy.reason} (as far as the search space allows: {fitted:g})"
    if remedy.param in ("batch_size", "epochs"):
        return Remedy(remedy.param, "set", reason, value=int(fitted))
    return Remedy(remedy.param, remedy.action, reason, factor=float(f"{fitted / current:.3g}") if current else None,
                  value=None if current else fitted)
