"""The diagnosis' optional `context`: what a curve alone cannot tell.

A curve cannot tell a dead network from an over-regularised one, nor a bad level from a hard
task. The context can: the class count (so the chance level and the untrained loss, ln k),
the trial's own hyperparameters, the study's search-space bounds, and a summary of the trials
of the same study that ended (`peers`). Every key is optional and unknown keys are ignored; a
malformed value, or one that contradicts the history (`n_classes: 1`), is a problem listed
like any other in `HistoryError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PARAMS = ("lr", "batch_size", "epochs", "weight_decay", "dropout")
TASKS = ("classification", "regression")
MAX_CLASSES = 1_000_000
MAX_TOP = 100
GOOD_PEER_SPREAD = 0.5  # a trial worse than the study's best by more than half its magnitude is not a good one


@dataclass(frozen=True)
class Bound:
    """One hyperparameter's search-space entry: a range (`log` scale or not), choices, or a fixed value."""

    low: float
    high: float
    log: bool = False
    choices: tuple[float, ...] = ()

    def clip(self, value: float) -> float:
        """The nearest value the search space allows (the nearest choice for choices)."""
        if self.choices:
            return min(self.choices, key=lambda c: abs(math.log(c / value)) if c > 0 and value > 0 else abs(c - value))
        return min(self.high, max(self.low, value))


@dataclass(frozen=True)
class Peer:
    value: float
    params: Mapping[str, float]
    epochs: int | None = None


@dataclass(frozen=True)
class Peers:
    """The ended trials of the study so far: how many, the best one, and the best few (best first)."""

    ended: int = 0
    best: Peer | None = None
    top: tuple[Peer, ...] = ()

    def good(self) -> tuple[Peer, ...]:
        """The trials to move toward: those of the best few that are not poor beside the best (no worse than
        it by half its magnitude: early in a sweep the best few may include trials that learnt nothing), or
        the best alone."""
        if self.best is None:
            return self.top
        spread = GOOD_PEER_SPREAD * abs(self.best.value)
        return tuple(p for p in self.top if abs(p.value - self.best.value) <= spread) or (self.best,)

    def typical(self, param: str) -> float | None:
        """The good trials' value of `param` (their geometric mean for positive values, else the mean)."""
        values = [float(p.params[param]) for p in self.good() if _finite(p.params.get(param))]
        if not values:
            return None
        if all(v > 0 for v in values):
            return math.exp(sum(math.log(v) for v in values) / len(values))
        return sum(values) / len(values)


@dataclass(frozen=True)
class Context:
    task: str | None = None
    n_classes: int | None = None
    params: Mapping[str, float] = field(default_factory=dict)
    bounds: Mapping[str, Bound] = field(default_factory=dict)
    peers: Peers | None = None

    @property
    def untrained_loss(self) -> float | None:
        """The cross-entropy of a network that knows nothing yet: ln(n_classes)."""
        return math.log(self.n_classes) if self.n_classes else None


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_context(data: Any, problems: list[str], n_epochs: int, has_val_acc: bool) -> Context | None:
    """The context of a history, or None when absent; problems are appended to `problems`."""
    if data is None:
        return None
    if not isinstance(data, Mapping):
        problems.append(f"context must be an object, got {type(data).__name__}")
        return None
    task = data.get("task")
    if task is not None and task not in TASKS:
        problems.append(f"context.task must be 'classification' or 'regression', got {str(task)[:40]!r}")
        task = None
    n_classes = _n_classes(data.get("n_classes"), task, problems)
    if task is None and n_classes is not None:
        task = "classification"
    if task == "regression" and has_val_acc:
        problems.append("context.task 'regression' contradicts the history, which has val_acc (a classification "
                        "metric)")
    params = _params(data.get("params"), "context.params", problems)
    if params.get("epochs") is not None and params["epochs"] < n_epochs:
        problems.append(f"context.params.epochs {params['epochs']:g} contradicts the history, which has {n_epochs} "
                        "epochs")
    return Context(task=task, n_classes=n_classes, params=params, bounds=_bounds(data.get("bounds"), problems),
                   peers=_peers(data.get("peers"), problems))


