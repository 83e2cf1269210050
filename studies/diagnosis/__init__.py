"""Convergence diagnosis: why a trial did or did not converge, and what to change.

Pure Python and numpy (no torch, no database), so the API, the CLI and the workers share it.
`diagnose(history)` takes a trial's history in the contract's input format, any prefix of a
run, and returns a `Diagnosis` (`.to_dict()` gives the contract's JSON).
"""

from converge.studies.diagnosis.core import diagnose
from converge.studies.diagnosis.history import MAX_EPOCHS, History, HistoryError, parse_history
from converge.studies.diagnosis.result import (
    HEALTHY_VERDICTS,
    REMEDY_ACTIONS,
    REMEDY_PARAMS,
    UNHEALTHY_VERDICTS,
    VERDICTS,
    Diagnosis,
    Finding,
    Remedy,
)

__all__ = [
    "HEALTHY_VERDICTS", "MAX_EPOCHS", "REMEDY_ACTIONS", "REMEDY_PARAMS", "UNHEALTHY_VERDICTS", "VERDICTS",
    "Diagnosis", "Finding", "History", "HistoryError", "Remedy", "diagnose", "parse_history",
]
