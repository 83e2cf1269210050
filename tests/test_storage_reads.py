"""ThrottledReads: a trial's reads of its study share one database read; a claim never misses a queued trial."""

from __future__ import annotations

from collections.abc import Callable

import optuna
import pytest
from sqlalchemy import event

from conftest import tiny_spec
from converge.core.settings import Settings
from converge.studies.lifecycle import submit_study
from converge.studies.spec import parse_spec
from converge.studies.storage import ThrottledReads, storage_for


def _statements(storage: optuna.storages.RDBStorage, wanted: Callable[[str], bool]) -> list[str]:
    """Every statement the storage's engine runs from now on that `wanted` picks."""
    seen: list[str] = []

    @event.listens_for(storage.engine, "before_cursor_execute")
    def count(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if wanted(statement):
            seen.append(statement)

    return seen


def _is_select(statement: str) -> bool:
    return statement.lstrip().upper().startswith("SELECT")


def _count_trial_reads(storage: optuna.storages.RDBStorage) -> list[str]:
    """Every SELECT on Optuna's trials table the storage's engine runs from now on."""
    return _statements(storage, lambda statement: _is_select(statement) and "FROM trials" in statement)


def _study(settings: Settings, name: str, max_age_s: float) -> tuple[optuna.Study, ThrottledReads]:
    submit_study(settings, parse_spec(tiny_spec(name)))
    throttled = ThrottledReads(storage_for(settings), max_age_s)
    return optuna.load_study(study_name=name, storage=throttled), throttled


def test_reads_within_the_window_reuse_the_last_one(settings: Settings) -> None:
    study, storage = _study(settings, "window", max_age_s=60)
    study.get_trials()
    reads = _count_trial_reads(storage_for(settings))
    for _ in range(5):
        study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert reads == []

    storage.max_age_s = 0  # no window: every call reads what is new
    study.get_trials()
    study.get_trials()
    assert len(reads) == 2


def test_a_claim_always_sees_a_trial_queued_elsewhere_a_moment_ago(settings: Settings) -> None:
    study, _ = _study(settings, "queued", max_age_s=60)
    assert study.get_trials() == []  # the window starts now: nothing queued yet
    elsewhere = optuna.load_study(study_name="queued", storage=storage_for(settings))
    elsewhere.enqueue_trial({"lr": 0.02})
    trial = study.ask()  # within the window, yet the waiting trial is found and run
    assert trial.number == 0 and trial.suggest_float("lr", 1e-3, 1e-1, log=True) == 0.02


def test_a_trials_suggestions_are_written_together_at_the_end_of_the_block(settings: Settings) -> None:
    study, storage = _study(settings, "batched", max_age_s=60)
    inserts = _statements(storage_for(settings), lambda statement: statement.lstrip().startswith(
        "INSERT INTO trial_params"))

    trial = study.ask()
    with storage.params_in_one_write():
        lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)
        batch_size = trial.suggest_categorical("batch_size", [64, 128])
        assert inserts == [] and trial.params == {"lr": lr, "batch_size": batch_size}
    assert len(inserts) == 1  # both rows in one statement
    assert storage_for(settings).get_trial(trial._trial_id).params == {"lr": lr, "batch_size": batch_size}


def test_a_suggestion_that_contradicts_the_study_fails_at_once_in_a_batch(settings: Settings) -> None:
    study, storage = _study(settings, "clash", max_age_s=0)
    study.enqueue_trial({"lr": 0.01})
    first = study.ask()
    first.suggest_float("lr", 1e-3, 1e-1, log=True)
    study.tell(first, 0.5)
    second = study.ask()
    with pytest.raises(ValueError), storage.params_in_one_write():
        second.suggest_categorical("lr", ["a", "b"])


def test_ask_checks_the_queue_in_one_query_and_does_not_read_its_new_trial_back(settings: Settings) -> None:
    study, _ = _study(settings, "lean-ask", max_age_s=60)
    study.get_trials()  # the window starts now
    reads = _count_trial_reads(storage_for(settings))
    trial = study.ask()
    # Is anything queued? Which number comes next? Nothing else: the new trial is not read back.
    assert len(reads) == 2, reads
    assert "WHERE trials.study_id" in reads[0] and "count(" in reads[1]
    stored = storage_for(settings).get_trial(trial._trial_id)
    assert (trial.number, stored.state, trial.params) == (stored.number, optuna.trial.TrialState.RUNNING, {})
    assert trial.datetime_start == stored.datetime_start


