"""The study's ended trials, summarised for a trial's diagnosis context (`context.peers`).

A trial's diagnosis is told how the study's other trials ended: how many have, the best one
(its value, how many epochs it ran, its params) and the best few. The summary is built at the
trial's start and kept for its life: the diagnosis runs every epoch, and reading the study's
trials every epoch (six queries over its unfinished trials, then a walk over all of them)
would cost more as the study grows than the epoch itself on a small task.

Nor is it rebuilt at each trial's start: `PeerSummary` is kept per study in the process
(`study_peers`, next to the study's trial cache: `studies.storage.ThrottledReads`, one per
study object `studies.runner.study_for` keeps) and folds in only the trials it has not seen
ended yet, keeping the best few. A trial's start asks the study's cached trials once, as the
pruning rules and the sampler do (`studies.objective.Objective._behind_peers`): nothing there
reads the database more often than the cache's `max_age_s`. (Where neither reads the study's
trials, a random sampler without a pruner, this read is the one that refreshes the cache: the
trials other workers ended are seen, at the cost of at most one read per `max_age_s`.)
"""

from __future__ import annotations

import math
import numbers
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

ENDED = (TrialState.COMPLETE, TrialState.PRUNED)
TOP = 5  # the best trials a summary lists


@dataclass(frozen=True)
class _Peer:
    trial_id: int
    number: int
    value: float
    epochs: int | None
    params: dict[str, Any]


def _plain(value: Any) -> Any:
    """A parameter as a plain JSON value (Optuna hands back what the storage decoded: a number or a string)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


def _epochs_run(trial: FrozenTrial) -> int | None:
    """How many epochs the trial ran: the intermediate values it reported, else its `epochs` param."""
    if trial.intermediate_values:
        return len(trial.intermediate_values)
    epochs = trial.params.get("epochs")
    if isinstance(epochs, int | float) and not isinstance(epochs, bool) and math.isfinite(epochs) and epochs >= 1:
        return int(epochs)
    return None


class PeerSummary:
    """One study's ended trials, folded in as they are seen: the count and the best `size` complete ones.

    `update(trials)` takes the study's ended trials (complete and pruned) as the process has them
    and folds in those it has not seen yet; a trial ended once stays ended, so a list of as many
    trials as it has seen holds nothing new, and is not walked. Pruned trials count as ended but
    are never best: their value is where they were stopped. A complete trial without a finite value
    (none of Converge's, but a trial added by hand may be one) counts as ended too, and only that.
    """

    def __init__(self, direction: str, size: int = TOP):
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
        self.direction = direction
        self.size = size
        self._seen: set[int] = set()  # trial ids folded in
        self._top: list[_Peer] = []  # best first; one more than `size`, so that one excluded leaves `size`
        self._lock = threading.Lock()

    @property
    def ended(self) -> int:
        return len(self._seen)

    def update(self, trials: Sequence[FrozenTrial]) -> int:
        """Fold in the ended trials of `trials` not seen yet; how many were new."""
        with self._lock:
            if len(trials) == len(self._seen):  # the same ended trials as last time: nothing to walk
                return 0
            new = 0
            for trial in trials:
                if trial._trial_id in self._seen or trial.state not in ENDED:
                    continue
                self._seen.add(trial._trial_id)
                new += 1
                if trial.state == TrialState.COMPLETE:
                    self._offer(trial)
            return new

    def _offer(self, trial: FrozenTrial) -> None:
        values = trial.values
        if not values or not isinstance(values[0], int | float) or not math.isfinite(values[0]):
            return
        value = float(values[0])
        keep = self.size + 1
        if len(self._top) >= keep and not self._better(value, trial.number, self._top[-1]):
            return
        peer = _Peer(trial._trial_id, trial.number, value, _epochs_run(trial),
                     {name: _plain(v) for name, v in trial.params.items()})
        index = next((i for i, other in enumerate(self._top) if self._better(value, trial.number, other)),
                     len(self._top))
        self._top.insert(index, peer)
        del self._top[keep:]

    def _better(self, value: float, number: int, other: _Peer) -> bool:
        """Better in the study's direction; of equal values, the earlier trial first."""
        if value != other.value:
            return value < other.value if self.direction == "minimize" else value > other.value
        return number < other.number

    def to_dict(self, exclude: int | None = None) -> dict[str, Any] | None:
        """The context's `peers`, without the trial of id `exclude`; None while no trial has completed."""
        with self._lock:
            top = [p for p in self._top if p.trial_id != exclude][: self.size]
            ended = len(self._seen) - (exclude in self._seen)
        if not top:
            return None
        best = top[0]
        best_entry: dict[str, Any] = {"value": best.value}
        if best.epochs is not None:
            best_entry["epochs"] = best.epochs
        best_entry["params"] = dict(best.params)
        return {"ended": ended, "best": best_entry,
                "top": [{"value": p.value, "params": dict(p.params)} for p in top]}


# Per storage object (a study's trial cache lives in it, and goes with it), then per Optuna study id.
_SUMMARIES: weakref.WeakKeyDictionary[Any, dict[tuple[int, str], PeerSummary]] = weakref.WeakKeyDictionary()
_SUMMARIES_LOCK = threading.Lock()


def study_peers(study: optuna.Study, direction: str) -> PeerSummary:
    """This process's summary of `study`'s ended trials, brought up to date from the trials the study
    has in its cache (one cached read: `studies.storage.ThrottledReads`)."""
    storage = study._storage
    key = (study._study_id, direction)
    with _SUMMARIES_LOCK:
        try:
            per_storage = _SUMMARIES.setdefault(storage, {})
        except TypeError:  # a storage that takes no weak reference: a summary for this call only
            per_storage = {}
        summary = per_storage.get(key)
        if summary is None:
            summary = per_storage[key] = PeerSummary(direction)
    summary.update(study.get_trials(deepcopy=False, states=ENDED))
    return summary


def peers_context(study: optuna.Study, direction: str, trial_id: int) -> dict[str, Any] | None:
    """The context's `peers` for the trial of id `trial_id`: the study's other ended trials."""
    return study_peers(study, direction).to_dict(exclude=trial_id)

