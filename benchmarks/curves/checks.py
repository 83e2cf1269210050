"""Acceptance criteria: does a finished run really show its label's curve?

Each `check_<verdict>` returns None when the run shows that verdict's curve and otherwise the name
of the first criterion it fails. The checks read only the history plus a `Reference` - oracle
knowledge the diagnosis classifier does not have: the best validation loss and accuracy of
well-tuned healthy runs on the same data and loss ("good"), and their gradient norm while learning
("a working run's"). A run is kept only when its own label's check passes and every other check
fails, so no kept run is ambiguous between two verdicts.

Conventions shared by the checks:
- losses are first shifted by the reference's floor (0 for cross-entropy and MSE, which cannot go
  below 0; the Bayes-optimal NLL for a Gaussian NLL, which can), so ratios and percentages are
  taken on a positive excess loss whatever the loss's scale or sign;
- "the loss" is `val_loss` when the history has it, else `train_loss`;
- "the last fifth" is the last max(3, round(n/5)) epochs, and its change is the relative fall of a
  least-squares line through it, from its first to its last epoch (robust to one noisy epoch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

VERDICTS = ("diverged", "exploding_gradients", "vanishing_gradients", "oscillating", "slow_convergence",
            "still_improving", "converged", "overfitting", "underfitting")


@dataclass(frozen=True)
class Reference:
    """What "good" and "working" mean on one dataset and loss, from healthy reference runs."""

    best_val: float  # lowest val loss of the reference runs, shifted by `floor`
    best_acc: float | None  # highest val accuracy (classification)
    grad: float  # median grad norm over the first 5 epochs of the reference run
    floor: float = 0.0  # a loss no model beats in expectation; subtracted from every loss


@dataclass(frozen=True)
class Curve:
    """A history's series as float arrays (NaN/inf kept), losses shifted by the reference floor."""

    train: np.ndarray
    val: np.ndarray | None
    acc: np.ndarray | None
    grad: np.ndarray | None

    @classmethod
    def of(cls, epochs: list[dict], floor: float) -> Curve:
        def col(key: str) -> np.ndarray | None:
            if key not in epochs[0]:
                return None
            return np.array([float(row[key]) for row in epochs])

        val = col("val_loss")
        return cls(col("train_loss") - floor, None if val is None else val - floor, col("val_acc"), col("grad_norm"))

    @property
    def loss(self) -> np.ndarray:
        return self.val if self.val is not None else self.train

    @property
    def finite(self) -> bool:
        return all(np.isfinite(s).all() for s in (self.train, self.val) if s is not None)


def last_fifth(x: np.ndarray) -> np.ndarray:
    return x[-max(3, round(len(x) / 5)):]


def fall(x: np.ndarray) -> float:
    """Relative fall over the last fifth (> 0: falling), from a least-squares line so one noisy epoch cannot decide."""
    w = last_fifth(x)
    slope, start = np.polyfit(np.arange(len(w)), w, 1)
    return float(-slope * (len(w) - 1) / abs(start)) if start != 0 else math.inf


def rises(x: np.ndarray) -> float:
    """Fraction of epoch-to-epoch steps that go up."""
    return float((np.diff(x) > 0).mean())


def swing_stats(x: np.ndarray) -> tuple[float, float]:
    """Fraction of consecutive changes that flip sign, and the median |change| relative to the median level."""
    d = np.diff(x)
    flips = float((np.sign(d[1:]) * np.sign(d[:-1]) < 0).mean()) if len(d) > 1 else 0.0
    level = np.median(np.abs(x))
    return flips, float(np.median(np.abs(d)) / level) if level > 0 else 0.0


def divergence_onset(c: Curve) -> int | None:
    """First epoch from which a loss is non-finite or above 3x its first value through the end (None: never)."""
    onsets = []
    for x in (c.train, c.val):
        if x is None:
            continue
        bad = ~np.isfinite(x) | ((x > 3 * x[0]) if x[0] > 0 else np.zeros(len(x), bool))
        if not bad[-1]:
            continue
        start = len(x) - int(np.argmin(bad[::-1])) if not bad.all() else 0
        if np.isfinite(x[-1]) and len(x) - start < 2:
            continue  # one high last epoch could be a spike, not a divergence
        onsets.append(start)
    return min(onsets) if onsets else None


def check_diverged(c: Curve, ref: Reference) -> str | None:
    """The loss becomes NaN/inf, or climbs above 3x its first-epoch value and stays there to the end."""
    return None if divergence_onset(c) is not None else "loss finite and never stays above 3x its first value"


