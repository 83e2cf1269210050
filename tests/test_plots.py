"""Figures: their data computed and checked without drawing, then drawn, then served by the API."""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from optuna.trial import TrialState, create_trial

from conftest import CLI, REPO, TINY_DISTRIBUTIONS, converge_env, tiny_spec
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.settings import Settings
from converge.service.api.app import create_app
from converge.studies.plots import draw
from converge.studies.plots.data import (
    StudyTrial,
    diagnosis_note,
    spread,
    study_figure_data,
    trial_figure_data,
)
from converge.studies.storage import storage_for

OVERFIT = {"verdict": "overfitting", "healthy": False, "onset_epoch": 3, "confidence": 0.9,
           "findings": [{"kind": "overfitting", "epoch": 3, "evidence": "val_loss rose 34% above its minimum"},
                        {"kind": "oscillating", "epoch": 4, "evidence": "secondary"}],
           "remedies": [{"param": "weight_decay", "action": "increase", "factor": 10, "reason": "regularise"},
                        {"param": "epochs", "action": "set", "value": 4, "reason": "stop at the best epoch"}],
           "summary": "val loss rose while train loss fell"}


def _epochs(n: int = 6, nan_at: int | None = None) -> list[dict[str, Any]]:
    rows = []
    for e in range(n):
        rows.append({"epoch": e, "train_loss": 2.0 / (e + 1), "val_loss": 1.0 + abs(e - 3) * 0.2,
                     "val_acc": 0.5 + 0.05 * e, "grad_norm": 10.0 ** -e, "lr": 0.01 * 0.5 ** e})
    if nan_at is not None:
        rows[nan_at]["train_loss"] = math.nan
        rows[nan_at]["val_loss"] = "Infinity"
    return rows


# ---------------------------------------------------------------- data, no drawing


def test_trial_figure_data_places_each_finding_at_its_epoch_and_keeps_non_finite_epochs_apart() -> None:
    data = trial_figure_data("s", 7, list(reversed(_epochs(nan_at=5))), OVERFIT, state="complete")
    assert data.epochs == [0, 1, 2, 3, 4, 5]  # sorted
    assert data.series["train_loss"][5] is None and data.series["val_loss"][5] is None
    assert data.non_finite["train_loss"] == [5] and data.non_finite["val_loss"] == [5]
    assert data.series["grad_norm"][2] == pytest.approx(0.01)
    assert [(f.kind, f.epoch, f.primary) for f in data.findings] == [("overfitting", 3, True),
                                                                     ("oscillating", 4, False)]
    assert data.findings[0].y == pytest.approx(1.0)  # the validation loss at epoch 3
    assert data.title == "s · trial 7 (complete): overfitting, confidence 0.90, from epoch 3"
    assert data.verdict == "overfitting" and data.healthy is False


def test_a_trial_without_epochs_or_diagnosis_has_empty_series_and_says_so() -> None:
    data = trial_figure_data("s", 0, [], None)
    assert data.epochs == [] and not data.has("train_loss") and data.findings == []
    assert data.title.endswith("not diagnosed yet") and data.verdict is None


def _trials() -> list[StudyTrial]:
    def curve(scale: float) -> list[tuple[int, float | None]]:
        return [(e, scale / (e + 1)) for e in range(3)]

    params = {"lr": 0.01, "batch_size": 64, "epochs": 3, "weight_decay": 1e-4, "dropout": 0.1}
    return [
        StudyTrial(0, "complete", 0.5, {**params, "lr": 0.001}, "converged", curve(1.0)),
        StudyTrial(1, "complete", 0.3, {**params, "lr": 0.003}, "converged", curve(2.0)),
        StudyTrial(2, "pruned", 2.0, {**params, "lr": 0.5}, "diverged", [(0, 1.0), (1, None)]),
        StudyTrial(3, "complete", 0.4, params, "overfitting", curve(1.5)),
        StudyTrial(4, "fail", None, params, None, []),
        StudyTrial(5, "complete", 0.1, {"lr": 0.02}, "still_improving", curve(0.5)),  # a partial params set
    ]


