"""One detector per unhealthy verdict, plus the trend reading that decides between the rest.

Each detector looks at a `History` and returns a `Candidate` (verdict, score, onset, findings)
or None. A score is the detector's confidence in [0, 1]: 0.5 at its threshold, rising with
the margin by which the evidence clears it (see `margin_confidence`). Sources of the rules:
AUTOTRAINER (ICSE 2021) for gradient ratios, swing counts and slow best-so-far gains,
DeepDiagnosis (ICSE 2022) for non-finite and unchanged losses and the effective learning
rate, UMLAUT for validation loss rising while training loss falls; here every threshold is
relative to the curve's own level, and curves are median-smoothed before trends are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from converge.studies.diagnosis import signals as sig
from converge.studies.diagnosis.history import History
from converge.studies.diagnosis.result import Finding

# Thresholds from the diagnosis contract (docs/architecture.md, "Convergence diagnosis").
DIVERGE_FACTOR = 3.0        # loss above 3x its first value, and staying there
EXPLODE_RATIO = 100.0       # gradient norm above 100x its early median
VANISH_MAX_MOVE = 0.05      # loss moves < 5% over the whole run
VANISH_PER_LOSS = 1e-2      # gradient norm under 1% of the loss level...
VANISH_SENSITIVITY = 1e-3   # ...or under 0.1% relative loss change per relative weight change
OSCILLATE_SWING = 0.15      # swings of at least 15% of the loss level
OVERFIT_RISE = 0.20         # val loss 20% above its minimum
IMPROVING_DROP = 0.05       # > 5% fall over the last fifth: still improving
FLAT_DROP = 0.02            # < 2% over the last fifth: flat
NEAR_MINIMUM = 0.10         # converged: within 10% of the minimum
GOOD_QUALITY = 0.6          # `quality` at or above which a level counts as good
# With a context (`studies.diagnosis.context`):
BLOWN_START = 3.0           # a first-epochs loss above 3x an untrained network's (ln k): the first steps overshot
OVERSHOT_START = 1.3        # ... above 1.3x it, with the network dead at chance since
JUMP_FACTOR = 3.0           # a loss that jumps to 3x the epoch before's, back above where it started
PEER_GOOD = 0.10            # a best objective within 10% of the study's best is a good level...
PEER_POOR = 0.50            # ...and one worse than it by more than half its magnitude a poor one
UNIFORM_TOLERANCE = 0.15    # a val_loss within 15% of ln(1/val_acc): outputs uniform over the classes
NO_SKILL = 0.10             # `quality` under which a run has learnt next to nothing, whatever its peers did


@dataclass
class Candidate:
    verdict: str
    score: float
    onset: int | None = None
    findings: list[Finding] = field(default_factory=list)
    facts: dict[str, float] = field(default_factory=dict)  # numbers the remedies are sized from


def margin_confidence(value: float, threshold: float, *, scale: float = 1.0, log: bool = False) -> float:
    """0.5 at the threshold, approaching 0.99 as `value` clears it by a few `scale`s (in log10 when `log`)."""
    if log:
        value, threshold = math.log10(max(value, 1e-300)), math.log10(max(threshold, 1e-300))
    margin = (value - threshold) / scale
    return float(min(0.99, max(0.01, 0.5 + 0.49 * math.tanh(margin))))


def _epoch(h: History, index: int | None) -> int | None:
    return None if index is None else int(h.epochs[index])


def _word(x: float) -> str:
    """A non-finite value as the contract spells it."""
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if abs(x) >= 0.01 else f"{100 * x:.1f}%".replace("-0.0%", "0.0%")


def diverged(h: History) -> Candidate | None:
    """Loss NaN/Inf, or above 3x its first value with no way back so far."""
    bad = sig.first_non_finite(h.train_loss)
    if bad is not None:
        e = _epoch(h, bad)
        before = f" (it was {h.train_loss[0]:.4g} at epoch {h.epochs[0]})" if bad > 0 else ""
        text = f"train_loss became {_word(h.train_loss[bad])} at epoch {e}{before}"
        return Candidate("diverged", 0.99, e, [Finding("diverged", e, text)])
    if h.has("val_loss"):
        vbad = sig.first_non_finite(h.val_loss)
        if vbad is not None and not np.isfinite(h.val_loss[vbad:]).any() and np.isfinite(h.val_loss[:vbad]).any():
            e = _epoch(h, vbad)
            text = (f"val_loss became {_word(h.val_loss[vbad])} at epoch {e} and stayed so, while train_loss "
                    "stayed finite")
            return Candidate("diverged", 0.8, e, [Finding("diverged", e, text)])
    collapse = _blown_up_and_dead(h)
    if collapse is not None:
        return collapse
    late = _left_its_minimum(h)
    if late is not None:
        return late
    t = h.train_loss
    first = float(t[0])
    limit = first + (DIVERGE_FACTOR - 1) * abs(first)
    above = t > limit
    if len(t) < 2 or not above[-1]:
        return None
    start = len(t) - int(np.argmin(above[::-1])) if not above.all() else 0
    e = _epoch(h, start)
    ratio = (t[-1] - first) / max(abs(first), 1e-12) + 1
    score = margin_confidence(ratio, DIVERGE_FACTOR, scale=1.0, log=True) if first > 0 else 0.8
    return Candidate("diverged", max(score, 0.6), e, [Finding(
        "diverged", e, f"train_loss climbed from {first:.4g} at epoch {h.epochs[0]} to {t[-1]:.4g} "
                       f"({ratio:.1f}x) and has stayed above {DIVERGE_FACTOR:g}x since epoch {e}")])


def _left_its_minimum(h: History) -> Candidate | None:
    """A run that learnt, then climbed away: train_loss ends above 3x its minimum (a rise of at least a fifth
    of what it had fallen), on the last two epochs, and val_loss half again above its own minimum.

    Below 3x its first value the contract's divergence misses it, yet it does not come back either: steps
    too large for the loss surface the run has reached (a user would not call it converged).
    """
    t = h.train_loss
    if len(t) < 4 or not np.isfinite(t).all():
        return None
    low = int(np.argmin(t))
    floor = float(t[low])
    if low >= len(t) - 2 or floor <= 0 or not np.all(t[-2:] > 2 * floor) or t[-1] <= DIVERGE_FACTOR * floor:
        return None
    if t[-1] - floor < 0.2 * (float(t[0]) - floor):
        return None  # a loss near zero doubling is noise, not a climb
    if h.has("val_loss"):
        v = h.val_loss
        if not (np.isfinite(v).all() and v[-1] > 1.5 * float(np.min(v))):
            return None
    e = _epoch(h, low)
    ratio = float(t[-1] / floor)
    return Candidate("diverged", min(0.8, margin_confidence(ratio, DIVERGE_FACTOR, scale=0.5, log=True)), e,
                     [Finding("diverged", e, f"train_loss climbed from its minimum {floor:.4g} at epoch {e} to "
                                             f"{t[-1]:.4g} ({ratio:.3g}x) and has not come back"
                                             + (f"; val_loss from {np.min(h.val_loss):.4g} to {h.val_loss[-1]:.4g}"
                                                if h.has("val_loss") else ""))])


def _blown_up_and_dead(h: History) -> Candidate | None:
    """A loss that spiked far above where it settled, and settled at a useless level.

    The usual end of a far too large learning rate when the loss stays finite: one or two
    epochs of huge loss, then dead units and a curve flat at the chance level. The 3x rule
    misses it when the spike falls in the first epoch.
    """
    t = h.train_loss
    if len(t) < 3:
        return None
    peak = int(np.argmax(t))
    settled = float(np.median(t[-3:]))
    if peak >= len(t) - 2 or settled <= 0 or t[peak] < DIVERGE_FACTOR * settled:
        return None
    # A falling curve also peaks at its start: only a peak above its own first epoch, or a
    # cross-entropy above any untrained network's (ln of 1000 classes ≈ 7), is a blow-up.
    if not (t[peak] > DIVERGE_FACTOR * t[0] or (h.has("val_acc") and t[peak] > DIVERGE_FACTOR * math.log(1000))):
        return None
    # A first epoch that high and a loss that then falls over many epochs is a slow start (unscaled inputs,
    # heavy dropout), not a blow-up: a blow-up is over within an epoch.
    if peak == 0 and t[1] > t[0] / DIVERGE_FACTOR:
        return None
    q, why = quality(h)
    if q >= 0.3:
        return None
    e = _epoch(h, peak)
    ratio = float(t[peak] / settled)
    score = min(margin_confidence(ratio, DIVERGE_FACTOR, scale=1.0, log=True), margin_confidence(0.3, q, scale=0.1))
    return Candidate("diverged", score, e, [Finding(
        "diverged", e, f"train_loss spiked to {t[peak]:.4g} at epoch {e}, {ratio:.3g}x the {settled:.4g} it settled "
                       f"at, and the run never reached a useful level ({why})")], {"collapsed": 1.0})


def exploding_gradients(h: History) -> Candidate | None:
    """Gradient norm above 100x its early median, on two epochs, or on the latest one."""
    g = h.grad_norm
    if len(g) < 2 or not np.isfinite(g).any():
        return None
    early = sig.finite(g[:3])
    baseline = float(np.median(early)) if len(early) else math.nan
    if not baseline > 0:
        return None
    ratio = np.where(np.isfinite(g), g / baseline, np.where(np.isnan(g), 0.0, np.inf))
    spikes = np.flatnonzero(ratio > EXPLODE_RATIO)
    if len(spikes) == 0:
        return None
    ongoing = spikes[-1] >= len(g) - 2
    if len(spikes) < 2 and not ongoing:
        return None
    peak = float(np.max(ratio))
    score = margin_confidence(peak, EXPLODE_RATIO, scale=1.0, log=True)
    score = score if len(spikes) >= 2 else min(score, 0.7)
    e = _epoch(h, int(spikes[0]))
    spread = float(np.ptp(sig.finite(h.train_loss)) / sig.level(h.train_loss, float(np.median(h.train_loss))))
    return Candidate("exploding_gradients", score, e, [Finding(
        "exploding_gradients", e, f"grad_norm reached {np.nanmax(g):.3g}, {peak:.3g}x its early median "
                                  f"{baseline:.3g}, on {len(spikes)} epoch(s) from epoch {e}; the loss stayed "
                                  f"finite (range {_pct(spread)} of its level)")])


def vanishing_gradients(h: History) -> Candidate | None:
    """Tiny gradients relative to the loss and the weights, and a loss that hardly moves."""
    if len(h) < 3 or not h.has("grad_norm"):
        return None
    loss = h.train_loss
    move = float(np.ptp(loss) / sig.level(loss, float(loss[0])))
    if move >= VANISH_MAX_MOVE:
        return None
    g = float(np.nanmedian(h.grad_norm))
    p = float(np.nanmedian(h.param_norm)) if h.has("param_norm") else 1.0
    loss_level = sig.level(loss, float(np.median(loss)))
    # Two scale-free readings of "tiny": the gradient against the loss it should move, and the
    # relative loss change per relative weight change (which also accounts for the weights' size).
    per_loss = g / loss_level
    sensitivity = g * p / loss_level
    tiny = min(per_loss / VANISH_PER_LOSS, sensitivity / VANISH_SENSITIVITY)
    if not tiny < 1.0:
        return None
    score = margin_confidence(1.0, tiny, scale=1.0, log=True)
    facts = {"sensitivity": sensitivity, "grad_per_loss": per_loss}
    text = (f"median grad_norm {g:.3g} is {per_loss:.1e} of the loss level {loss_level:.4g}"
            + (f"; with param_norm {p:.3g} a 1% change of the weights would move the loss by about "
               f"{sensitivity * 1e-2:.1e} of its level" if h.has("param_norm") else "")
            + f"; the loss moved {_pct(move)} over {len(h)} epochs")
    if h.has("lr") and h.has("param_norm"):
        eff = float(np.nanmedian(h.lr * h.grad_norm / h.param_norm))
        facts["effective_lr"] = eff
        text += f"; effective learning rate lr·‖g‖/‖w‖ = {eff:.1e}"
    return Candidate("vanishing_gradients", score, _epoch(h, 0), [Finding("vanishing_gradients", _epoch(h, 0), text)],
                     facts)


def overfitting(h: History) -> Candidate | None:
    """Validation loss (or error) risen > 20% above its minimum while training loss kept falling."""
    if h.has("val_loss"):
        val, name = h.val_loss, "val_loss"
    elif h.has("val_acc"):
        val, name = 1.0 - h.val_acc, "validation error (1 - val_acc)"
    else:
        return None
    if len(h) < 4 or not np.isfinite(val).all():
        return None
    best = int(np.argmin(val))
    current = float(np.median(val[-3:])) if best < len(val) - 3 else float(val[-1])
    rise = (current - float(val[best])) / sig.level(val, float(val[best]))
    if rise <= OVERFIT_RISE * 0.5:
        return None
    train = h.train_loss
    train_fall = (float(train[best]) - float(np.min(train[best:]))) / sig.level(train, float(train[best]))
    if train_fall < 0.10 or (float(train[-1]) >= current and name == "val_loss"):
        return None
    jitter = float(np.median(np.abs(np.diff(val[best:])))) if len(val) - best >= 3 else 0.0
    if current - float(val[best]) < 2.5 * jitter:
        return None  # jitter around a low minimum, not a rise
    score = margin_confidence(rise, OVERFIT_RISE, scale=0.15)
    e = _epoch(h, best)
    return Candidate("overfitting", score, e, [Finding(
        "overfitting", e, f"{name} rose {_pct(rise)} above its minimum {val[best]:.4g} at epoch {e} while train_loss "
                          f"fell {_pct(train_fall)} further, to {train[-1]:.4g}")], {"best_epoch": float(e)})


def oscillating(h: History) -> Candidate | None:
    """Epoch-to-epoch changes that flip sign about every other epoch, with large swings and no trend.

    Read on the whole run and on its second half (an oscillation that set in late); the onset is
    the first flip of the earliest part that qualifies. Noise also flips sign often: the swings
    must be large against both the loss level and the range the whole run covers.
    """
    if len(h) < 5:
        return None
    best: Candidate | None = None
    at_best = (gap := peer_gap(h)) is not None and gap <= PEER_GOOD
    calm = (lr_no_higher_than_peers(h) or at_best) and sig.trend_strength(sig.finite(h.train_loss)) >= 0.5
    for name in ("val_loss", "train_loss"):
        values = getattr(h, name)
        if not np.isfinite(values).all():
            continue
        span = sig.robust_span(values)
        # A validation loss swinging around a training loss that falls steadily, at an lr no higher than the
        # study's good trials used or at their level: the noise of a small validation set or batch, not steps
        # that overshoot.
        for offset in () if calm and name == "val_loss" else (0, len(values) // 2):
            part = values[offset:]
            if len(part) < 5:
                continue
            if offset == 0 and len(part) < 10 and part[-1] <= np.min(part) and part[-1] < 0.7 * part[0]:
                continue  # a short run making new lows at its end, well below its start: noise on a descent
            rate, swing, of_span, onset = sig.flip_rate(part, span)
            trend = sig.trend_strength(part)
            score = min(margin_confidence(rate, 0.45, scale=0.15),
                        margin_confidence(swing, OSCILLATE_SWING, scale=0.1),
                        margin_confidence(of_span, OSCILLATE_SWING, scale=0.1),
                        margin_confidence(0.5, trend, scale=0.2))
            if score < 0.5 or (best is not None and score <= best.score + 0.05):
                continue
            e = _epoch(h, offset + onset) if onset is not None else None
            best = Candidate("oscillating", score, e, [Finding(
                "oscillating", e, f"{name} changes flip sign on {_pct(rate)} of consecutive epochs from epoch "
                                  f"{h.epochs[offset]} with a median swing of {_pct(swing)} of its level, and its "
                                  f"net trend is {_pct(trend)} of the distance travelled")])
        jumps = sig.spikes(values, min_jump=OSCILLATE_SWING * span) if np.all(values > 0) else []
        if len(jumps) >= 2 and (best is None or best.score < 0.8):
            worst = max(float(values[i] / np.median(values[i - 3:i])) for i in jumps)
            score = min(0.95, 0.5 + 0.15 * (len(jumps) - 1) + 0.05 * math.log2(worst))
            e = _epoch(h, jumps[0])
            best = Candidate("oscillating", score, e, [Finding(
                "oscillating", e, f"{name} spiked {len(jumps)} times (epochs "
                                  f"{', '.join(str(h.epochs[i]) for i in jumps[:5])}), up to {worst:.3g}x the median "
                                  "of the three epochs before, and fell back each time: the steps overshoot")])
    return best


def uniform_classes(h: History) -> int | None:
    """The class count of a classifier whose outputs ended uniform, where the context does not give it.

    A network at chance predicts every class alike: its cross-entropy is ln k and its accuracy 1/k, so
    exp(val_loss) and 1/val_acc agree (within 15% on the log scale). A network that learnt anything has an
    accuracy far above what its loss implies. None when the history shows no such end.
    """
    if len(h) < 3 or not (h.has("val_acc") and h.has("val_loss")):
        return None
    loss, acc = float(np.nanmedian(h.val_loss[-5:])), float(np.nanmedian(h.val_acc[-5:]))
    if not (0 < acc < 0.5 and math.isfinite(loss) and loss > 0):
        return None
    return round(math.exp(loss)) if abs(loss - math.log(1 / acc)) <= UNIFORM_TOLERANCE * math.log(1 / acc) else None


def good_lr(h: History) -> float | None:
    """The good trials' typical lr (`Peers.typical`); None without peers that have one."""
    peers = h.context.peers if h.context is not None else None
    return peers.typical("lr") if peers is not None else None


