"""Learning-curve extrapolation for the convergence pruner: where a trial's objective is heading.

A small ensemble of parametric curve families, after Domhan, Springenberg and Hutter (2015), is
fitted to the objective so far and predicts its value at the trial's own last epoch, with an
uncertainty. Every family is `y = c + a * g(x; shape)`: linear in its offset `c` and scale `a` once
its shape is fixed, so a fit is a closed-form least squares over a grid of shapes, vectorised in
numpy, not an iterative optimiser (well under 2 ms a decision; `benchmarks/extrapolation_cost.py`).

The uncertainty is deliberately wide, since a wrong prune costs a good trial: it adds the spread of
the families' predictions, the curve's epoch-to-epoch noise, and how far each family missed the
curve's own latest epochs when fitted without them, scaled up to the distance still to go.

Pure numpy: the objective feeds it the trial's reported values and the study's k-th best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_POINTS = 6  # finite values needed before a curve is extrapolated
MAX_POINTS = 128  # a longer curve is thinned to this many points (the latest always kept)
FLAT = 0.10  # a curve that has not moved this share of its size yet is a flat start: too early to tell (a slow
# starter at 6% after 10 of 40 epochs fell another 26% by its end; benchmarks/sweep_efficiency.py)


def _power(x: np.ndarray, horizon: float) -> np.ndarray:
    """x^-alpha: the power law of most learning curves."""
    alpha = np.geomspace(0.05, 4.0, 16)
    return x[None, :] ** -alpha[:, None]


def _exponential(x: np.ndarray, horizon: float) -> np.ndarray:
    """exp(-x / tau): a curve that settles at a fixed rate."""
    tau = np.geomspace(0.3, 3.0 * horizon, 16)
    return np.exp(-x[None, :] / tau[:, None])


def _log_power(x: np.ndarray, horizon: float) -> np.ndarray:
    """1 / (1 + (x / s)^p): a slow start, then a drop around epoch s, then a plateau (Domhan's log power)."""
    s = np.geomspace(0.5, 2.0 * horizon, 12)
    p = np.array([0.5, 1.0, 2.0, 4.0])
    return 1.0 / (1.0 + (x[None, None, :] / s[:, None, None]) ** p[None, :, None])


def _weibull(x: np.ndarray, horizon: float) -> np.ndarray:
    """exp(-(x / lam)^d): exponential-like, with a sharper or softer knee."""
    lam = np.geomspace(0.5, 2.0 * horizon, 12)
    d = np.array([0.5, 1.5, 3.0])
    return np.exp(-(x[None, None, :] / lam[:, None, None]) ** d[None, :, None])


def _log_linear(x: np.ndarray, horizon: float) -> np.ndarray:
    """log(x): no plateau, a fall that slows down."""
    return np.log(x)[None, :]


def _linear(x: np.ndarray, horizon: float) -> np.ndarray:
    """x: no plateau and no slowing down, the most optimistic of all for a curve that keeps falling."""
    return x[None, :]


FAMILIES = {"power": _power, "exponential": _exponential, "log_power": _log_power, "weibull": _weibull,
            "log_linear": _log_linear, "linear": _linear}


@dataclass(frozen=True)
class Prediction:
    """The objective predicted at `epoch`: `mean` ± `std` (a normal's scale), from `families` fits."""

    epoch: int
    mean: float
    std: float
    families: int

    def probability_better_than(self, value: float, direction: str) -> float:
        """The chance the trial ends better than `value` (lower when minimising, higher when maximising)."""
        z = (value - self.mean) / self.std
        if direction == "maximize":
            z = -z
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


@dataclass(frozen=True)
class Abstain:
    """Why no prediction was made (the rule then stays out of the decision)."""

    reason: str


def _fit(basis: np.ndarray, y: np.ndarray, at: np.ndarray, reach: float) -> tuple[float, np.ndarray] | None:
    """Least squares of `y = c + a * g` for every shape in `basis` (shapes x points, `y` the first
    points): of the shapes whose curve moves at most `reach` from the last fitted point to the
    points `at`, the best one's sum of squared residuals and its values at `at` (None: no shape is that tame)."""
    n = len(y)
    g = basis[:, :n]
    g_mean = g.mean(axis=1, keepdims=True)
    y_mean = y.mean()
    gc = g - g_mean
    var = (gc * gc).sum(axis=1)
    cov = gc @ (y - y_mean)
    ok = var > 1e-300
    a = np.where(ok, cov / np.where(ok, var, 1.0), 0.0)
    c = y_mean - a * g_mean[:, 0]
    sse = ((y - y_mean) ** 2).sum() - np.where(ok, cov * a, 0.0)
    values = c[:, None] + a[:, None] * basis[:, at]
    moved = np.abs(values - (c + a * basis[:, n - 1])[:, None]).max(axis=1)
    sse = np.where(moved <= reach, sse, np.inf)
    best = int(np.argmin(sse))
    return None if not np.isfinite(sse[best]) else (max(float(sse[best]), 0.0), values[best])


def predict(values: dict[int, float], last_epoch: int) -> Prediction | Abstain:
    """The objective at `last_epoch` (0-based), from `values` (epoch -> objective so far)."""
    epochs = sorted(values)
    y = np.array([values[e] for e in epochs], dtype=float)
    if len(y) < MIN_POINTS:
        return Abstain(f"{len(y)} epochs so far; extrapolation needs {MIN_POINTS}")
    if not np.all(np.isfinite(y)):
        return Abstain("the objective is not finite at every epoch so far")
    scale = max(float(np.max(np.abs(y))), 1e-12)
    if float(np.ptp(y)) <= FLAT * scale:
        return Abstain(f"the objective has moved less than {FLAT:.0%} so far (a flat start)")
    if last_epoch <= epochs[-1]:
        return Abstain("the trial is at its last epoch")
    if len(y) > MAX_POINTS:  # thin evenly, keeping the latest epoch
        keep = np.unique(np.linspace(0, len(y) - 1, MAX_POINTS).round().astype(int))
        epochs, y = [epochs[i] for i in keep], y[keep]
    y_norm = (y - y[-1]) / scale  # fits are invariant to this; it keeps the sums well conditioned
    x = np.array(epochs, dtype=float) + 1.0
    target = float(last_epoch + 1)
    held = max(2, len(y) // 4)  # the latest epochs each family must predict when fitted without them
    x_all = np.append(x, target)
    at_held = np.arange(len(y) - held, len(y))
    at_target = np.array([len(x)])
    def reach(points: np.ndarray, to: float) -> float:
        """How far a fitted curve may move from its last fitted point to `to`: 1.5 times its observed
        change, scaled by how much longer the rest is than what was seen (a shape that fits a
        plateau's noise with a cliff is not a forecast)."""
        seen = x[len(points) - 1] - x[0]
        return 1.5 * float(np.ptp(points)) * max(1.0, (to - x[len(points) - 1]) / max(seen, 1.0))

    means, misses, noises = [], [], []
    for family in FAMILIES.values():
        basis = family(x_all, target).reshape(-1, len(x_all))
        full = _fit(basis, y_norm, at_target, reach(y_norm, target))
        # The same family fitted without the latest `held` epochs, judged on them.
        early = _fit(basis, y_norm[:-held], at_held, reach(y_norm[:-held], x[-1]))
        if full is None or early is None:
            continue
        sse, at = full
        means.append(float(at[0]))
        misses.append(float(np.sqrt(np.mean((early[1] - y_norm[-held:]) ** 2))))
        noises.append(math.sqrt(sse / max(len(y) - 2, 1)))
    if not means:
        return Abstain("no curve family fits the objective")
    m, miss, noise = np.array(means), np.array(misses), np.array(noises)
    weights = 1.0 / (miss ** 2 + noise ** 2 + 1e-12)
    weights /= weights.sum()
    mean = float(weights @ m)
    spread = float(np.sqrt(weights @ (m - mean) ** 2))
    # What a family missed of the latest epochs beyond their noise, grown in proportion to the epochs still to go.
    excess = np.sqrt(np.maximum(miss ** 2 - noise ** 2, 0.0))
    ahead = max(1.0, (target - x[-1]) / held)
    std = math.sqrt(spread ** 2 + float(weights @ noise ** 2) + (float(weights @ excess) * ahead) ** 2)
    std = max(std, 0.25 * abs(mean), 1e-9)  # at least a quarter of the change still predicted: no fit is that sure
    return Prediction(epoch=last_epoch, mean=mean * scale + float(y[-1]), std=std * scale, families=len(means))
