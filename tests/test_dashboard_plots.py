"""Verdicts and figures in optuna-dashboard: a note per ended trial, the study's figures, refreshed with a throttle."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna_dashboard._custom_plot_data import get_plotly_graph_objects
from optuna_dashboard._note import get_note_from_system_attrs

from conftest import start_worker, tiny_spec
from converge.core.db.migrate import upgrade
from converge.core.settings import Settings
from converge.studies import lifecycle
from converge.studies.plots import dashboard
from converge.studies.spec import parse_spec
from converge.studies.storage import storage_for


def test_study_figures_are_refreshed_at_most_every_interval_and_always_at_the_end(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    saved: list[str] = []
    monkeypatch.setattr(dashboard, "save_study_figures", lambda _settings, name: saved.append(name))
    now = [100.0]
    figures = dashboard.StudyFigures(settings.model_copy(update={"dashboard_figures_every_s": 60}), lambda: now[0])
    assert figures.after_trial("a", study_ended=False)  # the first trial: at once
    now[0] += 30
    assert not figures.after_trial("a", study_ended=False)  # within the interval
    assert figures.after_trial("b", study_ended=False)  # per study
    assert figures.after_trial("a", study_ended=True)  # the study ended: always
    now[0] += 61
    assert figures.after_trial("a", study_ended=False)
    assert saved == ["a", "b", "a", "a"]

    def broken(_settings: Settings, _name: str) -> None:
        raise RuntimeError("storage down")

    monkeypatch.setattr(dashboard, "save_study_figures", broken)
    assert not figures.after_trial("c", study_ended=True)  # logged, never raised


def test_a_trial_note_replaces_a_longer_one_in_the_dashboards_format(settings: Settings) -> None:
    """`save_trial_note` writes optuna-dashboard's keys itself (one transaction): the dashboard reads
    the new note, at the next version, with the chunks of a longer earlier note blanked."""
    from optuna_dashboard import save_note

    from converge.core.db.engine import get_engine

    study = optuna.create_study(study_name="noted", storage=storage_for(settings))
    trial = study.ask()
    other = study.ask()
    save_note(trial, "user's words " * 400)  # three chunks of ~2 KB, version 1
    save_note(other, "another trial's note")
    diagnosis = {"verdict": "overfitting", "healthy": False, "confidence": 0.9, "onset_epoch": 3, "summary": "s",
                 "findings": [{"kind": "overfitting", "epoch": 3, "evidence": "val_loss rose"}], "remedies": []}
    dashboard.save_trial_note(trial, (4, diagnosis), get_engine(settings.database_url))

    attrs = study._storage.get_study_system_attrs(study._study_id)
    note = get_note_from_system_attrs(attrs, trial._trial_id)
    assert note["version"] == 2
    assert note["body"].startswith("## Converge: ") and "overfitting" in note["body"] and "user's" not in note["body"]
    assert get_note_from_system_attrs(attrs, other._trial_id)["body"] == "another trial's note"  # untouched


@pytest.mark.slow
def test_a_worker_leaves_notes_and_figures_for_the_dashboard(tmp_path: Path) -> None:
    # SQLite only: the notes and figures go through Optuna's storage API, the same on both databases, and a
    # worker's start (torch in its slot process) is the cost of this test.
    url = f"sqlite:///{tmp_path / 'converge.db'}"
    upgrade(url)
    settings = Settings(database_url=url)
    lifecycle.submit_study(settings, parse_spec(tiny_spec("shown", n_trials=2)))
    worker = start_worker(settings.database_url, "--exit-when-idle")
    output, _ = worker.communicate(timeout=180)
    assert worker.returncode == 0, output
    storage = storage_for(settings)
    study = optuna.load_study(study_name="shown", storage=storage)
    attrs = storage.get_study_system_attrs(study._study_id)
    for trial in study.get_trials():
        note = get_note_from_system_attrs(attrs, trial._trial_id)["body"]
        assert note.startswith("## Converge: ") and "**Verdict:**" in note, note
    graphs = get_plotly_graph_objects(attrs)
    assert set(graphs) == {f"converge-{key}" for key in ("objective_history", "parallel_coordinates",
                                                         "lr_vs_objective", "verdict_counts", "loss_curves")}
    counts = json.loads(graphs["converge-verdict_counts"])["data"][0]
    assert sum(counts["y"]) == 2, output  # refreshed when the study ended: both trials counted (the worker's
    # log says why not: once, in a batch with other tests, only the first trial was counted)
    assert len(json.loads(graphs["converge-loss_curves"])["data"]) == 2
