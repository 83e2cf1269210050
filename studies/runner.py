"""Run one claimed trial slot: load the Optuna study and optimize exactly one trial.

Called in a worker's child process (one trial per process: a crash takes down only its
own trial) and in-process by `converge sweep`.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any

import optuna

from service.db import repo
from service.db.engine import get_engine, session_scope
from service.db.repo import ClaimedSlot
from service.settings import Settings
from studies.objective import EpochListener, Objective
from studies.registry import SHARED_SEED_SAMPLERS, build_pruner, build_sampler
from studies.search_space import grid
from studies.spec import StudySpec
from studies.storage import storage_for

log = logging.getLogger("converge.runner")


class StudySetupError(RuntimeError):
    """The study cannot run at all (its spec no longer loads, its sampler cannot be built)."""


def sampler_seed(spec: StudySpec, slot: int) -> int | None:
    """A distinct seed per trial slot: each trial runs in a fresh process, and a shared seed
    would make every process draw the same 'random' startup points."""
    seed = spec.sampler.seed
    if seed is None or spec.sampler.name in SHARED_SEED_SAMPLERS:
        return seed
    return seed * 100_003 + slot


def load_study(settings: Settings, spec: StudySpec, slot: int) -> optuna.Study:
    sampler = build_sampler(spec.sampler.name, sampler_seed(spec, slot),
                            grid=grid(spec.search_space, spec.sampler.grid_points))
    pruner = build_pruner(spec.pruner.name, spec.search_space.max_epochs())
    return optuna.load_study(study_name=spec.name, storage=storage_for(settings), sampler=sampler, pruner=pruner)


def run_slot(settings: Settings, slot: ClaimedSlot, *, device: str = "auto",
             on_trial_start: Callable[[optuna.Trial], None] | None = None,
             on_epoch: EpochListener | None = None) -> optuna.trial.FrozenTrial:
    """Run the slot's one trial to its end (complete, pruned or failed) and return it."""
    try:
        spec = StudySpec.model_validate(slot.spec)
        study = load_study(settings, spec, slot.slot)
    except Exception as exc:
        raise StudySetupError(f"{type(exc).__name__}: {exc}") from exc
    started: list[int] = []

    def start(trial: optuna.Trial) -> None:
        started.append(trial._trial_id)
        trial.set_user_attr("converge_slot", slot.slot)
        if on_trial_start is not None:
            on_trial_start(trial)

    objective = Objective(spec, slot.study_id, get_engine(settings.database_url), device=device,
                          on_trial_start=start, on_epoch=on_epoch)
    study.optimize(objective, n_trials=1, catch=(Exception,))
    if not started:  # optimize() failed before calling the objective: nothing ran
        raise RuntimeError(f"study {slot.study_name}: Optuna did not start a trial")
    return study._storage.get_trial(started[0])


def child_main(settings_data: dict[str, Any], slot: ClaimedSlot, device: str, torch_threads: int,
               trial_id: Any) -> None:
    """Entry point of a worker's child process (spawned: nothing inherited but arguments)."""
    import os
    import sys

    settings = Settings.model_validate(settings_data)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [slot {device}] %(name)s: %(message)s")
    if torch_threads > 0:
        import torch

        torch.set_num_threads(torch_threads)

    def remember_trial(trial: optuna.Trial) -> None:
        trial.set_user_attr("converge_worker_pid", os.getpid())
        trial_id.value = trial._trial_id  # read by the parent if this process dies

    try:
        run_slot(settings, slot, device=device, on_trial_start=remember_trial)
    except StudySetupError as exc:
        log.error("study %s cannot run: %s", slot.study_name, exc)
        with session_scope(get_engine(settings.database_url)) as session:
            repo.fail_study(session, slot.study_id, f"study setup failed: {exc}")
        sys.exit(EXIT_SETUP_FAILED)
    except Exception:
        traceback.print_exc()
        sys.exit(1)


EXIT_SETUP_FAILED = 3
