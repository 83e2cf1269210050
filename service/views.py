"""Read models: Converge's rows and Optuna's trials assembled into API/CLI responses."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.orm import Session

from service.api.schemas import (
    BestTrial,
    EpochOut,
    MetricsOut,
    ObjectiveOut,
    StudyOut,
    TrialCounts,
    TrialDetail,
    TrialOut,
)
from service.db import repo
from service.db.errors import NotFound
from service.db.models import Study

_STATE_NAMES = {
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
}


def _counts(counter: Counter[str]) -> TrialCounts:
    return TrialCounts(**{_STATE_NAMES[TrialState[state]]: n for state, n in counter.items()})


def _best(storage: optuna.storages.BaseStorage, name: str) -> BestTrial | None:
    try:
        best = storage.get_best_trial(storage.get_study_id_from_name(name))
    except (ValueError, KeyError):  # no complete trial yet, or no Optuna study
        return None
    return BestTrial(number=best.number, value=best.value, params=best.params)


def study_out(study: Study, counts: Counter[str], storage: optuna.storages.BaseStorage) -> StudyOut:
    return StudyOut(
        name=study.name, state=study.state, detail=study.detail, n_trials=study.n_trials,
        trials=_counts(counts), best=_best(storage, study.name), created_at=study.created_at,
        started_at=study.started_at, finished_at=study.finished_at, spec=study.spec,
    )


def list_study_outs(session: Session, storage: optuna.storages.BaseStorage,
                    state: str | None = None) -> list[StudyOut]:
    studies = repo.list_studies(session, state=state)
    counts = repo.trial_state_counts(session, [s.name for s in studies])
    return [study_out(s, counts[s.name], storage) for s in studies]


def get_study_out(session: Session, storage: optuna.storages.BaseStorage, name: str) -> StudyOut:
    study = repo.get_study(session, name)
    return study_out(study, repo.trial_state_counts(session, [name])[name], storage)


def _optuna_trials(storage: optuna.storages.BaseStorage, name: str) -> list[FrozenTrial]:
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        raise NotFound(f"study {name!r} has no Optuna study in this database") from None
    return storage.get_all_trials(study_id, deepcopy=False)


def _aware(value: datetime | None) -> datetime | None:
    """Optuna hands out naive local times; the API speaks UTC with an offset."""
    return value.astimezone(timezone.utc) if value is not None else None


def _trial_fields(trial: FrozenTrial, epochs: int) -> dict:
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    return dict(
        number=trial.number, state=_STATE_NAMES[trial.state], params=trial.params, value=trial.value,
        datetime_start=_aware(trial.datetime_start), datetime_complete=_aware(trial.datetime_complete),
        duration_s=duration, epochs_recorded=epochs, error=trial.user_attrs.get("error"),
    )


def list_trial_outs(session: Session, storage: optuna.storages.BaseStorage, name: str) -> list[TrialOut]:
    study = repo.get_study(session, name)
    epochs = repo.epochs_recorded(session, study.id)
    return [TrialOut(**_trial_fields(t, epochs.get(t.number, 0))) for t in _optuna_trials(storage, name)]


def _find_trial(storage: optuna.storages.BaseStorage, name: str, number: int) -> FrozenTrial:
    for trial in _optuna_trials(storage, name):
        if trial.number == number:
            return trial
    raise NotFound(f"study {name!r} has no trial {number}")


def get_trial_detail(session: Session, storage: optuna.storages.BaseStorage, name: str,
                     number: int) -> TrialDetail:
    study = repo.get_study(session, name)
    trial = _find_trial(storage, name, number)
    epochs = repo.epochs_recorded(session, study.id).get(number, 0)
    return TrialDetail(**_trial_fields(trial, epochs), intermediate_values=dict(trial.intermediate_values),
                       user_attrs=trial.user_attrs)


def get_trial_metrics(session: Session, storage: optuna.storages.BaseStorage, name: str,
                      number: int) -> MetricsOut:
    study = repo.get_study(session, name)
    trial = _find_trial(storage, name, number)
    rows = repo.trial_metrics(session, study.id, number)
    objective = study.spec["objective"]
    max_epochs = int(trial.params.get("epochs", len(rows)))
    return MetricsOut(study=name, trial=number, objective=ObjectiveOut(**objective), max_epochs=max_epochs,
                      epochs=[EpochOut(**repo.metric_row(r)) for r in rows])