def _n_classes(value: Any, task: str | None, problems: list[str]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_CLASSES:
        problems.append(f"context.n_classes must be an integer from 2 to {MAX_CLASSES:,} (a classification has at "
                        f"least two classes), got {str(value)[:40]}")
        return None
    if task == "regression":
        problems.append("context.n_classes contradicts context.task 'regression'")
        return None
    return value


def _params(value: Any, where: str, problems: list[str]) -> dict[str, float]:
    """The five hyperparameters among `value`'s keys (others ignored), each a finite number."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.append(f"{where} must be an object of hyperparameters, got {type(value).__name__}")
        return {}
    out: dict[str, float] = {}
    for name in PARAMS:
        v = value.get(name)
        if v is None:
            continue
        if not _finite(v) or v < 0 or (name in ("lr", "batch_size", "epochs") and v <= 0):
            sign = "non-negative" if name in ("weight_decay", "dropout") else "positive"
            problems.append(f"{where}.{name} must be a finite {sign} number, got {str(v)[:40]}")
            continue
        out[name] = float(v)
    return out


def _bounds(value: Any, problems: list[str]) -> dict[str, Bound]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.append(f"context.bounds must be an object, got {type(value).__name__}")
        return {}
    out: dict[str, Bound] = {}
    for name in PARAMS:
        entry = value.get(name)
        if entry is None:
            continue
        bound = _bound(entry)
        if bound is None:
            problems.append(f"context.bounds.{name} must be {{low, high[, log]}}, {{choices: [...]}} or {{value: x}} "
                            "with finite numbers, low <= high")
            continue
        out[name] = bound
    return out


def _bound(entry: Any) -> Bound | None:
    if isinstance(entry, Mapping) and "choices" in entry:
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices or not all(_finite(c) for c in choices):
            return None
        values = tuple(float(c) for c in choices)
        return Bound(min(values), max(values), choices=tuple(sorted(values)))
    if isinstance(entry, Mapping) and "value" in entry:
        return Bound(float(entry["value"]), float(entry["value"])) if _finite(entry["value"]) else None
    if isinstance(entry, Mapping) and _finite(entry.get("low")) and _finite(entry.get("high")):
        low, high, log = float(entry["low"]), float(entry["high"]), bool(entry.get("log", False))
        return Bound(low, high, log) if low <= high and (not log or low > 0) else None
    return None


def _peers(value: Any, problems: list[str]) -> Peers | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        problems.append(f"context.peers must be an object, got {type(value).__name__}")
        return None
    ended = value.get("ended", 0)
    if isinstance(ended, bool) or not isinstance(ended, int) or ended < 0:
        problems.append(f"context.peers.ended must be a non-negative integer, got {str(ended)[:40]}")
        ended = 0
    best = _peer(value.get("best"), "context.peers.best", problems)
    top_data = value.get("top", [])
    top: list[Peer] = []
    if not isinstance(top_data, list):
        problems.append("context.peers.top must be a list of {value, params}")
    else:
        for index, item in enumerate(top_data[:MAX_TOP]):
            peer = _peer(item, f"context.peers.top[{index}]", problems)
            if peer is not None:
                top.append(peer)
    return Peers(ended=ended, best=best, top=tuple(top))


def _peer(value: Any, where: str, problems: list[str]) -> Peer | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not _finite(value.get("value")):
        problems.append(f"{where} must be an object with a finite 'value'")
        return None
    epochs = value.get("epochs")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        problems.append(f"{where}.epochs must be a positive integer, got {str(epochs)[:40]}")
        epochs = None
    return Peer(float(value["value"]), _params(value.get("params"), f"{where}.params", problems), epochs)
