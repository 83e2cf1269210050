"""Sweeps end to end: real training, every epoch stored, failures recorded, on both databases."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import CLI, REPO, converge_env, epoch_rows, tiny_spec
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.db.migrate import upgrade
from converge.core.db.models import METRIC_COLUMNS
from converge.core.settings import Settings
from converge.studies.runner import sampler_seed
from converge.studies.spec import parse_spec
from converge.studies.storage import storage_for
from converge.studies.sweep import run_sweep

pytestmark = pytest.mark.slow


def _trials(settings: Settings, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage_for(settings)).get_trials(deepcopy=False)


def test_a_three_trial_sweep_stores_every_epoch(settings: Settings) -> None:
    spec = parse_spec(tiny_spec("sweep-3"))
    assert run_sweep(settings, spec, progress=False) == "done"

    trials = _trials(settings, "sweep-3")
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert len({t.params["lr"] for t in trials}) == 3  # a distinct sampler seed per trial slot
    with session_scope(get_engine(settings.database_url)) as session:
        study = repo.get_study(session, "sweep-3")
        assert study.state == "done" and study.finished_at is not None and study.n_claimed == 3
        for trial in trials:
            rows = epoch_rows(session, study.id, trial.number)
            assert [r.epoch for r in rows] == list(range(trial.params["epochs"]))
            for row in rows:
                assert all(getattr(row, c) is not None for c in METRIC_COLUMNS)
                assert row.trial_id == trial._trial_id
            # Optuna got the objective of every epoch, for pruning; the last one is the trial's value
            assert trial.intermediate_values == {r.epoch: pytest.approx(r.val_loss) for r in rows}
            assert trial.value == pytest.approx(rows[-1].val_loss)


def test_a_trial_that_raises_is_failed_with_its_error_and_the_study_goes_on(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from converge import trainers

    real_fit = trainers.fit
    calls = {"n": 0}

    def flaky_fit(config, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_fit(config, **kwargs)

    monkeypatch.setattr(trainers, "fit", flaky_fit)
    assert run_sweep(settings, parse_spec(tiny_spec("flaky")), progress=False) == "done"
    states = [t.state.name for t in _trials(settings, "flaky")]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]
    failed = _trials(settings, "flaky")[1]
    assert failed.user_attrs["error"] == "RuntimeError: CUDA out of memory (simulated)"


def test_a_diverging_trial_fails_with_its_reason_and_keeps_its_nan_epoch(settings: Settings) -> None:
    spec = tiny_spec("diverge", n_trials=1)
    spec["search_space"].update(lr=1e6, epochs=3)
    assert run_sweep(settings, parse_spec(spec), progress=False) == "failed"
    (trial,) = _trials(settings, "diverge")
    assert trial.state.name == "FAIL"
    assert "the trial diverged" in trial.user_attrs["error"]
    with session_scope(get_engine(settings.database_url)) as session:
        study = repo.get_study(session, "diverge")
        assert study.detail == "all 1 trials failed"
        rows = epoch_rows(session, study.id, 0)
    assert rows and not all(r.val_loss == r.val_loss and abs(r.val_loss) < 1e30 for r in rows)


def test_pruned_trials_count_as_finished(settings: Settings) -> None:
    spec = tiny_spec("pruned", n_trials=8, pruner={"name": "median"})
    spec["search_space"]["epochs"] = 3
    assert run_sweep(settings, parse_spec(spec), progress=False) == "done"
    states = {t.state.name for t in _trials(settings, "pruned")}
    assert states <= {"COMPLETE", "PRUNED"}


def test_sampler_seeds_differ_per_slot_except_for_shared_sequences() -> None:
    tpe = parse_spec({"name": "x", "sampler": {"name": "tpe", "seed": 3}})
    assert len({sampler_seed(tpe, slot) for slot in range(10)}) == 10
    qmc = parse_spec({"name": "x", "sampler": {"name": "qmc", "seed": 3}})
    assert {sampler_seed(qmc, slot) for slot in range(10)} == {3}


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "gp", "qmc", "grid"])
def test_every_sampler_runs(tmp_path, sampler: str) -> None:
    """Sampler plumbing does not depend on the database: SQLite only."""
    url = f"sqlite:///{tmp_path / 'samplers.db'}"
    upgrade(url)
    settings = Settings(database_url=url)
    spec = tiny_spec(f"s-{sampler}", n_trials=2, sampler={"name": sampler, "seed": 1})
    spec["search_space"]["epochs"] = 2
    assert run_sweep(settings, parse_spec(spec), progress=False) == "done"


def test_each_epochs_metrics_and_optunas_value_for_it_commit_together(settings: Settings) -> None:
    import sqlalchemy as sa

    since_commit: dict[int, list[str]] = {}
    value_writes: list[list[str]] = []  # what each write of Optuna's value shares its transaction with

    def statement(conn, cursor, text, parameters, context, executemany):  # type: ignore[no-untyped-def]
        kind = text.lstrip().split("(")[0].strip().upper()
        if kind.startswith("INSERT INTO TRIAL_INTERMEDIATE_VALUES"):
            value_writes.append(list(since_commit.get(id(conn), [])))
        since_commit.setdefault(id(conn), []).append(kind)

    def commit(conn):  # type: ignore[no-untyped-def]
        since_commit.pop(id(conn), None)

    sa.event.listen(sa.Engine, "before_cursor_execute", statement)
    sa.event.listen(sa.Engine, "commit", commit)
    try:
        assert run_sweep(settings, parse_spec(tiny_spec("together", n_trials=2)), progress=False) == "done"
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", statement)
        sa.event.remove(sa.Engine, "commit", commit)
    epochs = sum(len(t.intermediate_values) for t in _trials(settings, "together"))
    assert len(value_writes) == epochs == 2 * 3  # one write per epoch: the report added none
    assert all(any(k.startswith("INSERT INTO CONVERGE_TRIAL_METRICS") for k in before) for before in value_writes)


def test_the_final_diagnosis_is_stored_even_when_the_dashboard_note_cannot_be(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from converge.studies import objective

    def broken_note(session, trial, last):  # type: ignore[no-untyped-def]
        raise RuntimeError("no note today")

    monkeypatch.setattr(objective, "write_trial_note", broken_note)
    assert run_sweep(settings, parse_spec(tiny_spec("no-note", n_trials=1)), progress=False) == "done"
    with session_scope(get_engine(settings.database_url)) as session:
        study = repo.get_study(session, "no-note")
        final = repo.diagnoses_by_trial(session, study.id)[0]
    assert final.final and final.epoch == 2
    assert "could not store the final diagnosis with the dashboard note" in caplog.text


def test_a_single_slot_sweep_repeats_itself_run_after_run(tmp_path: Path) -> None:
    """`converge sweep` twice on the same spec (fixed sampler seed, the default convergence pruner), in two
    processes with different hash seeds, one reading the study from the database at every chance and one
    as seldom as it may: the same trials, pruning decisions and best. What the sampler and the pruners see
    of the study does not depend on wall time."""
    spec = tiny_spec("repeat", n_trials=10, sampler={"name": "tpe", "seed": 5}, pruner={"name": "convergence"},
                     search_space={"lr": {"low": 1e-4, "high": 1.0, "log": True}, "batch_size": {"choices": [32, 128]},
                                   "epochs": {"low": 6, "high": 14}, "weight_decay": 1e-4, "dropout": 0.0})
    spec_path = tmp_path / "repeat.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    runs = []
    for run, (hash_seed, max_age) in enumerate([("1", "0"), ("2", "1000")]):
        url = f"sqlite:///{tmp_path}/run{run}.db"
        env = converge_env(url, PYTHONHASHSEED=hash_seed, CONVERGE_TRIAL_READS_MAX_AGE_S=max_age, OMP_NUM_THREADS="1")
        for command in (["db", "upgrade"], ["sweep", "--spec", str(spec_path), "--quiet"]):
            done = subprocess.run([*CLI, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
        trials = _trials(Settings(database_url=url), "repeat")
        runs.append([(t.number, t.state.name, t.value, json.dumps(t.params, sort_keys=True),
                      t.user_attrs.get("converge_pruned_by"), t.user_attrs.get("converge_stopped_early"),
                      sorted(t.intermediate_values.items())) for t in trials])
    assert len(runs[0]) == 10 and runs[0] == runs[1]
