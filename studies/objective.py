"""The Optuna objective: suggest the five hyperparameters, train, record and diagnose every epoch.

Each epoch's metrics go to Converge's table as the epoch ends (visible through the API
while the trial runs), together with the diagnosis of the history so far (one row per
trial, replaced every epoch, marked final when the trial ends); only the objective metric
goes to Optuna, for pruning.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.trial import TrialState
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from converge.core.db import repo
from converge.core.db.engine import describe_cause, is_transient, retry_unit_of_work
from converge.core.settings import Settings
from converge.studies import checkpoints
from converge.studies.diagnosis import MAX_EPOCHS, HistoryError, diagnose
from converge.studies.peers import peers_context
from converge.studies.plots.dashboard import write_trial_note
from converge.studies.pruning import (
    PRUNED_BY_ATTR,
    STOPPED_EARLY_ATTR,
    PruneDecision,
    behind_peers,
    best_until,
    came_back,
    diagnosis_rule,
    early_stop_rule,
    extrapolation_rule,
    still_falling,
)
from converge.studies.retries import INTERRUPTED, rerun
from converge.studies.search_space import suggest
from converge.studies.spec import StudySpec
from converge.studies.trial_context import trial_context

EpochListener = Callable[[optuna.Trial, dict[str, Any]], None]


@dataclass(frozen=True)
class EpochStop:
    """Why a trial's run stops after an epoch: the one decision of `Objective._stop_after`."""

    kind: Literal["cancelled", "interrupted", "pruned", "stopped_early", "no_objective"]
    epoch: int
    rule: PruneDecision | None = None  # a pruned or early-stopped trial's rule

log = logging.getLogger("converge.objective")

# The per-epoch keys of the diagnosis contract's history (the trainer's `epoch_seconds` is not one).
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_acc", "grad_norm", "param_norm", "lr")
LAST_METRICS_ATTR = "converge_last_metrics"  # a user's module: its last epoch's metrics outside HISTORY_KEYS


class MissingObjective(RuntimeError):
    """The user's module never logged the objective metric."""


class ObjectiveNotFinite(RuntimeError):
    """The objective metric became NaN or infinite: the trial diverged."""


class StudyCancelled(RuntimeError):
    """A user cancelled the trial's study; the trial stopped at an epoch boundary."""


class TrialInterrupted(RuntimeError):
    """The worker is shutting down: the trial stopped at an epoch boundary and is rerun elsewhere."""


class StorageLost(BaseException):  # noqa: N818 - not an error of the trial's: see below
    """The database stayed unavailable (down, read-only, full) for longer than the trial's writes wait
    (`core.db.engine.RETRY_WITHIN_S`): the trial stopped where it was.

    A BaseException, so that Optuna's `optimize` lets it through without writing the trial's state:
    the attempt stays RUNNING for `runner.run_slot` (or, while the database is still away, the
    worker) to settle as a crashed one (`studies.retries.settle_dead_attempt`): failed, and rerun
    within the spec's `retries`. Its final diagnosis is marked then too.
    """

    def __init__(self, trial_id: int, trial_number: int, cause: str):
        super().__init__(f"trial {trial_number}: the database became unavailable: {cause}")
        self.trial_id = trial_id
        self.trial_number = trial_number
        self.cause = cause


