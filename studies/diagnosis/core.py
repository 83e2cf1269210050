"""`diagnose`: run every detector on a history and pick one primary verdict.

Detectors are tried in order of severity; the first whose confidence reaches one half is
the verdict, and the others that fired are kept as secondary findings. A history with none
of the unhealthy signs is read for its trend (converged, still improving, slow, underfitting).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from converge.studies.diagnosis import rules
from converge.studies.diagnosis.history import History, parse_history
from converge.studies.diagnosis.remedies import remedies_for
from converge.studies.diagnosis.result import Diagnosis

DETECTORS: tuple[Callable[[History], rules.Candidate | None], ...] = (
    rules.diverged,
    rules.lr_too_high,  # reads the context: nothing without one
    rules.exploding_gradients,
    rules.vanishing_gradients,
    rules.oscillating,  # before overfitting: a val loss swinging without trend is not a rise
    rules.overfitting,
)


def diagnose(history: History | Any) -> Diagnosis:
    """Diagnose a history (a `History` or the contract's JSON-decoded dict); raises `HistoryError` on bad input."""
    h = history if isinstance(history, History) else parse_history(history)
    with np.errstate(all="ignore"):  # NaN and infinities are data here; the rules handle them
        fired = [c for c in (detect(h) for detect in DETECTORS) if c is not None and c.score >= 0.5]
        # The first verdict in severity order; of two detectors agreeing on it, the surer one speaks.
        primary = max((c for c in fired if c.verdict == fired[0].verdict), key=lambda c: c.score) if fired \
            else rules.trend(h)
    findings = list(primary.findings) + [f for c in fired[1:] for f in c.findings]
    return Diagnosis(verdict=primary.verdict, onset_epoch=primary.onset, confidence=primary.score,
                     findings=findings, remedies=remedies_for(primary, h), summary=_summary(primary, h))


_MEANING = {
    "converged": "converged",
    "still_improving": "is still improving",
    "diverged": "diverged",
    "exploding_gradients": "has exploding gradients",
    "vanishing_gradients": "has vanishing gradients",
    "oscillating": "oscillates",
    "slow_convergence": "converges too slowly",
    "overfitting": "overfits",
    "underfitting": "underfits",
}


def _summary(primary: rules.Candidate, h: History) -> str:
    onset = f" from epoch {primary.onset}" if primary.onset is not None and primary.verdict != "underfitting" else ""
    text = f"After {len(h)} epoch{'s' if len(h) != 1 else ''} the run {_MEANING[primary.verdict]}{onset}"
    text += f" (confidence {primary.score:.2f})"
    if primary.findings:
        text += f": {primary.findings[0].evidence}."
    return text
