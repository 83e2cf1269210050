"""Run one claimed trial slot: load the Optuna study and optimize exactly one trial.

Called in a worker's slot processes (one per slot, one trial at a time: a crash takes down
only its own trial) and in-process by `converge sweep`.
"""

from __future__ import annotations

import gc
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import optuna

from converge.core.db import repo
from converge.core.db.engine import describe_cause, get_engine, is_transient, retry_transient, session_scope
from converge.core.db.repo import ClaimedSlot
from converge.core.heap import freeze_startup_heap
from converge.core.settings import Settings
from converge.studies import checkpoints, plugin_check, policy
from converge.studies.objective import EpochListener, Objective, StorageLost
from converge.studies.registry import SHARED_SEED_SAMPLERS, build_pruner, build_sampler
from converge.studies.repair import auto_repair
from converge.studies.retries import CRASHED, settle_dead_attempt
from converge.studies.search_space import grid
from converge.studies.spec import StudySpec
from converge.studies.storage import ThrottledReads, storage_for

log = logging.getLogger("converge.runner")


class StudySetupError(RuntimeError):
    """The study cannot run at all (its spec no longer loads, its sampler cannot be built)."""


def sampler_seed(spec: StudySpec, slot: int) -> int | None:
    """A distinct seed per process, from the first trial slot it runs: a shared seed would make
    every slot process draw the same 'random' startup points."""
    seed = spec.sampler.seed
    if seed is None or spec.sampler.name in SHARED_SEED_SAMPLERS:
        return seed
    return (seed * 100_003 + slot) % 2**32  # samplers seed numpy, which takes 0..2**32-1


def load_study(settings: Settings, spec: StudySpec, slot: int) -> optuna.Study:
    sampler = build_sampler(spec.sampler.name, sampler_seed(spec, slot),
                            grid=grid(spec.search_space, spec.sampler.grid_points))
    pruner = build_pruner(spec.pruner.name, spec.search_space.max_epochs(), spec.pruner.base)
    storage = ThrottledReads(storage_for(settings), settings.trial_reads_max_age_s)
    return optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler, pruner=pruner)


# Studies a process has run trials of, kept for its life: see `study_for`.
_STUDIES: OrderedDict[tuple[str, int], optuna.Study] = OrderedDict()
_KEPT_STUDIES = 16


def study_for(settings: Settings, spec: StudySpec, claim: ClaimedSlot) -> optuna.Study:
    """The process's Optuna study object for the claim's study: loaded at its first trial here, then kept.

    A study loaded afresh for every trial reads every trial of the study again (Optuna's trial
    cache lives in the study's storage wrapper) and gives its sampler an empty memory (TPE
    recomputes its search space over all trials): costs that grow with the study. Kept, both
    read only what is new, and the sampler goes on with one random stream, seeded by the
    first trial slot this process ran. Keyed by Converge's study id, so a study deleted and
    created again under the same name is loaded anew.
    """
    key = (settings.database_url, claim.study_id)
    study = _STUDIES.pop(key, None) or load_study(settings, spec, claim.slot)
    _STUDIES[key] = study  # the most recently used last
    while len(_STUDIES) > _KEPT_STUDIES:
        _STUDIES.popitem(last=False)
    return study