class Objective:
    def __init__(self, spec: StudySpec, study_id: int, engine: Engine, *, device: str = "auto",
                 on_trial_start: Callable[[optuna.Trial], None] | None = None,
                 on_epoch: EpochListener | None = None, should_stop: Callable[[], bool] | None = None,
                 artifact_store: Any = None, settings: Settings | None = None):
        self.spec = spec
        self.settings = settings  # its data folder and CSV size cap (`train_config`)
        self.artifact_store = artifact_store  # where kept checkpoints go (None: none is kept)
        self.uploaded_checkpoint = False  # this trial stored one: `checkpoints.retain` runs after it completes
        self.study_id = study_id
        self.engine = engine
        self.device = device
        self.on_trial_start = on_trial_start
        self.on_epoch = on_epoch
        self.should_stop = should_stop  # polled at each epoch's end: the worker was asked to stop

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            with _params_in_one_write(trial.study._storage):  # what on_trial_start writes goes with the params
                if self.on_trial_start is not None:
                    self.on_trial_start(trial)
                params = suggest(trial, self.spec.search_space)
            return self._train(trial, params)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            if is_transient(exc):  # the database, not the trial: nothing more can be written now
                raise StorageLost(trial._trial_id, trial.number, describe_cause(exc)) from exc
            # Optuna keeps no failure reason of its own; the API and CLI show this one.
            error = f"{type(exc).__name__}: {exc}"
            if self.spec.task.is_plugin and "task.model" not in error and "task.data" not in error:
                error = f"{error} (task.model {self.spec.task.model!r}, task.data {self.spec.task.data!r})"
            trial.set_user_attr("error", error[:2000])
            raise

    def _train(self, trial: optuna.Trial, params: dict[str, Any]) -> float:
        diagnoser = TrialDiagnoser(self.spec, trial.number, max_epochs=int(params["epochs"]),
                                   context=self._context(trial, params))
        try:
            value = self._fit(trial, params, diagnoser)
        except BaseException as exc:
            # Pruned or failed: the last diagnosis becomes the trial's final one; unless the database is
            # away (StorageLost), when settling the attempt marks it final.
            if not is_transient(exc):
                diagnoser.save_final(self.engine, self.study_id, trial)
            raise
        diagnoser.save_final(self.engine, self.study_id, trial)  # complete: likewise
        return value

    def _fit(self, trial: optuna.Trial, params: dict[str, Any], diagnoser: TrialDiagnoser) -> float:
        if self.spec.kept_checkpoints() <= 0 or self.artifact_store is None:
            return self._fit_in(trial, params, diagnoser, None)
        with tempfile.TemporaryDirectory(prefix="converge-checkpoint-") as scratch:
            return self._fit_in(trial, params, diagnoser, Path(scratch) / f"{self.spec.name}-trial-{trial.number}.ckpt")

    def _fit_in(self, trial: optuna.Trial, params: dict[str, Any], diagnoser: TrialDiagnoser,
                checkpoint: Path | None) -> float:
        from converge.trainers import fit  # torch is imported in the trial's process only

        metric = self.spec.objective.metric
        reported: dict[int, float] = {}  # epoch -> objective, what the trial has reached so far
        stop: EpochStop | None = None  # the one decision that ended the run after an epoch, if any

        def on_epoch_end(metrics: dict[str, Any]) -> bool:
            nonlocal stop
            diagnosis = diagnoser.add_epoch(metrics)
            epoch = int(metrics["epoch"])
            value = metrics.get(metric)
            reportable = value is not None and math.isfinite(value)
            cancelled = self._store_epoch(trial, metrics, diagnosis, float(value) if reportable else None)
            if reportable:  # also what the dashboard plots per epoch, and what a pruned trial's value is
                reported[epoch] = float(value)
            if self.on_epoch is not None:
                self.on_epoch(trial, metrics)
            if stop is None:  # the first decision stands
                stop = self._stop_after(trial, epoch, diagnosis, diagnoser, cancelled=cancelled,
                                        reportable=reportable, reported=reported)
            return stop is not None

        result = fit(train_config(self.spec, params, self.device, self.settings), on_epoch_end=on_epoch_end,
                     checkpoint_path=checkpoint)
        log.info("trial %d: %d epoch(s) in %.2f s on %s, precision %s", trial.number, len(result.epochs),
                 result.seconds, result.device, result.precision)
        if stop is not None:
            self._act_on(stop, trial)  # raises for all but an early stop and a missing objective
        last = result.epochs[-1]
        value = last.get(metric)
        if value is None:
            logged = sorted(k for k, v in last.items() if v is not None and k not in ("epoch", "epoch_seconds"))
            raise MissingObjective(f"task.model {self.spec.task.model!r} logs no {metric!r}, the objective metric "
                                   f"(epoch {last['epoch']} has: {', '.join(logged)})")
        if not math.isfinite(value):
            where = f" (task.model {self.spec.task.model!r})" if self.spec.task.is_plugin else ""
            raise ObjectiveNotFinite(f"{metric} became {value} at epoch {last['epoch']}: the trial diverged{where}")
        if self.spec.task.is_plugin:  # what the metrics table has no column for: the last epoch's other metrics
            extra = {k: v for k, v in last.items() if k not in HISTORY_KEYS and k != "epoch_seconds"
                     and isinstance(v, float) and math.isfinite(v)}
            if extra:
                trial.set_user_attr(LAST_METRICS_ATTR, extra)
        if checkpoint is not None and checkpoint.is_file():
            self._keep_checkpoint(trial, float(value), checkpoint)
        return float(value)

    def _store_epoch(self, trial: optuna.Trial, metrics: dict[str, Any], diagnosis: dict[str, Any] | None,
                     value: float | None) -> bool:
        """Write the epoch's metrics, its diagnosis so far and (a finite `value`) Optuna's intermediate value
        in one transaction, then report the value to Optuna; True when the study was cancelled meanwhile."""
        epoch = int(metrics["epoch"])
        storage = trial.study._storage
        store_value_too = value is not None and hasattr(storage, "intermediate_value_stored")

        def write_epoch(session: Session) -> tuple[bool, bool]:  # run again whole if the database drops it
            repo.record_epoch(session, self.study_id, trial._trial_id, trial.number, metrics)
            if diagnosis is not None:
                repo.save_diagnosis(session, self.study_id, trial._trial_id, trial.number, epoch, diagnosis,
                                    final=False)
            # Optuna's intermediate value in the same transaction (the report below writes nothing
            # more); not stored when the trial has ended, and then the report fails as Optuna's would.
            stored = store_value_too and repo.record_intermediate_value(session, trial._trial_id, epoch, value)
            return repo.study_state(session, self.study_id) == "cancelled", stored

        cancelled, stored = retry_unit_of_work(self.engine, write_epoch,
                                               what=f"trial {trial.number}: storing epoch {epoch}")
        if value is not None:
            if stored:
                storage.intermediate_value_stored(trial._trial_id, epoch, value)
            trial.report(value, step=epoch)
        return cancelled

    def _stop_after(self, trial: optuna.Trial, epoch: int, diagnosis: dict[str, Any] | None,
                    diagnoser: TrialDiagnoser, *, cancelled: bool, reportable: bool,
                    reported: dict[int, float]) -> EpochStop | None:
        """Whether the trial stops after this epoch, and why: the first criterion that holds, in order
        (the shape of Lightning's `EarlyStopping._evaluate_stopping_criteria`). None to go on."""
        pruner = self.spec.pruner
        convergence = pruner.name == "convergence" and diagnosis is not None
        if cancelled:
            return EpochStop("cancelled", epoch)
        if self.should_stop is not None and self.should_stop():
            return EpochStop("interrupted", epoch)
        if convergence:
            assert diagnosis is not None
            rule = diagnosis_rule(diagnosis, epoch, len(diagnoser.epochs), diagnoser.max_epochs,
                                  min_fraction=pruner.min_fraction, min_confidence=pruner.min_confidence,
                                  behind_peers=lambda: self._behind_peers(
                                      trial, epoch, best_until(reported, epoch, self.spec.objective.direction)),
                                  still_falling=lambda: still_falling(diagnoser.losses(), diagnoser.max_epochs),
                                  came_back=lambda: came_back(diagnoser.losses("train_loss")))
            if rule is not None:
                return EpochStop("pruned", epoch, rule)
        if not reportable:
            return EpochStop("no_objective", epoch)  # nothing more to learn; the objective check fails it
        if convergence and pruner.extrapolation:
            def completed() -> list[float]:
                return [t.value for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                        if t.value is not None]

            rule = extrapolation_rule(reported, epoch, diagnoser.max_epochs, completed,
                                      direction=self.spec.objective.direction, top_k=pruner.extrapolation_top_k,
                                      probability=pruner.extrapolation_probability, min_fraction=pruner.min_fraction,
                                      trial_number=trial.number)
            if rule is not None:
                return EpochStop("pruned", epoch, rule)
        if pruner.name != "none" and trial.should_prune():  # "none" would ask the storage for nothing
            base = pruner.base if pruner.name == "convergence" else pruner.name
            return EpochStop("pruned", epoch, PruneDecision(base, epoch, f"the {base} pruner's decision"))
        if convergence and pruner.early_stop:
            assert diagnosis is not None
            done = early_stop_rule(diagnosis, epoch, len(diagnoser.epochs), diagnoser.max_epochs,
                                   min_fraction=pruner.early_stop_fraction, min_confidence=pruner.min_confidence)
            if done is not None:
                return EpochStop("stopped_early", epoch, done)
        return None

    def _act_on(self, stop: EpochStop, trial: optuna.Trial) -> None:
        """What a stop means for the trial once its run has ended: cancelled or interrupted trials and pruned
        ones end here (before the objective check: a diverged trial pruned by its diagnosis is pruned, not
        failed); an early stop is noted and the trial completes; a missing objective fails at the check."""
        if stop.kind == "cancelled":
            raise StudyCancelled(f"the study was cancelled; the trial stopped after epoch {stop.epoch}")
        if stop.kind == "interrupted":
            raise self._requeue(trial, stop.epoch)
        if stop.kind == "pruned":
            assert stop.rule is not None
            trial.set_user_attr(PRUNED_BY_ATTR, stop.rule.as_attr())
            raise optuna.TrialPruned(f"pruned at epoch {stop.epoch}: {stop.rule.reason}")
        if stop.kind == "stopped_early":
            assert stop.rule is not None
            trial.set_user_attr(STOPPED_EARLY_ATTR, stop.rule.as_attr())

    def _keep_checkpoint(self, trial: optuna.Trial, value: float, checkpoint: Path) -> None:
        """Upload the checkpoint when the trial's value would be among the kept ones (see `studies.checkpoints`)."""
        if not checkpoints.is_candidate(trial.study, value, self.spec.objective.direction,
                                        self.spec.kept_checkpoints()):
            return
        try:
            checkpoints.upload_checkpoint(trial, self.artifact_store, checkpoint)
        except Exception:  # the trial's result matters more than its checkpoint
            log.exception("trial %d: could not store its checkpoint", trial.number)
            return
        self.uploaded_checkpoint = True


    def _context(self, trial: optuna.Trial, params: dict[str, Any]) -> dict[str, Any]:
        """The trial's diagnosis context, built once at its start (`studies.trial_context`): its peers are
        the study's ended trials as this process has them (`studies.peers`), never read again per epoch.
        Peers that cannot be summarised are left out (logged); the database being away is not hidden."""
        try:
            peers = peers_context(trial.study, self.spec.objective.direction, trial._trial_id)
        except Exception as exc:
            if is_transient(exc):
                raise
            log.exception("trial %d: no peers in its diagnosis context", trial.number)
            peers = None
        return trial_context(self.spec, params, peers)

    def _behind_peers(self, trial: optuna.Trial, epoch: int, value: float | None) -> bool:
        """The trial's best objective so far against the ended trials' best by this epoch (from the study's
        cached read): like for like, and an oscillating trial is judged by what it has reached, not by
        where its latest swing left it."""
        direction = self.spec.objective.direction
        ended = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        peers = [best for t in ended if (best := best_until(t.intermediate_values, epoch, direction)) is not None]
        return behind_peers(value, peers, direction)

    def _requeue(self, trial: optuna.Trial, epoch: int) -> TrialInterrupted:
        """Add the trial's rerun before Optuna fails this attempt, so the study never counts it as done."""
        storage = trial.study._storage
        retry = rerun(storage, self.engine, self.spec.name, storage.get_trial(trial._trial_id), INTERRUPTED)
        where = f"rerun as trial {retry}" if retry is not None else "not rerun: its study has ended"
        return TrialInterrupted(f"the worker stopped after epoch {epoch}; {where}")