def test_study_figure_data_groups_by_verdict_and_tracks_the_best() -> None:
    data = study_figure_data("s", "minimize", "val_loss", _trials())
    assert data.verdict_counts == {"converged": 2, "still_improving": 1, "diverged": 1, "overfitting": 1,
                                   "undiagnosed": 1}
    history = {g.verdict: (g.numbers, g.values) for g in data.history}
    assert history["converged"] == ([0, 1], [0.5, 0.3]) and history["diverged"] == ([2], [2.0])
    assert "undiagnosed" not in history  # trial 4 has no value
    assert data.best == ([0, 1, 3, 5], [0.5, 0.3, 0.3, 0.1])  # complete trials only: the pruned 2.0 is no best
    dims = {d["label"]: d for d in data.parallel["dimensions"]}
    assert list(dims) == ["lr", "batch_size", "epochs", "weight_decay", "dropout", "val_loss"]
    assert data.parallel["numbers"] == [0, 1, 2, 3]  # trial 5 lacks params, trial 4 a value
    assert dims["lr"]["values"] == [0.001, 0.003, 0.5, 0.01] and dims["lr"]["log"] and not dims["epochs"]["log"]
    assert data.parallel["verdicts"] == ["converged", "converged", "diverged", "overfitting"]
    lr = {g.verdict: g.values for g in data.lr_objective}
    assert lr["still_improving"] == [(0.02, 0.1)]
    assert [c["number"] for c in data.curves] == [0, 1, 2, 3, 5] and data.curves[2]["loss"] == [1.0, None]
    assert (data.curves_shown, data.curves_total, data.trials) == (5, 5, 6)

    maximize = study_figure_data("s", "maximize", "val_acc", _trials())
    assert maximize.best == ([0, 1, 3, 5], [0.5, 0.5, 0.5, 0.5])


def test_the_loss_overlay_is_capped_evenly_over_the_study() -> None:
    assert spread(list(range(10)), 4) == [0, 3, 6, 9] and spread([1, 2], 5) == [1, 2]
    many = [StudyTrial(i, "complete", 1.0, {}, "converged", [(0, 1.0)]) for i in range(50)]
    data = study_figure_data("s", "minimize", "val_loss", many, max_curves=10)
    assert data.curves_shown == 10 and data.curves_total == 50
    assert data.curves[0]["number"] == 0 and data.curves[-1]["number"] == 49


def test_the_dashboard_note_holds_verdict_evidence_and_remedies() -> None:
    note = diagnosis_note(7, OVERFIT, epoch=5)
    assert note.startswith("## Converge: overfitting")
    assert "**Verdict:** `overfitting` (unhealthy, confidence 0.90), from epoch 3; last epoch seen 5." in note
    assert "- **overfitting** (epoch 3): val_loss rose 34% above its minimum" in note
    assert "1. increase `weight_decay` ×10: regularise" in note and "2. set `epochs` to 4" in note
    assert "No diagnosis" in diagnosis_note(3, None)