def test_a_trial_written_since_its_creation_is_read_back(settings: Settings) -> None:
    study, storage = _study(settings, "written", max_age_s=60)
    trial_id = storage.create_new_trial(study._study_id)
    storage.set_trial_user_attr(trial_id, "note", "hello")
    assert storage.get_trial(trial_id).user_attrs == {"note": "hello"}


def test_a_batch_of_suggestions_looks_its_trial_up_once(settings: Settings) -> None:
    study, storage = _study(settings, "one-lookup", max_age_s=60)
    trial = study.ask()
    lookups = _count_trial_reads(storage_for(settings))
    with storage.params_in_one_write():
        for name in ("a", "b", "c"):
            trial.suggest_float(name, 0.0, 1.0)
    assert len([s for s in lookups if "trials.trial_id = " in s]) == 1
    assert set(storage_for(settings).get_trial(trial._trial_id).params) == {"a", "b", "c"}


# ---------------------------------------------------------------- the trials a process runs, kept in memory


def _reads_of_trial_rows(storage: optuna.storages.RDBStorage) -> list[str]:
    """Every SELECT of a trial's params or attributes: a full read of a trial makes them, the writes
    don't (less the study-wide lookup of a parameter's distribution that Optuna's `set_trial_param` makes)."""
    tables = ("FROM trial_params", "FROM trial_user_attributes", "FROM trial_system_attributes")
    return _statements(storage, lambda statement: _is_select(statement) and any(t in statement for t in tables)
                       and "trial_params.param_name = " not in statement)


def _comparable(trial: optuna.trial.FrozenTrial) -> tuple[object, ...]:
    return (trial.number, trial.state, trial.params, trial.distributions, trial.intermediate_values, trial.user_attrs,
            trial.system_attrs)


def test_a_running_trial_is_read_from_the_copy_its_process_keeps_which_matches_the_database(
        settings: Settings) -> None:
    study, storage = _study(settings, "kept-copy", max_age_s=60)
    trial = study.ask()
    with storage.params_in_one_write():
        trial.suggest_float("lr", 1e-3, 1e-1, log=True)
        trial.suggest_categorical("batch_size", [64, 128])
        storage.set_trial_system_attr(trial._trial_id, "sampler_note", {"k": (1, 2)})  # kept as JSON gives it back
    trial.report(0.5, step=1)
    trial.set_user_attr("note", ["a", 1])
    reads = _reads_of_trial_rows(storage_for(settings))
    kept = storage.get_trial(trial._trial_id)
    assert reads == []
    stored = storage_for(settings).get_trial(trial._trial_id)
    assert _comparable(kept) == _comparable(stored)
    assert kept.system_attrs["sampler_note"] == {"k": [1, 2]} and kept.user_attrs["note"] == ["a", 1]


def test_a_trial_run_by_optimize_is_never_read_back(settings: Settings) -> None:
    study, _ = _study(settings, "lean-tell", max_age_s=60)
    study.get_trials()  # the window starts now

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("lr", 1e-3, 1e-1, log=True)
        trial.report(0.7, step=1)
        raise optuna.TrialPruned()

    reads = _reads_of_trial_rows(storage_for(settings))
    study.optimize(objective, n_trials=1)
    assert reads == []  # neither by the `Trial` at its start nor by the final tell
    told = storage_for(settings).get_trial(study.trials[0]._trial_id)
    assert told.state == optuna.trial.TrialState.PRUNED and told.value == 0.7  # the last report, as Optuna does


