"""A study's lifecycle from outside the workers: submitting (one Optuna study plus Converge's row,
both or neither) and cancelling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna

from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.db.models import Study
from converge.core.errors import Conflict
from converge.core.settings import Settings
from converge.studies import policy
from converge.studies.spec import StudySpec
from converge.studies.storage import storage_for


def submit_study(settings: Settings, spec: StudySpec, enqueue: Sequence[dict[str, Any]] = ()) -> Study:
    """Create the Optuna study, then the queued Converge row that workers claim from.

    Optuna's study comes first because on SQLite a write transaction held open across
    Optuna's own connection would wait on itself; if Converge's insert then fails, the
    Optuna study is removed again. `enqueue`: parameter sets queued as the study's first
    trials (a scheduled sweep's warm start), before any worker can claim a trial of it.
    """
    policy.check_spec(spec, settings)  # the operator's plug-in modules and data folder, before anything is stored
    storage = storage_for(settings)
    try:
        study_id = storage.create_new_study(
            [optuna.study.StudyDirection.MAXIMIZE if spec.objective.direction == "maximize"
             else optuna.study.StudyDirection.MINIMIZE],
            study_name=spec.name,
        )
    except optuna.exceptions.DuplicatedStudyError:
        raise Conflict(f"a study named {spec.name!r} already exists") from None
    try:
        if enqueue:
            study = optuna.load_study(study_name=spec.name, storage=storage)
            for params in enqueue:
                study.enqueue_trial(dict(params), user_attrs={"converge_warm_start": True})
        with session_scope(get_engine(settings.database_url)) as session:
            return repo.add_study(session, spec.name, spec.model_dump(mode="json"), spec.n_trials)
    except BaseException:
        storage.delete_study(study_id)
        raise


def cancel_study(settings: Settings, name: str) -> None:
    """Cancel a queued or running study, committed before returning: workers claim none of its
    trials from now on, and its running trials stop at their next epoch boundary (they read the
    study's state every epoch) and are failed with the reason. NotFound / Conflict as `repo`."""
    with session_scope(get_engine(settings.database_url)) as session:
        repo.cancel_study(session, name)