def test_the_dashboard_note_never_shows_python_values() -> None:
    """A finding without an epoch (a trend over the run), computed floats, a remedy without its value."""
    still_improving = {
        "verdict": "still_improving", "onset_epoch": None, "confidence": 0.6,
        "findings": [{"kind": "still_improving", "epoch": None, "evidence": "val_loss fell 4% over the last 5 epochs"},
                     {"kind": "too_early", "epoch": 2.0, "evidence": None}],
        "remedies": [{"param": "epochs", "action": "increase", "factor": 2.0, "reason": "the loss was still falling"},
                     {"param": "lr", "action": "set", "value": 0.00031622776601683794, "reason": None},
                     {"param": "dropout", "action": "decrease", "factor": 0.30000000000000004, "reason": "r"},
                     {"param": "gradient_clip", "action": "set", "value": None, "reason": "clip"},
                     {"param": "model", "action": "set", "value": {"layers": 2, "width": 64.0}, "reason": "smaller"}],
        "summary": "still improving"}  # no "healthy": the verdict says it
    note = diagnosis_note(4, still_improving, epoch=9)
    assert "**Verdict:** `still_improving` (healthy, confidence 0.60); last epoch seen 9." in note
    assert "- **still_improving**: val_loss fell 4% over the last 5 epochs\n" in note
    assert "- **too_early** (epoch 2)\n" in note
    assert "1. increase `epochs` ×2: the loss was still falling" in note
    assert "2. set `lr` to 0.000316\n" in note and "3. decrease `dropout` ×0.3: r" in note
    assert "4. set `gradient_clip`: clip" in note and "5. set `model` to layers 2, width 64: smaller" in note
    for python in ("None", "(epoch None)", "{", "0.0003162", "0.3000", "2.0", "True", "False"):
        assert python not in note, python


# ---------------------------------------------------------------- drawing


def test_the_trial_figure_draws_every_panel_findings_and_a_log_gradient_axis() -> None:
    fig = draw.trial_figure(trial_figure_data("s", 7, _epochs(nan_at=5), OVERFIT, state="complete"))
    names = [t.name for t in fig.data]
    assert names == ["train_loss", "val_loss", "val_acc", "grad_norm", "lr", "loss not finite", "findings"]
    assert fig.layout.yaxis3.type == "log"  # the gradient norm, always
    assert fig.layout.yaxis4.type is None  # the learning rate spans 32x here: log only from 100x
    assert "overfitting" in fig.layout.title.text
    assert len(fig.layout.shapes) == 2 * 4  # one line per finding on each of the four panels
    assert list(fig.data[-1].x) == [3, 4]


def test_the_study_figures_are_coloured_by_verdict() -> None:
    figures = draw.study_figures(study_figure_data("s", "minimize", "val_loss", _trials()))
    assert list(figures) == [key for key, _ in draw.STUDY_FIGURES]
    history = figures["objective_history"]
    assert [t.name for t in history.data] == ["converged", "still_improving", "diverged", "overfitting",
                                              "best so far"]
    assert history.data[0].marker.color == draw.VERDICT_COLORS["converged"]
    bars = figures["verdict_counts"].data[0]
    assert list(bars.x) == ["converged", "still_improving", "diverged", "overfitting", "undiagnosed"]
    assert list(bars.y) == [2, 1, 1, 1, 1]
    parcoords = figures["parallel_coordinates"].data[0]
    assert [d.label for d in parcoords.dimensions][0] == "log10(lr)"
    assert figures["lr_vs_objective"].layout.xaxis.type == "log"
    curves = figures["loss_curves"].data
    assert len(curves) == 5 and sum(bool(t.showlegend) for t in curves) == 4  # one legend entry per verdict


# ---------------------------------------------------------------- the API


def _seed(settings: Settings, name: str = "plots") -> None:
    client = TestClient(create_app(settings, dashboard=False))
    assert client.post("/v1/studies", json=tiny_spec(name, n_trials=5)).status_code == 201
    study = optuna.load_study(study_name=name, storage=storage_for(settings))
    states = [(TrialState.COMPLETE, 0.4, OVERFIT), (TrialState.COMPLETE, 0.2, {**OVERFIT, "verdict": "converged",
                                                                               "healthy": True, "findings": []}),
              (TrialState.PRUNED, 5.0, {**OVERFIT, "verdict": "diverged"}), (TrialState.WAITING, None, None)]
    study.add_trials([create_trial(state=s, value=v, params={"lr": 1e-3 * (i + 1), "batch_size": 64, "epochs": 2,
                                                             "weight_decay": 1e-4, "dropout": 0.0},
                                   distributions=TINY_DISTRIBUTIONS, intermediate_values={0: v} if v else {})
                      for i, (s, v, _) in enumerate(states)])
    with session_scope(get_engine(settings.database_url)) as session:
        study_id = repo.get_study(session, name).id
        for trial, (_, _, diagnosis) in zip(study.get_trials(deepcopy=False), states):
            if diagnosis is None:
                continue
            for row in _epochs(nan_at=5 if diagnosis["verdict"] == "diverged" else None):
                repo.record_epoch(session, study_id, trial._trial_id, trial.number, row)
            repo.save_diagnosis(session, study_id, trial._trial_id, trial.number, 5, diagnosis, final=True)