def explosion_epochs(c: Curve) -> np.ndarray:
    """Epochs whose grad_norm exceeds 100x the median of the first 3 epochs' grad norms."""
    early = np.median(c.grad[:3])
    return np.flatnonzero(c.grad > 100 * early)


def check_exploding_gradients(c: Curve, ref: Reference) -> str | None:
    """grad_norm > 100x its early median on >= 2 epochs, peaking above 3x a working run's, while every loss
    stays finite and is spiky (it jumps up by >= 10% on some epoch)."""
    if c.grad is None:
        return "no grad_norm"
    if not c.finite or not np.isfinite(c.grad).all():
        return "non-finite loss or grad"
    spikes = explosion_epochs(c)
    if len(spikes) < 2:
        return "grad_norm > 100x early median on < 2 epochs"
    if c.grad.max() < 3 * ref.grad:
        return "grad_norm never > 3x the reference's"
    if not any((np.diff(x) > 0.1 * np.abs(x[:-1])).any() for x in (c.train, c.val) if x is not None):
        return "loss never jumps up by 10% (not spiky)"
    return None


def check_vanishing_gradients(c: Curve, ref: Reference) -> str | None:
    """Mean grad_norm <= 1/100 of a working run's, and the losses move < 5% over the whole run."""
    if c.grad is None:
        return "no grad_norm"
    if not c.finite:
        return "non-finite loss"
    if c.grad.mean() > ref.grad / 100:
        return "mean grad_norm > 1/100 of the reference's"
    if any(np.ptp(x) >= 0.05 * abs(x[0]) for x in (c.train, c.val) if x is not None):
        return "loss moved >= 5% over the run"
    return None


def oscillation_onset(x: np.ndarray) -> int | None:
    """The first turning point between two large swings (>= 15% of the median level) of opposite sign."""
    d = np.diff(x)
    big = np.abs(d) >= 0.15 * np.median(np.abs(x))
    for i in range(len(d) - 1):
        if big[i] and big[i + 1] and d[i] * d[i + 1] < 0:
            return i + 1
    return None