def lr_no_higher_than_peers(h: History) -> bool:
    """The trial's lr is at or below the good trials' typical lr (False without both)."""
    lr, typical = h.context.params.get("lr") if h.context is not None else None, good_lr(h)
    return bool(lr) and typical is not None and lr <= typical


def quality(h: History) -> tuple[float, str]:
    """How good the best value so far is, in [0, 1], read from the history alone, with the reason.

    The share of the first epoch's loss that training has removed; for classification also
    the validation accuracy's skill above chance (chance estimated from the first epoch's
    cross-entropy, ≈ ln of the class count near initialisation), and the lower of the two.
    """
    loss = h.loss
    first = float(h.train_loss[0])
    untrained = h.context.untrained_loss if h.context is not None else None
    best = float(np.nanmin(loss))
    if untrained is not None and first > untrained:  # a blown-up first epoch says nothing of the task
        start, where = untrained, f"an untrained network's {untrained:.3g} (ln {h.context.n_classes})"
    else:
        start, where = first, f"{first:.4g}"
    progress = max(0.0, min(1.0, (start - best) / sig.level(loss, start))) if math.isfinite(best) else 0.0
    why = f"the loss went from {where} to a best of {best:.4g} ({_pct(progress)} of the way to zero)"
    if h.has("val_acc"):
        if h.context is not None and h.context.n_classes:
            classes = float(h.context.n_classes)
        else:
            classes = math.exp(first) if 0 < first < math.log(100) else 10.0
        chance = 1.0 / max(classes, 2.0)
        acc = float(np.nanmax(h.val_acc))
        skill = max(0.0, (acc - chance) / (1 - chance))
        return min(skill, progress), f"{why}; best val_acc {acc:.3f} against a chance level near {chance:.2f}"
    return progress, why


