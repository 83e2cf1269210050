"""Scale-free measurements of a curve, shared by the detectors.

Losses come at any scale and sign (cross-entropy near 2, raw MSE in the thousands, negative
log-likelihoods below zero), so every change is measured relative to the curve's own level:
`level(x)` is |x|; for a curve that reaches zero or below (a log-likelihood, a shifted
loss) it is floored at a tenth of the curve's range, which keeps ratios meaningful where
the loss crosses zero.
"""

from __future__ import annotations

import numpy as np


def finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def first_non_finite(values: np.ndarray) -> int | None:
    """Index of the first NaN/Inf value, or None."""
    bad = ~np.isfinite(values)
    return int(np.argmax(bad)) if bad.any() else None


def smooth(values: np.ndarray) -> np.ndarray:
    """Median of each point and its neighbours (window 3): removes single-epoch spikes, keeps steps."""
    n = len(values)
    if n < 3:
        return values.copy()
    padded = np.concatenate([values[:1], values, values[-1:]])
    windows = np.stack([padded[:-2], padded[1:-1], padded[2:]])
    return np.median(windows, axis=0)


def _floor(values: np.ndarray) -> float:
    values = finite(values)
    if not len(values) or float(np.min(values)) > 0:
        return 1e-12
    span = float(np.ptp(values))
    return 0.1 * span if 0.1 * span > 1e-12 else 1e-12


def level(values: np.ndarray, at: float) -> float:
    """The magnitude a change at value `at` is compared with (see the module docstring)."""
    magnitude = abs(at)
    floor = _floor(values)
    return magnitude if magnitude > floor else floor  # NaN `at` gives the floor, never zero


def levels(values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """`level` for many points of one curve at once."""
    return np.maximum(np.abs(at), _floor(values))


def tail_start(n: int) -> int:
    """First index of the last fifth of `n` epochs: its last max(3, n/5) points (all of a shorter run)."""
    return max(0, n - max(3, round(n / 5)))


def tail_drop(values: np.ndarray) -> float:
    """Relative fall over the last fifth (positive = falling).

    Read from a least-squares line through the last fifth, from its first epoch to its last,
    so one noisy epoch at either end cannot decide it.
    """
    if len(values) < 2:
        return 0.0
    window = values[tail_start(len(values)):]
    x = np.arange(len(window))
    keep = np.isfinite(window)
    if keep.sum() < 2:
        return 0.0
    slope, start = np.polyfit(x[keep], window[keep], 1)
    return float(-slope * (len(window) - 1) / level(values, float(start)))


def total_drop(values: np.ndarray) -> float:
    """Relative fall from the first epoch to the last (smoothed at the end only)."""
    if len(values) < 2:
        return 0.0
    return float((values[0] - smooth(values)[-1]) / level(values, values[0]))


def robust_span(values: np.ndarray) -> float:
    """The range a curve covers, ignoring its most extreme 5% at either end."""
    values = finite(values)
    if not len(values):
        return 0.0
    high, low = np.percentile(values, (95, 5))  # one sort for both
    return float(high - low)


def flip_rate(values: np.ndarray, span: float = 0.0) -> tuple[float, float, float, int | None]:
    """How often consecutive epoch-to-epoch changes flip sign, and how large the changes are.

    Returns (share of consecutive change pairs with opposite signs, median change relative to
    the loss level, median change relative to `span` (the range of the whole run, so a loss
    jittering near zero at the end of a good run does not count as swinging), index of the
    epoch where the first flip starts).
    """
    if len(values) < 4:
        return 0.0, 0.0, 0.0, None
    deltas = np.diff(values)
    flips = np.sign(deltas[1:]) * np.sign(deltas[:-1]) < 0
    onset = int(np.argmax(flips)) if flips.any() else None
    swing = float(np.median(np.abs(deltas) / levels(values, values[:-1])))
    of_span = float(np.median(np.abs(deltas)) / span) if span > 0 else 0.0
    return float(flips.mean()), swing, of_span, onset


def trend_strength(values: np.ndarray) -> float:
    """Net movement over the run relative to the total epoch-to-epoch movement (0: no trend, 1: monotone)."""
    if len(values) < 2:
        return 0.0
    path = float(np.sum(np.abs(np.diff(values))))
    return abs(float(values[-1] - values[0])) / path if path > 0 else 0.0



def spikes(values: np.ndarray, factor: float = 2.0, min_jump: float = 0.0) -> list[int]:
    """Epochs whose value jumps to `factor`x the median of the three before it and then falls back.

    The other face of an unstable run: not a steady flip-flop but sudden bursts the optimiser
    recovers from, each one a step that overshot. A jump at the last epoch counts (it may
    yet come back); a jump that stays is a level shift, not a spike; a jump under `min_jump`
    (noise on a loss near zero) is not one either.
    """
    if len(values) < 4:
        return []
    base = np.median(np.lib.stride_tricks.sliding_window_view(values[:-1], 3), axis=1)  # base[j] for values[j + 3]
    current = values[3:]
    following = np.r_[values[4:], -np.inf]  # the last epoch counts as having come back
    jump = current - base
    hit = (base > 0) & (current >= factor * base) & (following < base + 0.5 * jump) & (jump >= min_jump)
    return [int(i) + 3 for i in np.flatnonzero(hit)]