def check_oscillating(c: Curve, ref: Reference) -> str | None:
    """After the first tenth (the descent from the random init): >= 50% of consecutive changes flip sign, the
    median |change| is >= 15% of the median level, and the halves' medians differ by less than that median
    change (no trend). A loss that swings because the gradients explode is left to exploding_gradients."""
    if not c.finite:
        return "non-finite loss"
    if c.grad is not None and check_exploding_gradients(c, ref) is None:
        return "gradients explode: exploding_gradients takes precedence"
    x = c.loss[max(1, len(c.loss) // 10):]  # skip the initial descent from the random init
    flips, swing = swing_stats(x)
    if flips < 0.5:
        return "sign flips on < 50% of consecutive changes"
    if swing < 0.15:
        return "median swing < 15% of the loss level"
    if oscillation_onset(c.loss) is None:
        return "no two consecutive large swings of opposite sign"
    half = len(x) // 2
    if abs(np.median(x[:half]) - np.median(x[half:])) > np.median(np.abs(np.diff(x))):
        return "trend: the halves' medians differ by more than the median swing"
    return None


def _smooth_fall(c: Curve, lo: float, hi: float) -> str | None:
    """Both losses fall by lo..hi over the last fifth, rarely going up."""
    for name, x, max_rises in (("train", c.train, 0.25), ("val", c.val, 0.35)):
        if x is None:
            continue
        f = fall(x)
        if not lo < f <= hi:
            return f"{name} fall over last fifth outside {lo:.0%}..{hi:.0%}"
        if rises(x) > max_rises:
            return f"{name} rises on > {max_rises:.0%} of epochs"
    return None


def check_slow_convergence(c: Curve, ref: Reference) -> str | None:
    """Train and val fall smoothly but slowly (2-5% over the last fifth), ending >= 1.5x the reference's best."""
    if not c.finite:
        return "non-finite loss"
    problem = _smooth_fall(c, 0.02, 0.05)
    if problem:
        return problem
    if c.loss[-1] < 1.5 * ref.best_val:
        return "final loss within 1.5x of the reference's best"
    return None


def check_still_improving(c: Curve, ref: Reference) -> str | None:
    """Train and val still fall smoothly by > 5% over the last fifth, and val ends within 2% of its minimum."""
    if not c.finite:
        return "non-finite loss"
    problem = _smooth_fall(c, 0.05, math.inf)
    if problem:
        return problem
    if c.val is not None and c.val[-1] > 1.02 * c.val.min():
        return "val above its minimum"
    return None


def check_converged(c: Curve, ref: Reference) -> str | None:
    """The loss changes < 2% over the last fifth, ends within 10% of its minimum at a good value (<= 1.25x the
    reference's best, or val_acc within 3 points of it), and the last fifth has no gradient spike (> 5x its median)."""
    if not c.finite:
        return "non-finite loss"
    x = c.loss
    if abs(fall(x)) >= 0.02:
        return "loss changes >= 2% over last fifth"
    if x[-1] > 1.1 * x.min():
        return "final loss > 1.1x its minimum"
    good_loss = x[-1] <= 1.25 * ref.best_val
    good_acc = c.acc is not None and c.acc[-1] >= ref.best_acc - 0.03
    if not (good_loss or good_acc):
        return "final loss not within 1.25x of the reference's best (nor val_acc within 3 points)"
    if c.grad is not None:
        tail = last_fifth(c.grad)
        if not np.isfinite(c.grad).all() or tail.max() > 5 * np.median(tail):
            return "gradient spikes in last fifth"
    return None


def check_overfitting(c: Curve, ref: Reference) -> str | None:
    """Over the last fifth val stays > 10% and averages > 20% above its minimum, while train keeps falling
    (its last-fifth mean is below its value at the val minimum) to at most half the val minimum."""
    if c.val is None:
        return "no val_loss"
    if not c.finite:
        return "non-finite loss"
    m = int(np.argmin(c.val))
    val_end, train_end = last_fifth(c.val), last_fifth(c.train)
    if c.val[m] <= 0 or val_end.mean() < 1.2 * c.val[m] or val_end.min() < 1.1 * c.val[m]:
        return "val not > 20% above its minimum over the last fifth"
    if not (train_end.mean() < c.train[m] and train_end.mean() <= 0.5 * c.val[m]):
        return "train loss did not keep falling well below val"
    return None


def check_underfitting(c: Curve, ref: Reference) -> str | None:
    """Train and val flat (< 2% over the last fifth) at a poor level (>= 1.5x the reference's best, val_acc >= 5
    points below it), stable (median swing <= 5% in the last half), with gradients >= 1/10 of a working run's."""
    if not c.finite:
        return "non-finite loss"
    for x in (c.train, c.val):
        if x is not None and abs(fall(x)) >= 0.02:
            return "loss changes >= 2% over last fifth"
    x = c.loss
    if x[-1] < 1.5 * ref.best_val:
        return "final loss within 1.5x of the reference's best"
    if c.acc is not None and c.acc[-1] > ref.best_acc - 0.05:
        return "val_acc within 5 points of the reference's"
    if swing_stats(x[len(x) // 2:])[1] > 0.05:
        return "unstable: median swing > 5% in last half"
    if c.grad is not None and c.grad.mean() < ref.grad / 10:
        return "grad_norm < 1/10 of the reference's"
    return None


CHECKS: dict[str, Callable[[Curve, Reference], str | None]] = {
    "diverged": check_diverged, "exploding_gradients": check_exploding_gradients,
    "vanishing_gradients": check_vanishing_gradients, "oscillating": check_oscillating,
    "slow_convergence": check_slow_convergence, "still_improving": check_still_improving,
    "converged": check_converged, "overfitting": check_overfitting, "underfitting": check_underfitting,
}


def onset_epoch(label: str, c: Curve) -> int | None:
    """The record's `onset_epoch`: diverged - the first epoch from which the loss stays non-finite or above 3x
    its first value; exploding_gradients - the first epoch above 100x the early median grad_norm; overfitting -
    the epoch of the val minimum; oscillating - the first turning point between two large swings; vanishing and
    underfitting - 0 (present from the start); the others - None."""
    if label == "diverged":
        return divergence_onset(c)
    if label == "exploding_gradients":
        return int(explosion_epochs(c)[0])
    if label == "overfitting":
        return int(np.argmin(c.val))
    if label in ("vanishing_gradients", "underfitting"):
        return 0
    if label == "oscillating":
        return oscillation_onset(c.loss)
    return None


def judge(label: str, c: Curve, ref: Reference) -> str | None:
    """None when the run shows `label` and no other verdict; else why it is rejected."""
    problem = CHECKS[label](c, ref)
    if problem:
        return problem
    others = [v for v in VERDICTS if v != label and CHECKS[v](c, ref) is None]
    return f"ambiguous: also {others[0]}" if others else None
