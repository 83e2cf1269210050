"""`converge sweep`: one study to completion in this process, with a progress bar."""

from __future__ import annotations

import math
from typing import Any

import optuna
from tqdm import tqdm

from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.errors import Conflict
from converge.core.settings import Settings
from converge.studies.lifecycle import submit_study
from converge.studies.runner import StudySetupError, run_slot
from converge.studies.spec import StudySpec


def start_or_resume(settings: Settings, spec: StudySpec) -> None:
    """Submit the study, or resume it when a study of that name has the very same spec."""
    try:
        submit_study(settings, spec)
    except Conflict:
        with session_scope(get_engine(settings.database_url)) as session:
            existing = repo.get_study(session, spec.name)
            if existing.spec != spec.model_dump(mode="json"):
                raise Conflict(f"a study named {spec.name!r} already exists with a different spec; "
                               "choose another name") from None
            if existing.state not in ("queued", "running"):
                raise Conflict(f"study {spec.name!r} already exists and is {existing.state}") from None


def run_sweep(settings: Settings, spec: StudySpec, *, progress: bool = True) -> str | None:
    """Run every remaining trial slot of the study here, one after another.

    Returns the study's final state (None if trials remain, e.g. claimed by a worker elsewhere).
    """
    start_or_resume(settings, spec)
    engine = get_engine(settings.database_url)
    bar = tqdm(total=spec.n_trials, unit="trial", disable=not progress, dynamic_ncols=True)
    best: list[float] = []

    def show_epoch(trial: optuna.Trial, metrics: dict[str, Any]) -> None:
        value = metrics.get(spec.objective.metric)
        shown = f"{value:.4g}" if value is not None and math.isfinite(value) else str(value)
        postfix = {"trial": trial.number, "epoch": metrics["epoch"] + 1, spec.objective.metric: shown}
        if best:
            postfix["best"] = f"{best[0]:.4g}"
        bar.set_postfix(postfix, refresh=True)

    with bar:
        while True:
            with session_scope(engine) as session:
                slot = repo.claim_trial_slot(session, study_name=spec.name)
            if slot is None:
                break
            try:
                trial = run_slot(settings, slot, on_epoch=show_epoch)
            except StudySetupError as exc:  # e.g. the user's model does not import: the study cannot run
                with session_scope(engine) as session:
                    repo.fail_study(session, slot.study_id, f"study setup failed: {exc}")
                raise
            if trial is None:  # the database dropped it; it was failed and rerun, and the rerun is claimed next
                continue
            if trial.value is not None:
                better = max if spec.objective.direction == "maximize" else min
                best[:] = [better([trial.value, *best])]
            bar.update(1)
    with session_scope(engine) as session:
        return repo.finish_study_if_complete(session, repo.get_study(session, spec.name).id)