def run_slot(settings: Settings, slot: ClaimedSlot, *, device: str = "auto",
             on_trial_start: Callable[[optuna.Trial], None] | None = None,
             on_epoch: EpochListener | None = None,
             should_stop: Callable[[], bool] | None = None,
             read_back: bool = True) -> optuna.trial.FrozenTrial | None:
    """Run the slot's one trial to its end (complete, pruned or failed) and return it as stored
    (None without `read_back`: a worker's slot needs nothing back, and the read is a few ms).

    A trial the database dropped (`StorageLost`, or Optuna's final write of its state refused) is
    settled like a crashed one once the database answers again, and None is returned; should it stay
    away past `RETRY_WITHIN_S`, its error is raised and the trial is left RUNNING for the worker (or
    the next stale-trial check) to settle.
    """
    try:
        spec = StudySpec.model_validate(slot.spec)
        study = study_for(settings, spec, slot)
        store = checkpoints.artifact_store(settings) if spec.kept_checkpoints() > 0 else None
    except Exception as exc:
        if is_transient(exc):
            raise  # the database, not the study: the worker gives the slot back and tries again
        raise StudySetupError(f"{type(exc).__name__}: {exc}") from exc
    try:
        plugin_check.check_before_running(spec, settings)  # before anything of the study is imported or opened
    except policy.PolicyError as exc:
        raise StudySetupError(f"refused by this worker's settings: {exc}") from exc
    _check_plugin_once(settings, spec, slot, study)
    started: list[int] = []
    numbers: list[int] = []

    def start(trial: optuna.Trial) -> None:
        started.append(trial._trial_id)
        numbers.append(trial.number)
        if on_trial_start is not None:
            on_trial_start(trial)

    objective = Objective(spec, slot.study_id, get_engine(settings.database_url), device=device,
                          on_trial_start=start, on_epoch=on_epoch, should_stop=should_stop, artifact_store=store,
                          settings=settings)
    try:
        study.optimize(objective, n_trials=1, catch=(Exception,))
    except StorageLost as lost:
        settle_lost_attempt(settings, study, slot.study_name, lost)
        return None
    except Exception as exc:
        # Optuna's final write of the trial's state (its `tell`) refused, the trial left RUNNING; Optuna
        # then raises an AssertionError of its own over the database's error.
        cause = _database_failure(exc)
        if cause is None or not started:
            raise
        settle_lost_attempt(settings, study, slot.study_name, StorageLost(started[0], numbers[0],
                                                                          describe_cause(cause)))
        return None
    if not started:  # optimize() failed before calling the objective: nothing ran
        raise RuntimeError(f"study {slot.study_name}: Optuna did not start a trial")
    if objective.uploaded_checkpoint:  # it is among the kept ones now: drop the checkpoints it displaced
        try:
            checkpoints.retain(storage_for(settings), store, spec.name, spec.objective.direction,
                               spec.kept_checkpoints())
        except Exception:
            log.exception("study %s: could not remove the checkpoints no longer kept", spec.name)
    if not read_back and spec.auto_repair is None:
        return None
    trial = study._storage.get_trial(started[0])
    auto_repair(settings, spec, trial)  # before the slot is reported done: the study must not end first
    return trial


def settle_lost_attempt(settings: Settings, study: optuna.Study, study_name: str, lost: StorageLost) -> int | None:
    """Fail a trial the database dropped and rerun it, as the worker does for one whose process died
    (`CRASHED`: it counts against the spec's `retries`), waiting up to `RETRY_WITHIN_S` for the database.
    Through the study's own storage, so this process's cached copy of the trial ends too. The rerun's
    number, or None."""
    cause = f"the database became unavailable during the trial: {lost.cause}"
    log.warning("trial %d of %s: %s", lost.trial_number, study_name, cause)
    engine = get_engine(settings.database_url)
    return retry_transient(lambda: settle_dead_attempt(study._storage, engine, study_name, lost.trial_id, CRASHED,
                                                       cause),
                           what=f"trial {lost.trial_number} of {study_name}: settling it")


