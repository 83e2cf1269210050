"""Reruns of dead trial attempts, on a real storage: budget, bookkeeping, exactly n_trials.

Trials are started with `study.ask()` here, in-process, as a slot process would; the
subprocess tests in test_crash_safety.py kill real workers.
"""

from __future__ import annotations

import time
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from conftest import tiny_spec
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.settings import Settings
from converge.studies.lifecycle import submit_study
from converge.studies.retries import CRASHED, INTERRUPTED, settle_dead_attempt
from converge.studies.spec import StudySpec
from converge.studies.storage import storage_for


def _start(settings: Settings, name: str, **overrides: object) -> optuna.Study:
    submit_study(settings, StudySpec.model_validate(tiny_spec(name, **overrides)))
    return optuna.load_study(study_name=name, storage=storage_for(settings))


def _ask(settings: Settings, study: optuna.Study) -> optuna.Trial:
    """Claim a slot and start its trial, as a worker's slot process does."""
    with session_scope(get_engine(settings.database_url)) as session:
        assert repo.claim_trial_slot(session, study.study_name) is not None
    trial = study.ask()
    trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    return trial


def _settle(settings: Settings, study: optuna.Study, trial: optuna.Trial, reason: str = CRASHED) -> int | None:
    return settle_dead_attempt(storage_for(settings), get_engine(settings.database_url), study.study_name,
                               trial._trial_id, reason, "trial process died (exit code -9)")


def _finish(settings: Settings, name: str) -> str | None:
    with session_scope(get_engine(settings.database_url)) as session:
        return repo.finish_study_if_complete(session, repo.get_study(session, name).id)


def test_a_dead_attempt_is_rerun_with_its_parameters_and_linked_both_ways(settings: Settings) -> None:
    study = _start(settings, "rerun", n_trials=1)
    first = _ask(settings, study)
    assert _settle(settings, study, first) == 1

    attempt, retry = study.get_trials(deepcopy=False)
    assert attempt.state == TrialState.FAIL
    assert attempt.user_attrs["error"] == "trial process died (exit code -9); rerun as trial 1"
    assert retry.state == TrialState.WAITING and retry.params == attempt.params
    assert retry.user_attrs == {"converge_retry_of": 0, "converge_failures": 1}
    with session_scope(get_engine(settings.database_url)) as session:
        study_row = repo.get_study(session, "rerun")
        assert study_row.n_claimed == 0  # the slot is free for the rerun
        row = repo.get_retry(session, study_row.id, 0)
        assert (row.retry_number, row.reason, row.failures) == (1, CRASHED, 1)
    assert _finish(settings, "rerun") is None  # the failed attempt is not one of the n_trials

    rerun = _ask(settings, study)  # the next claim runs the waiting copy, same parameters
    assert rerun.number == 1 and rerun.params == attempt.params
    study.tell(rerun, 0.5)
    assert _finish(settings, "rerun") == "done"


def test_crashes_are_rerun_up_to_the_spec_retries_then_the_failure_counts(settings: Settings) -> None:
    study = _start(settings, "budget", n_trials=1, retries=2)
    assert _settle(settings, study, _ask(settings, study)) == 1
    assert _settle(settings, study, _ask(settings, study)) == 2
    third = _ask(settings, study)
    assert _settle(settings, study, third) is None
    assert study.get_trials(deepcopy=False)[2].user_attrs["error"] == "trial process died (exit code -9)"
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.FAIL] * 3
    with session_scope(get_engine(settings.database_url)) as session:
        assert repo.get_study(session, "budget").n_claimed == 1
    assert _finish(settings, "budget") == "failed"  # three attempts, one trial, and it failed


def test_interruptions_are_always_rerun_and_count_no_failure(settings: Settings) -> None:
    study = _start(settings, "interrupted", n_trials=1, retries=0)
    for expected in (1, 2, 3):
        assert _settle(settings, study, _ask(settings, study), INTERRUPTED) == expected
    assert study.get_trials(deepcopy=False)[-1].user_attrs["converge_failures"] == 0
    assert _settle(settings, study, _ask(settings, study), CRASHED) is None  # retries: 0


def test_settling_twice_or_after_the_trial_ended_changes_nothing(settings: Settings) -> None:
    study = _start(settings, "twice", n_trials=2)
    trial = _ask(settings, study)
    assert _settle(settings, study, trial) == 1
    assert _settle(settings, study, trial) is None  # a second process finds the same dead attempt
    finished = _ask(settings, study)
    study.tell(finished, 0.1)
    assert _settle(settings, study, finished) is None  # it ended before its process died
    assert len(study.get_trials(deepcopy=False)) == 2
    with session_scope(get_engine(settings.database_url)) as session:
        assert repo.retried_attempts(session, repo.get_study(session, "twice").id) == 1


def test_a_cancelled_study_reruns_nothing(settings: Settings) -> None:
    study = _start(settings, "cancelled", n_trials=2)
    trial = _ask(settings, study)
    with session_scope(get_engine(settings.database_url)) as session:
        repo.cancel_study(session, "cancelled")
    assert _settle(settings, study, trial) is None
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.FAIL]


def test_a_trial_whose_heartbeat_stopped_is_failed_and_rerun_by_the_stale_check(settings: Settings) -> None:
    study = _start(settings, "stale", n_trials=1)
    with session_scope(get_engine(settings.database_url)) as session:
        repo.claim_trial_slot(session, "stale")
    trial = study.ask()
    study._storage.record_heartbeat(trial._trial_id)  # then silence, as if its machine died
    time.sleep(settings.grace_period_s + 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    attempt, retry = study.get_trials(deepcopy=False)
    assert attempt.state == TrialState.FAIL and retry.state == TrialState.WAITING
    with session_scope(get_engine(settings.database_url)) as session:
        assert repo.get_retry(session, repo.get_study(session, "stale").id, 0).reason == "stale"


@pytest.mark.parametrize("retries", [-1, 11])
def test_the_retry_limit_is_validated(retries: int) -> None:
    with pytest.raises(ValueError, match="retries"):
        StudySpec.model_validate(tiny_spec("bad", retries=retries))
