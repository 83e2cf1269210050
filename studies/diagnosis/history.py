"""The diagnosis input: a trial's per-epoch history, parsed and checked once into numpy arrays.

Accepts what the contract allows (bare NaN/Infinity or the strings "NaN", "Infinity",
"-Infinity"; absent or null optional metrics) and refuses, with every reason at once,
what would make a diagnosis meaningless (no epochs, epochs out of order or repeated,
a missing `train_loss`, more than `MAX_EPOCHS` epochs).
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from converge.core.errors import Invalid
from converge.studies.diagnosis.context import Context, parse_context

MAX_EPOCHS = 10_000
OPTIONAL_METRICS = ("val_loss", "val_acc", "grad_norm", "param_norm", "lr")
_NON_FINITE = {"nan": math.nan, "infinity": math.inf, "+infinity": math.inf, "-infinity": -math.inf,
               "inf": math.inf, "+inf": math.inf, "-inf": -math.inf}


# How a refused value is shown in a problem: repr, cut short, so that a huge string or a deeply nested value in
# the input makes neither a huge message nor a RecursionError.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 3, 80, 80, 80


def _shown(value: Any) -> str:
    return _REPR.repr(value)


class HistoryError(Invalid):
    """The history cannot be diagnosed; `problems` lists every reason (in one line: a `--jsonl` row holds it)."""

    what = "history"
    one_line = True


@dataclass(frozen=True)
class History:
    """One run as arrays aligned by epoch; an absent metric is all-NaN and listed in `missing`."""

    epochs: np.ndarray
    train_loss: np.ndarray
    val_loss: np.ndarray
    val_acc: np.ndarray
    grad_norm: np.ndarray
    param_norm: np.ndarray
    lr: np.ndarray
    metric: str
    direction: str
    max_epochs: int | None
    context: Context | None = None  # what the curve alone cannot tell (`studies.diagnosis.context`)
    # The objective metric per epoch when it is none of the above (a plug-in's `val_mae`), where the rows carry it.
    other_objective: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.epochs)

    def has(self, name: str) -> bool:
        """True when the metric has at least one finite value."""
        return bool(np.isfinite(getattr(self, name)).any())

    @property
    def loss(self) -> np.ndarray:
        """The loss the verdicts read: validation where measured, else training."""
        return self.val_loss if self.has("val_loss") else self.train_loss


def parse_history(data: Any) -> History:
    """Validate a history dict (already JSON-decoded) and return it as arrays."""
    if not isinstance(data, Mapping):
        raise HistoryError([f"a history is a JSON object with an 'epochs' list, got {type(data).__name__}"])
    problems: list[str] = []
    metric, direction = _objective(data.get("objective"), problems)
    max_epochs = _max_epochs(data.get("max_epochs"), problems)
    rows = data.get("epochs")
    if not isinstance(rows, list) or not rows:
        problems.append("'epochs' must be a non-empty list of per-epoch objects")
        raise HistoryError(problems)
    if len(rows) > MAX_EPOCHS:
        problems.append(f"the history has {len(rows)} epochs; at most {MAX_EPOCHS} are diagnosed")
        raise HistoryError(problems)
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            problems.append(f"epochs[{index}] is not an object")
    rows = [row if isinstance(row, Mapping) else {} for row in rows]
    epochs = [_epoch_number(row.get("epoch"), index, problems) for index, row in enumerate(rows)]
    _check_order(epochs, problems)
    arrays = {name: _column(rows, name, problems, required=name == "train_loss")
              for name in ("train_loss", *OPTIONAL_METRICS)}
    other = _column(rows, metric, problems, required=False) if metric not in arrays else None
    context = parse_context(data.get("context"), problems, len(rows), bool(np.isfinite(arrays["val_acc"]).any()))
    if problems:
        raise HistoryError(problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else []))
    return History(epochs=np.asarray(epochs, dtype=float).astype(int), metric=metric, direction=direction,
                   max_epochs=max_epochs, context=context,
                   other_objective=other if other is not None and np.isfinite(other).any() else None, **arrays)


def _column(rows: list[Mapping[str, Any]], name: str, problems: list[str], *, required: bool) -> np.ndarray:
    """One metric over the epochs as floats (absent or null: NaN), every bad value listed in `problems`."""
    values = [row.get(name) for row in rows]
    # The common case in one conversion: plain floats and ints (None where optional). A bool is an int to
    # Python but no metric; an integer past a float's range overflows and takes the slow path's message.
    if all(type(v) is float or type(v) is int or (v is None and not required) for v in values):
        try:
            return np.asarray(values, dtype=float)
        except OverflowError:
            pass
    return np.asarray([_number(v, f"epochs[{i}].{name}", problems, required=required) for i, v in enumerate(values)],
                      dtype=float)


def _objective(value: Any, problems: list[str]) -> tuple[str, str]:
    if value is None:
        return "val_loss", "minimize"
    if not isinstance(value, Mapping):
        problems.append("'objective' must be an object like {\"metric\": \"val_loss\", \"direction\": \"minimize\"}")
        return "val_loss", "minimize"
    metric = value.get("metric", "val_loss")
    direction = value.get("direction", "minimize")
    if not isinstance(metric, str) or not metric:
        problems.append("objective.metric must be a metric name such as 'val_loss'")
        metric = "val_loss"
    if direction not in ("minimize", "maximize"):
        problems.append(f"objective.direction must be 'minimize' or 'maximize', got {_shown(direction)}")
        direction = "minimize"
    return metric, direction


def _max_epochs(value: Any, problems: list[str]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"max_epochs must be a positive integer, got {_shown(value)}")
        return None
    return value


MAX_EPOCH_NUMBER = 2**31 - 1  # far past any run; larger numbers would overflow the detectors' integer arrays


def _epoch_number(value: Any, index: int, problems: list[str]) -> float:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        if isinstance(value, float) and value.is_integer() and 0 <= value <= MAX_EPOCH_NUMBER:
            return value
        problems.append(f"epochs[{index}].epoch must be a non-negative integer up to {MAX_EPOCH_NUMBER}, "
                        f"got {_shown(value)}")
        return math.nan
    if value > MAX_EPOCH_NUMBER:
        problems.append(f"epochs[{index}].epoch must be a non-negative integer up to {MAX_EPOCH_NUMBER}, "
                        f"got {_shown(value)}")
        return math.nan
    return float(value)


def _number(value: Any, where: str, problems: list[str], *, required: bool) -> float:
    if type(value) is float or type(value) is int:  # the common case, checked first: it is most of the work
        try:
            return float(value)
        except OverflowError:  # an integer past a float's range: JSON has such integers, floats do not
            return _too_large(where, problems)
    if value is None:
        if required:
            problems.append(f"{where} is required")
        return math.nan
    if isinstance(value, str):
        parsed = _NON_FINITE.get(value.strip().lower())
        if parsed is None:
            problems.append(f"{where} must be a number or one of \"NaN\", \"Infinity\", \"-Infinity\", "
                            f"got {_shown(value)}")
            return math.nan
        return parsed
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(f"{where} must be a number, got {type(value).__name__}")
        return math.nan
    try:
        return float(value)
    except OverflowError:
        return _too_large(where, problems)


def _too_large(where: str, problems: list[str]) -> float:
    problems.append(f"{where} must be a number within a float's range (about 1.8e308), got an integer of over "
                    "300 digits")
    return math.nan


def _check_order(epochs: list[float], problems: list[str]) -> None:
    """Epochs must strictly increase: a repeat or a step back means two runs were mixed up."""
    previous = None
    for index, epoch in enumerate(epochs):
        if math.isnan(epoch):
            continue
        if previous is not None and epoch <= previous:
            kind = "repeated" if epoch == previous else "out of order"
            problems.append(f"epoch {int(epoch)} at epochs[{index}] is {kind} (after epoch {int(previous)}); "
                            "epochs must strictly increase")
            return
        previous = epoch