def generalisation_gap(h: History) -> float | None:
    """How much better the model fits its training data than held-out data, relative to the val level.

    A model with capacity to spare fits what it trains on better than what it does not (gap > 0);
    a model that cannot fit shows no gap, or a training loss above the validation loss.
    """
    if not h.has("val_loss") or len(h) < 2:
        return None
    train, val = float(np.median(h.train_loss[-3:])), float(np.median(h.val_loss[-3:]))
    if not (math.isfinite(train) and math.isfinite(val)):
        return None
    return (val - train) / sig.level(h.val_loss, val)


def good_level(h: History, q: float, why: str) -> tuple[bool, str]:
    """Is the level reached good? `quality` alone cannot tell a noisy task done well (a regression
    whose best model removes half the loss) from an easy one done badly, so the generalisation gap
    weighs in: classification needs skill without a training loss far above validation's; a
    regression (no accuracy to go by) needs a model that fits its training data better than new data.
    """
    behind = peer_gap(h)
    if behind is not None:
        best = h.context.peers.best.value  # type: ignore[union-attr]
        if behind <= PEER_GOOD and q >= NO_SKILL:  # as good as the best of a study that learnt nothing is not good
            return True, why + f"; its best {h.metric} is within {_pct(PEER_GOOD)} of the study's best {best:.4g}"
        if behind > PEER_POOR:
            return False, why + f"; its best {h.metric} is {_pct(behind)} worse than the study's best {best:.4g}"
    gap = generalisation_gap(h)
    if gap is None:
        return q >= GOOD_QUALITY, why
    why += f"; train_loss is {_pct(gap)} below val_loss" if gap >= 0 else f"; train_loss is {_pct(-gap)} above val_loss"
    if h.has("val_acc"):
        return q >= GOOD_QUALITY and (gap > -0.1 or q >= 0.85), why
    return (gap >= 0.05 and q >= 0.3) or q >= 0.95, why