def test_a_trial_this_process_ended_shows_in_the_study_at_once_then_as_stored(settings: Settings) -> None:
    study, storage = _study(settings, "ended-shown", max_age_s=60)
    study.get_trials()  # the window starts now: no read for the next minute
    pruned, done = study.ask(), study.ask()
    pruned.report(0.7, step=1)
    pruned.set_user_attr("converge_pruned_by", {"rule": "underfitting"})
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    done.report(0.4, step=1)
    study.tell(done, 0.3)
    reads = _count_trial_reads(storage_for(settings))
    ended = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert reads == []  # seen without a read, as the next trial's peers
    assert [(t.number, t.state.name, t.value, t.intermediate_values) for t in ended] == [
        (0, "PRUNED", 0.7, {1: 0.7}), (1, "COMPLETE", 0.3, {1: 0.4})]
    assert ended[0].user_attrs["converge_pruned_by"] == {"rule": "underfitting"} and ended[1].datetime_complete
    stored = [storage_for(settings).get_trial(t._trial_id) for t in ended]
    assert [_comparable(t) for t in ended] == [_comparable(t) for t in stored]

    storage.max_age_s = 0  # the next read replaces the copies with the stored rows
    assert [_comparable(t) for t in study.get_trials()] == [_comparable(t) for t in stored]
    assert study.get_trials()[1].datetime_complete == stored[1].datetime_complete


def test_a_queued_trial_a_process_takes_is_read_once_then_kept(settings: Settings) -> None:
    study, storage = _study(settings, "queued-kept", max_age_s=60)
    study.enqueue_trial({"lr": 0.02}, user_attrs={"origin": "repair"})
    trial = study.ask()
    assert trial.suggest_float("lr", 1e-3, 1e-1, log=True) == 0.02
    reads = _reads_of_trial_rows(storage_for(settings))
    kept = storage.get_trial(trial._trial_id)
    assert reads == [] and kept.user_attrs == {"origin": "repair"}
    assert _comparable(kept) == _comparable(storage_for(settings).get_trial(trial._trial_id))


def test_a_trial_failed_elsewhere_meanwhile_cannot_be_told(settings: Settings) -> None:
    study, _ = _study(settings, "failed-elsewhere", max_age_s=60)
    trial = study.ask()
    storage_for(settings).set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)  # a stale check
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        study.tell(trial, 0.5)
    assert storage_for(settings).get_trial(trial._trial_id).state == optuna.trial.TrialState.FAIL


def test_a_value_the_caller_stored_is_not_written_again_by_the_report(settings: Settings) -> None:
    from converge.core.db import repo
    from converge.core.db.engine import get_engine, session_scope

    study, storage = _study(settings, "stored-by-caller", max_age_s=60)
    trial = study.ask()
    writes = _statements(storage_for(settings),
                         lambda statement: "trial_intermediate_values" in statement and not _is_select(statement))

    with session_scope(get_engine(settings.database_url)) as session:
        assert repo.record_intermediate_value(session, trial._trial_id, 1, 0.25)
    storage.intermediate_value_stored(trial._trial_id, 1, 0.25)
    trial.report(0.25, step=1)
    trial.report(0.125, step=2)  # not stored by the caller: Optuna's storage writes it
    assert len(writes) == 1
    assert storage_for(settings).get_trial(trial._trial_id).intermediate_values == {1: 0.25, 2: 0.125}


def test_the_attributes_set_while_sampling_go_with_the_parameters(settings: Settings) -> None:
    study, storage = _study(settings, "attrs-batched", max_age_s=60)
    trial = study.ask()
    writes = _statements(storage_for(settings), lambda statement: statement.lstrip().upper().startswith(
        ("INSERT INTO TRIAL_SYSTEM_ATTRIBUTES", "INSERT INTO TRIAL_USER_ATTRIBUTES")))

    with storage.params_in_one_write():
        trial.set_user_attr("converge_worker_pid", 1234)  # what a slot's on_trial_start writes
        trial.suggest_float("lr", 1e-3, 1e-1, log=True)
        storage.set_trial_system_attr(trial._trial_id, "tpe:relative_params:0", '{"lr": 0.01}')
        storage.set_trial_system_attr(trial._trial_id, "other", 3)
        assert writes == []
    assert len(writes) == 2  # one statement each for the system and the user attributes, in one transaction
    stored = storage_for(settings).get_trial(trial._trial_id)
    assert stored.system_attrs == {"tpe:relative_params:0": '{"lr": 0.01}', "other": 3}
    assert stored.user_attrs == {"converge_worker_pid": 1234} and stored.params == trial.params