def train_config(spec: StudySpec, params: dict[str, Any], device: str = "auto",
                 settings: Settings | None = None) -> Any:
    """The trainer's config for one trial: the study's task and its split and init seed, the trial's params;
    the data folder and CSV size cap of `settings` (the trainers' defaults, equal to Converge's, without)."""
    from converge.trainers import TrainConfig

    data_access = {} if settings is None else {"data_dir": settings.data_dir,
                                               "max_data_bytes": settings.max_data_bytes}
    return TrainConfig(model=spec.task.model, dataset=spec.task.dataset, val_fraction=spec.task.val_fraction,
                       seed=spec.training_seed(), params=dict(spec.task.params), device=device,
                       data=spec.task.data, **data_access, **params)


def _params_in_one_write(storage: Any) -> Any:
    """The storage's batched parameter writes where it has them (`studies.storage.ThrottledReads`)."""
    batched = getattr(storage, "params_in_one_write", None)
    return batched() if batched is not None else contextlib.nullcontext()


class TrialDiagnoser:
    """The epochs of one trial so far, in memory, and the diagnosis of that history.

    A diagnosis that fails (bad history, a bug in a detector) is logged and skipped: it never
    fails the trial. `last` is the latest diagnosis that succeeded, with the epoch it saw.
    A run longer than the diagnosis accepts (`MAX_EPOCHS`) is diagnosed on its latest epochs.

    `context` (`studies.trial_context`, built once at the trial's start) goes into every epoch's
    history as it is. Should the diagnosis refuse it (a context the history contradicts), it is
    dropped for the rest of the trial, and the history diagnosed without it.
    """

    def __init__(self, spec: StudySpec, trial_number: int, max_epochs: int,
                 context: dict[str, Any] | None = None):
        self.trial_number = trial_number
        self.objective = {"metric": spec.objective.metric, "direction": spec.objective.direction}
        self.max_epochs = max_epochs
        self.context = context
        # A plug-in's own objective (`val_mae`) rides along, so its level can be read against the peers'.
        self._keys = HISTORY_KEYS + (() if spec.objective.metric in HISTORY_KEYS else (spec.objective.metric,))
        self.epochs: deque[dict[str, Any]] = deque(maxlen=MAX_EPOCHS)
        self.last: tuple[int, dict[str, Any]] | None = None

    def history(self) -> dict[str, Any]:
        """The diagnosis input of the epochs so far (the contract's history), with the trial's context."""
        history: dict[str, Any] = {"objective": self.objective, "max_epochs": self.max_epochs,
                                   "epochs": list(self.epochs)}
        if self.context is not None:
            history["context"] = self.context
        return history

    def add_epoch(self, metrics: dict[str, Any]) -> dict[str, Any] | None:
        """Append one epoch and diagnose the history so far; None when the diagnosis failed."""
        epoch = int(metrics["epoch"])
        self.epochs.append({key: metrics.get(key) for key in self._keys})
        try:
            try:
                result = diagnose(self.history()).to_dict()
            except HistoryError as exc:
                if self.context is None or not any(p.startswith("context") for p in exc.problems):
                    raise
                log.warning("trial %d: its diagnosis context is refused, diagnosed without it: %s",
                            self.trial_number, exc)
                self.context = None
                result = diagnose(self.history()).to_dict()
        except HistoryError as exc:
            log.warning("trial %d: no diagnosis at epoch %d: %s", self.trial_number, epoch, exc)
            return None
        except Exception:
            log.exception("trial %d: the diagnosis failed at epoch %d", self.trial_number, epoch)
            return None
        self.last = (epoch, result)
        return result

    def losses(self, key: str | None = None) -> list[float | None]:
        """`key`'s values by epoch; by default the loss the verdicts read (`History.loss`): validation
        where measured, else training."""
        if key is None:
            measured = any(v is not None and math.isfinite(v) for v in (e.get("val_loss") for e in self.epochs))
            key = "val_loss" if measured else "train_loss"
        return [e.get(key) for e in self.epochs]

    def save_final(self, engine: Engine, study_id: int, trial: optuna.Trial) -> None:
        """Store the last diagnosis with `final=True` (none when no epoch was diagnosed) and the
        trial's optuna-dashboard note from it, in one transaction. Should that fail, the diagnosis
        alone is stored: the trial's own outcome matters more than either, so nothing here raises."""

        def diagnosis(session: Session) -> None:
            if self.last is not None:
                epoch, result = self.last
                repo.save_diagnosis(session, study_id, trial._trial_id, self.trial_number, epoch, result, final=True)

        def both(session: Session) -> None:
            diagnosis(session)
            write_trial_note(session, trial, self.last)

        what = f"trial {self.trial_number}: storing its final diagnosis"
        try:
            retry_unit_of_work(engine, both, what=f"{what} and dashboard note")
            return
        except Exception:
            log.exception("trial %d: could not store the final diagnosis with the dashboard note", self.trial_number)
        try:
            retry_unit_of_work(engine, diagnosis, what=what)
        except Exception:
            log.exception("trial %d: could not store the final diagnosis", self.trial_number)