def trend(h: History) -> Candidate:
    """Decide among converged, still_improving, slow_convergence and underfitting from the curve's tail.

    Falling clearly (train and val both > 5% over the last fifth): still improving. Falling
    2–5%: slow when the level is poor, still improving when it is good. Flat (< 2%): converged
    at a good level, underfitting at a poor one.
    """
    loss = h.loss
    name = "val_loss" if h.has("val_loss") else "train_loss"
    if len(h) == 1:
        return Candidate("still_improving", 0.3, None, [Finding("too_early", _epoch(h, 0),
                                                                "one epoch: too early to read a trend")])
    drop = sig.tail_drop(loss)
    both = min(drop, sig.tail_drop(h.train_loss)) if h.has("val_loss") else drop
    q, why = quality(h)
    good, why = good_level(h, q, why)
    best = float(np.nanmin(loss))
    from_min = (float(sig.smooth(loss)[-1]) - best) / sig.level(loss, best)
    tail = f"{name} changed {_pct(-drop)} over the last fifth (epochs {h.epochs[sig.tail_start(len(h))]}–" \
           f"{h.epochs[-1]}); {why}"
    # Without dropout or noise injection a model fits its training data at least as well as
    # unseen data: a training loss that stays above the validation loss is regularisation at work.
    # The training loss is averaged over an epoch while the model improves, so it is compared
    # with the validation loss at the epoch's start (the previous epoch's end), not its end.
    regularised = (h.has("val_loss") and len(h) >= 4
                   and bool(np.all(h.train_loss[-3:] > h.val_loss[-4:-1])))
    facts = {"tail_drop": drop, "quality": q, "regularised": float(regularised),
             "progress": sig.total_drop(loss), "epochs_seen": float(len(h))}
    quality_margin = margin_confidence(q, GOOD_QUALITY, scale=0.15)
    quality_margin = max(quality_margin, 0.6) if good else min(quality_margin, 0.4)  # > 0.5: good, < 0.5: poor
    if both > IMPROVING_DROP:
        score = margin_confidence(both, IMPROVING_DROP, scale=0.03)
        return Candidate("still_improving", score, None, [Finding("still_improving", None, tail)], facts)
    if drop >= FLAT_DROP:
        if good:
            return Candidate("still_improving", quality_margin, None, [Finding("still_improving", None, tail)], facts)
        return Candidate("slow_convergence", 1 - quality_margin, None, [Finding(
            "slow_convergence", None, f"{tail}: falling steadily but slowly, still far from a good value")], facts)
    if good:
        text = f"{tail}; it is {_pct(from_min)} above its minimum {best:.4g}"
        score = quality_margin if from_min <= NEAR_MINIMUM else 0.5  # drifted up a little, without overfitting
        return Candidate("converged", score, None, [Finding("converged", None, text)], facts)
    text = f"{tail}: flat at a poor level"
    if regularised:
        text += (f"; train_loss {np.median(h.train_loss[-3:]):.4g} stays above val_loss "
                 f"{np.median(h.val_loss[-3:]):.4g}: regularisation holds the model back")
    return Candidate("underfitting", 1 - quality_margin, _epoch(h, 0),
                     [Finding("underfitting", _epoch(h, 0), text)], facts)