def _database_failure(exc: BaseException) -> BaseException | None:
    """The transient database error behind `exc` (along its causes and the errors it was raised over), or None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if is_transient(error):
            return error
        todo += [error.__cause__, error.__context__]
    return None


# Studies whose user model and data passed the dry run in this process (or in another, per the study's attribute).
_CHECKED: set[tuple[str, int]] = set()


def _check_plugin_once(settings: Settings, spec: StudySpec, claim: ClaimedSlot, study: optuna.Study) -> None:
    """Before a study's first trial here: dry-run a user's own model and data (`plugin_check`),
    unless a process has done so already (the study's `converge_plugin_checked` attribute).
    A failure is a StudySetupError: the study is failed with the cause and the path as its detail."""
    key = (settings.database_url, claim.study_id)
    if not spec.task.is_plugin or key in _CHECKED:
        return
    if plugin_check.CHECKED_ATTR not in study.user_attrs:
        try:
            outcome = plugin_check.check_task(spec, settings)
        except plugin_check.PluginCheckError as exc:
            raise StudySetupError(f"the dry run of the study's model and data failed: {exc}") from exc
        study.set_user_attr(plugin_check.CHECKED_ATTR, {"seconds": round(outcome.get("seconds", 0.0), 3),
                                                        "logged": sorted(outcome.get("metrics", {}))})
    _CHECKED.add(key)


# What a slot process answers for each claim it was handed.
TRIAL_ENDED = "ended"
SETUP_FAILED = "setup_failed"
TRIAL_ERROR = "error"
STORAGE_LOST = "storage_lost"  # the database dropped the trial and is still away: the worker settles it
NOT_STARTED = "not_started"  # asked to stop before the trial began: the slot goes back unused


def slot_main(settings_data: dict[str, Any], device: str, torch_threads: int, conn: Connection,
              trial_id: Any, stop: Any) -> None:
    """A worker slot's process (spawned: nothing inherited but arguments): run claims until told to stop.

    The parent sends a `ClaimedSlot` and gets one answer back; `None` ends the loop. `trial_id`
    (a shared value) holds the running trial's Optuna id, for the parent to fail and rerun it if
    this process dies; `stop` (an event) asks the running trial to end at its next epoch and be rerun.
    """
    settings = Settings.model_validate(settings_data)
    from converge.core.logs import configure

    configure(settings.log_format, text_format=f"%(asctime)s [slot {device}] %(name)s: %(message)s",
              component=f"slot {device}")
    frozen = prepare_slot_process(settings, torch_threads)
    log.info("slot process %d ready on %s: nice %d, %s torch thread(s), %d startup objects frozen", os.getpid(),
             device, os.nice(0), torch_threads or "default", frozen)
    remember_trial = trial_recorder(trial_id)
    while True:
        try:
            claim = conn.recv()
        except EOFError:  # the parent is gone
            return
        if claim is None:
            return
        trial_id.value = -1
        if stop.is_set():
            conn.send(NOT_STARTED)
            return
        conn.send(run_claim(settings, claim, device, remember_trial, stop.is_set))
        if stop.is_set():
            return  # asked to stop: the parent hands out nothing more


def prepare_slot_process(settings: Settings, torch_threads: int) -> int:
    """Once per slot process, before its first trial: torch and Lightning imported (not once per
    trial), torch's threads set, the CPU priority lowered by `slot_nice`, and everything loaded so
    far frozen out of the garbage collector's walks (`core.heap`: a full collection here took
    about 250 ms, in the middle of whichever trial was running); how many objects were frozen."""
    import torch

    from converge import trainers  # noqa: F401 - warm the import now, not in the first trial

    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    if settings.slot_nice > 0:
        os.nice(settings.slot_nice)
    return freeze_startup_heap()


def trial_recorder(trial_id: Any) -> Callable[[optuna.Trial], None]:
    """The slot's `on_trial_start`: the trial's id in the shared value the parent reads if this
    process dies, and this process's pid as a user attribute (written with the trial's params)."""

    def remember_trial(trial: optuna.Trial) -> None:
        trial_id.value = trial._trial_id
        trial.set_user_attr("converge_worker_pid", os.getpid())

    return remember_trial


def run_claim(settings: Settings, claim: ClaimedSlot, device: str,
              on_trial_start: Callable[[optuna.Trial], None], should_stop: Callable[[], bool]) -> str:
    """One claimed trial slot as a slot process runs it; the answer for the parent."""
    try:
        run_slot(settings, claim, device=device, on_trial_start=on_trial_start, should_stop=should_stop,
                 read_back=False)
    except StudySetupError as exc:
        log.error("study %s cannot run: %s", claim.study_name, exc)
        with session_scope(get_engine(settings.database_url)) as session:
            repo.fail_study(session, claim.study_id, f"study setup failed: {exc}")
        return SETUP_FAILED
    except Exception as exc:
        if is_transient(exc):
            log.error("study %s: the database is unavailable, the trial is left to the worker: %s", claim.study_name,
                      describe_cause(exc))
            return STORAGE_LOST
        log.exception("study %s: the trial slot failed", claim.study_name)
        return TRIAL_ERROR
    finally:
        _free_device_memory()
    return TRIAL_ENDED


def _free_device_memory() -> None:
    """A slot process lives for many trials: give the GPU memory of the last one back (a collection
    first, for tensors only cycles still hold). A CPU slot has no cache to give back: Python's own
    collections do."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()