def test_the_plot_endpoints_serve_plotly_json_and_standalone_html(settings: Settings) -> None:
    _seed(settings)
    client = TestClient(create_app(settings, dashboard=False))

    trial = client.get("/v1/studies/plots/trials/0/plot")
    assert trial.status_code == 200 and trial.headers["content-type"] == "application/json"
    body = trial.json()
    assert body["verdict"] == "overfitting" and body["state"] == "complete" and "overfitting" in body["title"]
    traces = {t["name"]: t for t in body["figure"]["data"]}
    assert traces["val_loss"]["y"][:2] == [1.6, 1.4] and traces["findings"]["x"] == [3, 4]
    assert body["figure"]["layout"]["yaxis3"]["type"] == "log"

    diverged = client.get("/v1/studies/plots/trials/2/plot").json()
    assert {t["name"]: t for t in diverged["figure"]["data"]}["loss not finite"]["x"] == [5]
    assert client.get("/v1/studies/plots/trials/3/plot").json()["verdict"] is None  # waiting: empty panels

    study = client.get("/v1/studies/plots/plot").json()
    assert study["verdict_counts"] == {"converged": 1, "diverged": 1, "overfitting": 1, "undiagnosed": 1}
    assert set(study["figures"]) == {key for key, _ in draw.STUDY_FIGURES}
    curves = study["figures"]["loss_curves"]["data"]
    assert len(curves) == 3 and all(len(c["x"]) == 6 for c in curves)
    assert (study["trials"], study["curves_shown"], study["curves_total"]) == (4, 3, 3)

    page = client.get("/v1/studies/plots/plot", params={"format": "html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "plotly.js v" in page.text and "<script src" not in page.text  # plotly.js is inlined: no network
    assert len(re.findall(r'id="converge-plot-0-\d"', page.text)) == 5 and "Plotly.newPlot" in page.text
    trial_page = client.get("/v1/studies/plots/trials/0/plot?format=html").text
    assert "increase <code>weight_decay</code> ×10" in trial_page and 'id="converge-plot-0-0"' in trial_page

    assert client.get("/v1/studies/nope/plot").status_code == 404
    assert client.get("/v1/studies/plots/trials/99/plot").status_code == 404
    bad = client.get("/v1/studies/plots/plot", params={"format": "png"})
    assert bad.status_code == 422 and bad.json()["problems"]


# ---------------------------------------------------------------- the report


def test_converge_report_writes_one_self_contained_html_file(settings: Settings, tmp_path: Path) -> None:
    _seed(settings, "reported")
    out = tmp_path / "report.html"
    done = subprocess.run([*CLI, "report", "reported", "--out", str(out)], cwd=REPO,
                          env=converge_env(settings.database_url), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2 unhealthy trial(s)" in done.stdout
    page = out.read_text()
    assert "plotly.js v" in page and "<script src" not in page  # one file, nothing fetched
    assert "<h2>Summary</h2>" in page and "overfitting 1" in page and "converged 1" in page
    assert len(re.findall(r'id="converge-plot-1-\d"', page)) == 5  # the study's figures
    assert "<h2>Trial 0: overfitting</h2>" in page and "<h2>Trial 2: diverged</h2>" in page
    assert "Trial 1:" not in page  # healthy trials get no figure of their own

    missing = subprocess.run([*CLI, "report", "nope", "--out", str(out)], cwd=REPO,
                             env=converge_env(settings.database_url), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "nope" in missing.stderr