def objective_values(h: History) -> np.ndarray | None:
    """The objective metric per epoch, where the history carries it (a plug-in's own metric where its rows do)."""
    return getattr(h, h.metric) if h.metric in ("val_loss", "val_acc", "train_loss") else h.other_objective


def peer_gap(h: History) -> float | None:
    """How much worse the trial's best objective so far is than the study's best, as a share of the best's
    magnitude (0: as good; 0.5: half again worse; negative: better); None without peers or the objective."""
    peers = h.context.peers if h.context is not None else None
    values = objective_values(h)
    if peers is None or peers.best is None or values is None or not np.isfinite(values).any():
        return None
    mine = float(np.nanmin(values) if h.direction == "minimize" else np.nanmax(values))
    scale = max(abs(peers.best.value), 1e-12)
    worse = mine - peers.best.value if h.direction == "minimize" else peers.best.value - mine
    return worse / scale


def lr_too_high(h: History) -> Candidate | None:
    """A learning rate far too high, which the context makes readable (nothing without one).

    Two signs: a loss in the first epochs far above what an untrained network scores (ln k for a
    k-class cross-entropy), which ends the run `diverged` when it never gets back below that
    level or to skill above chance (dead units: the network at chance); and a loss that jumps to
    3x the epoch before, back above where it started, which is `oscillating` (the steps overshoot).
    Either way the first remedy lowers the learning rate (`remedies`).
    """
    ctx = h.context
    if ctx is None or len(h) < 3:  # a high lr that recovers takes an epoch or two: read it after three
        return None
    n_classes = ctx.n_classes or uniform_classes(h)  # a plug-in's class count, read off a network at chance
    untrained = math.log(n_classes) if n_classes else None
    # Read off the run's end, ln k says nothing of the data's scale: a first loss far above it that falls over
    # many epochs is a slow start (unscaled inputs, heavy dropout); a blow-up is back near ln k in an epoch.
    inferred_slow_start = (not ctx.n_classes and untrained is not None and len(h) > 1
                           and float(h.train_loss[1]) > OVERSHOT_START * untrained)
    if untrained is not None and not inferred_slow_start:
        early = sig.finite(np.concatenate([h.train_loss[:3], h.val_loss[:3]]))
        peak = float(np.max(early)) if len(early) else math.nan
        ratio = peak / untrained
        end = float(np.median(sig.finite(h.train_loss[-3:]))) if len(sig.finite(h.train_loss[-3:])) else math.nan
        q, why = quality(h) if ratio > OVERSHOT_START else (1.0, "")  # read per epoch: only when it can matter
        # Above an untrained network's loss at first, then a network at chance (its validation loss at ln k,
        # no skill): the first steps threw the weights far off and killed its units. A too-small lr starts
        # at ln k and stays near it; heavy regularisation pulls the outputs to uniform, also at ln k.
        dead = q < NO_SKILL and h.has("val_loss") and float(np.nanmin(h.val_loss[-3:])) >= 0.95 * untrained
        if ratio > BLOWN_START or (ratio > OVERSHOT_START and dead):
            if q < 0.3 or end > untrained:
                score = max(margin_confidence(ratio, BLOWN_START, scale=0.5, log=True),
                            margin_confidence(0.3, q, scale=0.1))
                if ratio <= BLOWN_START:
                    score = min(score, 0.8)  # a milder overshoot: the dead network is most of the evidence
                state = (f"its train_loss still ends at {end:.4g}, above that untrained level ({why})"
                         if end > untrained else f"the run never got back to skill ({why})")
                return Candidate("diverged", max(score, 0.6), _epoch(h, 0), [Finding(
                    "diverged", _epoch(h, 0), f"in the first epochs the loss reached {peak:.4g}, {ratio:.3g}x the "
                                             f"{untrained:.3g} of an untrained {n_classes}-class network "
                                             f"(ln {n_classes}), and {state}: steps far too large")],
                    {"collapsed": 1.0, "blown_ratio": ratio})
    jump = _worst_jump(h, untrained)
    if jump is None:
        return None
    name, index, factor, count = jump
    values = getattr(h, name)
    e = _epoch(h, index)
    score = min(0.95, margin_confidence(factor, JUMP_FACTOR, scale=0.3, log=True) + 0.1 * (count - 1))
    return Candidate("oscillating", max(score, 0.6), e, [Finding(
        "oscillating", e, f"{name} jumped from {values[index - 1]:.4g} at epoch {h.epochs[index - 1]} to "
                          f"{values[index]:.4g} at epoch {e} ({factor:.3g}x)"
                          + (f", and {count - 1} more time(s)" if count > 1 else "")
                          + ": the steps overshoot")], {"jump": factor})


def _worst_jump(h: History, untrained: float | None) -> tuple[str, int, float, int] | None:
    """The largest epoch-to-epoch jump of 3x or more that lands back above where the curve started (or
    above an untrained network's loss): (metric, index, factor, how many such jumps), or None."""
    found: tuple[str, int, float, int] | None = None
    for name in ("val_loss", "train_loss"):
        values = getattr(h, name)
        ok = np.isfinite(values[1:]) & np.isfinite(values[:-1]) & (values[:-1] > 0)
        if not ok.any():
            continue
        start = float(sig.finite(values)[0])
        floor = min(start, untrained) if untrained is not None else start
        ratio = np.where(ok, values[1:] / np.where(values[:-1] > 0, values[:-1], 1.0), 0.0)
        jumps = np.flatnonzero((ratio >= JUMP_FACTOR) & (values[1:] >= floor))
        if len(jumps) and (found is None or ratio[jumps].max() > found[2]):
            worst = int(jumps[np.argmax(ratio[jumps])])
            found = (name, worst + 1, float(ratio[worst]), len(jumps))
    return found
