"""Read models: Converge's rows and Optuna's trials assembled into API/CLI responses."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from typing import Any

import optuna
from optuna.trial import TrialState
from sqlalchemy.orm import Session

from converge.core.db import repo
from converge.core.db.models import Study, TrialRepair
from converge.core.errors import NotFound
from converge.service import trial_pages
from converge.service.schemas import (
    BestTrial,
    DiagnosisOut,
    RepairOutcome,
    StudyDiagnosisOut,
    StudyOut,
    TrialCounts,
    TrialDiagnosisOut,
    TrialOut,
    WorkerOut,
    WorkerTrialOut,
)
from converge.studies.diagnosis import diagnose
from converge.studies.repair import repair_summary
from converge.studies.spec import StudySpec
from converge.studies.storage import trial_by_number
from converge.studies.study_diagnosis import TrialRecord, diagnose_study

_STATE_NAMES = {
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
}


def _counts(counter: Counter[str], rerun: int) -> TrialCounts:
    return TrialCounts(**{_STATE_NAMES[TrialState[state]]: n for state, n in counter.items()}, rerun=rerun)


def _best(storage: optuna.storages.BaseStorage, name: str) -> BestTrial | None:
    try:
        best = storage.get_best_trial(storage.get_study_id_from_name(name))
    except (ValueError, KeyError):  # no complete trial yet, or no Optuna study
        return None
    return BestTrial(number=best.number, value=best.value, params=best.params)


def study_out(study: Study, counts: Counter[str], rerun: int, storage: optuna.storages.BaseStorage) -> StudyOut:
    return StudyOut(
        name=study.name, state=study.state, detail=study.detail, n_trials=study.n_trials,
        trials=_counts(counts, rerun), best=_best(storage, study.name),
        created_at=study.created_at,
        started_at=study.started_at, finished_at=study.finished_at, spec=study.spec,
    )


def list_study_outs(session: Session, storage: optuna.storages.BaseStorage,
                    state: str | None = None) -> list[StudyOut]:
    studies = repo.list_studies(session, state=state)
    counts = repo.trial_state_counts(session, [s.name for s in studies])
    reruns = repo.retried_attempts_by_study(session, [s.id for s in studies])
    return [study_out(s, counts[s.name], reruns.get(s.id, 0), storage) for s in studies]


def get_study_out(session: Session, storage: optuna.storages.BaseStorage, name: str) -> StudyOut:
    study = repo.get_study(session, name)
    return study_out(study, repo.trial_state_counts(session, [name])[name], repo.retried_attempts(session, study.id),
                     storage)


def list_trial_outs(session: Session, name: str, verdict: str | None = None) -> list[TrialOut]:
    """Every trial of the study in order (read a page of 1,000 at a time); with `verdict`, only those whose
    latest diagnosis says so. For the CLI and the study diagnosis, which need them all; the API pages."""
    return trial_pages.list_trial_outs(session, name, verdict)


def get_study_diagnosis(session: Session, name: str) -> StudyDiagnosisOut:
    """The whole study's diagnosis, from one read of its trials; NotFound for an unknown study."""
    study = repo.get_study(session, name)
    spec, trials = study.spec, list_trial_outs(session, name)
    session.commit()  # the connection goes back to the pool: the diagnosis itself can take seconds of CPU
    return study_diagnosis_out(spec, trials)


def study_diagnosis_out(spec: dict[str, Any], trials: list[TrialOut]) -> StudyDiagnosisOut:
    """Diagnose a study from its trials as listed (the CLI has them already): every trial counts
    but failed attempts that were rerun, which say nothing of their hyperparameters."""
    counted = [t for t in trials if t.rerun_as is None]
    records = [TrialRecord(number=t.number, state=t.state, params=t.params, value=t.value, verdict=t.verdict)
               for t in counted]
    diagnosis = diagnose_study(StudySpec.model_validate(spec), records)
    return StudyDiagnosisOut.model_validate({**diagnosis.to_dict(), "rerun_attempts": len(trials) - len(counted)})


def get_trial_diagnosis(session: Session, storage: optuna.storages.BaseStorage, name: str,
                        number: int) -> TrialDiagnosisOut:
    """The trial's latest stored diagnosis; NotFound for an unknown study or trial, or none stored yet."""
    study = repo.get_study(session, name)
    row = repo.get_diagnosis(session, study.id, number)
    if row is None:
        trial_by_number(storage, name, number)  # an unknown trial is its own 404
        if repo.epochs_recorded(session, study.id).get(number, 0):
            raise NotFound(f"trial {number} has epochs recorded but no diagnosis: it failed on every epoch "
                           "(the worker's log says why)")
        raise NotFound(f"trial {number} has no epochs recorded yet, so no diagnosis")
    repair = repo.get_repair(session, study.id, number)
    return TrialDiagnosisOut.model_validate({**row.diagnosis, "study": name, "trial": number, "epoch": row.epoch,
                                             "final": row.final, "updated_at": row.updated_at,
                                             "repair": _repair_outcome(session, storage, name, study.id, repair)})


def _repair_outcome(session: Session, storage: optuna.storages.BaseStorage, name: str, study_id: int,
                    repair: TrialRepair | None) -> RepairOutcome | None:
    """How a repair went: its trial's state and latest verdict (healthy or not)."""
    if repair is None:
        return None
    trial = trial_by_number(storage, name, repair.repair_number)
    diagnosis = repo.get_diagnosis(session, study_id, repair.repair_number)
    return RepairOutcome(**repair_summary(repair), state=_STATE_NAMES[trial.state],
                         verdict=diagnosis.verdict if diagnosis is not None else None,
                         healthy=diagnosis.healthy if diagnosis is not None else None)


def diagnose_history(history: Any) -> DiagnosisOut:
    """Diagnose a history in the contract's format; `HistoryError` (every problem listed) when it is invalid."""
    return DiagnosisOut.model_validate(diagnose(history).to_dict())


def list_worker_outs(session: Session, grace_period_s: float) -> list[WorkerOut]:
    """Every registered worker with the trials it runs now (by study and trial number)."""
    workers = repo.list_workers(session)
    trial_ids = [t["trial_id"] for w in workers for t in (w.current_trials or []) if t.get("trial_id") is not None]
    numbers = repo.trial_numbers(session, trial_ids)
    now = datetime.now(timezone.utc)
    out = []
    for w in workers:
        fresh = (now - w.last_heartbeat).total_seconds() <= grace_period_s
        trials = [WorkerTrialOut(study=t["study"], trial=numbers.get(t.get("trial_id")), device=t["device"],
                                 slot=t["slot"]) for t in (w.current_trials or [])]
        out.append(WorkerOut(id=w.id, host=w.host, pid=w.pid, devices=w.devices, slots=w.slots, state=w.state,
                             alive=w.state != "stopped" and fresh, current_trials=trials, started_at=w.started_at,
                             last_heartbeat=w.last_heartbeat))
    return out
