"""Rerun a trial whose process died, or whose worker shut down, as a new trial with its parameters.

Optuna cannot put a trial back in its queue (a finished trial is immutable), so the attempt
stays a failed trial with its partial metrics and diagnosis, and a WAITING copy of its
parameters is added, which the study's next claimed slot runs (Optuna hands out waiting trials
first). A row in `converge_trial_retries` links the two, gives the attempt's slot back and keeps
the attempt out of the study's `n_trials`: exactly `n_trials` trials finish, retries included.

A crash is the trial's fault only maybe (an OOM, a driver error), so it is rerun up to the spec's
`retries` times; an interruption by a worker's shutdown always is, and counts no failure.
The steps run in an order that is safe to stop anywhere: copy added, then row and slot in one
transaction, then the attempt failed. Another process that finds the same attempt stops at the row.
"""

from __future__ import annotations

import logging

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import Engine

from converge.core.db import repo
from converge.core.db.engine import session_scope
from converge.studies.spec import StudySpec

log = logging.getLogger("converge.retries")

CRASHED = "crashed"  # its process died (killed, out of memory); seen by its worker
STALE = "stale"  # its heartbeat stopped: the whole worker or machine died; seen by anyone
INTERRUPTED = "interrupted"  # its worker was asked to stop (SIGTERM) and requeued it

FAILURES_ATTR = "converge_failures"
RETRY_OF_ATTR = "converge_retry_of"


def rerun(storage: optuna.storages.BaseStorage, engine: Engine, study_name: str, trial: FrozenTrial,
          reason: str) -> int | None:
    """Add the WAITING copy of `trial` and record it; the number of the copy, or None when not rerun.

    Not rerun: the spec's retries are used up, or another process already recorded this attempt.
    The caller fails the attempt itself (if it is not failed yet).
    """
    with session_scope(engine) as session:
        study = repo.get_study(session, study_name)
        if repo.get_retry(session, study.id, trial.number) is not None:
            return None
        if study.state not in ("queued", "running"):
            return None  # cancelled or ended: nothing more of it runs
        allowed = StudySpec.model_validate(study.spec).retries
    failures = int(trial.user_attrs.get(FAILURES_ATTR, 0)) + (0 if reason == INTERRUPTED else 1)
    if failures > allowed:
        log.warning("trial %d of %s: not rerun, its %d retries are used up", trial.number, study_name, allowed)
        return None

    history = [*trial.system_attrs.get("retry_history", []), trial.number]  # Optuna's own retry attrs
    copy = optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={RETRY_OF_ATTR: trial.number, FAILURES_ATTR: failures},
        system_attrs={"failed_trial": history[0], "retry_history": history},
    )
    copy_id = storage.create_new_trial(storage.get_study_id_from_name(study_name), template_trial=copy)
    copy_number = storage.get_trial_number_from_id(copy_id)
    with session_scope(engine) as session:
        if not repo.record_retry(session, study.id, trial.number, trial._trial_id, copy_number, reason, failures):
            storage.set_trial_state_values(copy_id, TrialState.FAIL)  # lost a race: the copy must not run
            return None
    log.info("trial %d of %s (%s) is rerun as trial %d", trial.number, study_name, reason, copy_number)
    return copy_number


def settle_dead_attempt(storage: optuna.storages.BaseStorage, engine: Engine, study_name: str, trial_id: int,
                        reason: str, cause: str) -> int | None:
    """A trial's process is gone: rerun the trial if it may be, and fail the attempt if still RUNNING.

    `cause` becomes the attempt's error. Returns the number of the rerun, or None.
    """
    trial = storage.get_trial(trial_id)
    if trial.state != TrialState.RUNNING:
        return None  # it ended before its process did
    retry_number = rerun(storage, engine, study_name, trial, reason)
    note = f"; rerun as trial {retry_number}" if retry_number is not None else ""
    try:
        storage.set_trial_user_attr(trial_id, "error", f"{cause}{note}")
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return retry_number  # failed by a stale-trial check at the same moment
    _mark_final(engine, study_name, trial)
    return retry_number


def rerun_stale_trial(engine: Engine, study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's `heartbeat_stale_trial_callback`: it has failed a trial that went silent; rerun it."""
    try:
        rerun(study._storage, engine, study.study_name, trial, STALE)
        _mark_final(engine, study.study_name, trial)
    except Exception:  # stale checks run inside other trials' optimize(): never break those
        log.exception("trial %d of %s: could not rerun it", trial.number, study.study_name)


def _mark_final(engine: Engine, study_name: str, trial: FrozenTrial) -> None:
    """The attempt's latest diagnosis is its last: no process of it will write again."""
    with session_scope(engine) as session:
        repo.mark_diagnosis_final(session, repo.get_study(session, study_name).id, trial.number)
