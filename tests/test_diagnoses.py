"""Trial diagnoses: stored per trial, served by the API, diagnosed on demand by `POST /v1/diagnose`.

The verdict rules belong to `studies.diagnosis` and keep improving; these tests assert the
plumbing (structure, storage, routes, errors) and only obvious verdicts (a NaN loss diverged).
"""

from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from conftest import tiny_spec
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.db.models import TrialDiagnosis
from converge.core.settings import Settings
from converge.service.api.app import create_app
from converge.studies.diagnosis import MAX_EPOCHS, VERDICTS, Diagnosis, diagnose
from converge.studies.storage import storage_for

DIAGNOSIS_KEYS = {"verdict", "healthy", "onset_epoch", "confidence", "findings", "remedies", "summary"}


def _history(losses: list[float | str], **extra: Any) -> dict[str, Any]:
    return {"objective": {"metric": "val_loss", "direction": "minimize"}, "max_epochs": 10,
            "epochs": [{"epoch": i, "train_loss": loss, "val_loss": loss} for i, loss in enumerate(losses)], **extra}


DIVERGED = _history([2.3, 1.9, "NaN"])
IMPROVING = _history([2.3, 1.9, 1.6])


def _assert_diagnosis(body: dict[str, Any]) -> None:
    assert DIAGNOSIS_KEYS <= set(body)
    assert body["verdict"] in VERDICTS and 0.0 <= body["confidence"] <= 1.0
    assert isinstance(body["healthy"], bool) and isinstance(body["summary"], str)
    for finding in body["findings"]:
        assert {"kind", "epoch", "evidence"} <= set(finding)
    for remedy in body["remedies"]:
        assert {"param", "action", "reason"} <= set(remedy)


# ---------------------------------------------------------------- the repository, on both databases


def test_save_diagnosis_keeps_one_row_per_trial_the_latest(db_url: str) -> None:
    engine = get_engine(db_url)
    first = diagnose(_history([2.3])).to_dict()
    latest = diagnose(DIVERGED).to_dict()
    latest["remedies"].append({"param": "lr", "action": "set", "value": math.nan, "reason": "odd"})
    with session_scope(engine) as session:
        study = repo.add_study(session, "upsert", tiny_spec("upsert"), n_trials=2)
        repo.save_diagnosis(session, study.id, trial_id=11, trial_number=0, epoch=0, diagnosis=first, final=False)
    with session_scope(engine) as session:
        row = repo.get_diagnosis(session, study.id, 0)
        assert (row.epoch, row.final, row.verdict) == (0, False, first["verdict"])
        first_update = row.updated_at
    with session_scope(engine) as session:  # the same trial again: replaced, not added
        repo.save_diagnosis(session, study.id, trial_id=11, trial_number=0, epoch=2, diagnosis=latest, final=True)
        repo.save_diagnosis(session, study.id, trial_id=12, trial_number=1, epoch=0, diagnosis=first)
    with session_scope(engine) as session:
        rows = repo.diagnoses_by_trial(session, study.id)
        assert set(rows) == {0, 1}
        row = rows[0]
        assert (row.trial_id, row.epoch, row.final, row.verdict, row.healthy) == (11, 2, True, "diverged", False)
        assert row.onset_epoch == latest["onset_epoch"] and row.confidence == pytest.approx(latest["confidence"])
        assert row.diagnosis["summary"] == latest["summary"]
        assert row.diagnosis["remedies"][-1]["value"] == "NaN"  # non-finite floats kept, as JSON can hold them
        assert row.updated_at.utcoffset() == timedelta(0) and row.updated_at >= first_update
        assert rows[1].final is False
        assert repo.get_diagnosis(session, study.id, 7) is None
        count = session.scalar(sa.select(sa.func.count()).select_from(TrialDiagnosis))
        assert count == 2
        light = repo.diagnoses_by_trial(session, study.id, with_diagnosis=False)
        assert light[0].verdict == "diverged"

        repo.mark_diagnosis_final(session, study.id, 1)
    with session_scope(engine) as session:
        assert repo.get_diagnosis(session, study.id, 1).final is True
        session.delete(repo.get_study(session, "upsert"))  # the rows go with their study
    with session_scope(engine) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(TrialDiagnosis)) == 0


# ---------------------------------------------------------------- stored diagnoses through the API


@pytest.fixture
def client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings))


def _seed(settings: Settings, name: str) -> None:
    """A study with three running trials: 0 diverged, 1 improving, 2 without any epoch yet."""
    study = optuna.load_study(study_name=name, storage=storage_for(settings))
    trials = [study.ask() for _ in range(3)]
    with session_scope(get_engine(settings.database_url)) as session:
        study_id = repo.get_study(session, name).id
        for trial, history in zip(trials[:2], (DIVERGED, IMPROVING)):
            for row in history["epochs"]:
                repo.record_epoch(session, study_id, trial._trial_id, trial.number,
                                  {**row, "train_loss": float(row["train_loss"]), "val_loss": float(row["val_loss"])})
            repo.save_diagnosis(session, study_id, trial._trial_id, trial.number, len(history["epochs"]) - 1,
                                diagnose(history).to_dict(), final=trial.number == 0)


def test_a_trials_diagnosis_is_served_with_its_epoch_and_finality(client: TestClient, settings: Settings) -> None:
    assert client.post("/v1/studies", json=tiny_spec("served")).status_code == 201
    _seed(settings, "served")

    response = client.get("/v1/studies/served/trials/0/diagnosis")
    assert response.status_code == 200, response.text
    body = response.json()
    _assert_diagnosis(body)
    assert body["verdict"] == "diverged" and body["healthy"] is False and body["onset_epoch"] is not None
    assert (body["study"], body["trial"], body["epoch"], body["final"]) == ("served", 0, 2, True)
    assert body["updated_at"].endswith(("+00:00", "Z"))
    assert body == {**diagnose(DIVERGED).to_dict(), "study": "served", "trial": 0, "epoch": 2, "final": True,
                    "updated_at": body["updated_at"], "repair": None}  # the stored contract JSON, unchanged

    assert client.get("/v1/studies/served/trials/1/diagnosis").json()["final"] is False
    none_yet = client.get("/v1/studies/served/trials/2/diagnosis")
    assert none_yet.status_code == 404
    assert none_yet.json() == {"detail": "trial 2 has no epochs recorded yet, so no diagnosis"}
    assert client.get("/v1/studies/served/trials/3/diagnosis").json() == {"detail": "study 'served' has no trial 3"}
    assert client.get("/v1/studies/ghost/trials/0/diagnosis").json() == {"detail": "no study named 'ghost'"}

    detail = client.get("/v1/studies/served/trials/0").json()
    assert detail["verdict"] == "diverged" and detail["diagnosis"]["verdict"] == "diverged"
    _assert_diagnosis(detail["diagnosis"])
    assert client.get("/v1/studies/served/trials/2").json()["diagnosis"] is None


def test_the_trial_list_shows_and_filters_by_verdict(client: TestClient, settings: Settings) -> None:
    client.post("/v1/studies", json=tiny_spec("listed"))
    _seed(settings, "listed")

    trials = client.get("/v1/studies/listed/trials").json()["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert trials[0]["verdict"] == "diverged" and 0 < trials[0]["confidence"] <= 1
    assert trials[1]["verdict"] in VERDICTS and trials[1]["verdict"] != "diverged"
    assert trials[2]["verdict"] is None and trials[2]["confidence"] is None

    diverged = client.get("/v1/studies/listed/trials", params={"verdict": "diverged"})
    assert diverged.status_code == 200 and [t["number"] for t in diverged.json()["trials"]] == [0]
    other = trials[1]["verdict"]
    assert [t["number"] for t in client.get("/v1/studies/listed/trials",
                                            params={"verdict": other}).json()["trials"]] == [1]
    unused = next(v for v in VERDICTS if v not in (other, "diverged"))
    assert client.get("/v1/studies/listed/trials", params={"verdict": unused}).json()["trials"] == []

    bad = client.get("/v1/studies/listed/trials", params={"verdict": "melted"})
    assert bad.status_code == 422
    (problem,) = bad.json()["problems"]
    assert "verdict" in problem and "diverged" in problem


# ---------------------------------------------------------------- POST /v1/diagnose (no database needed)


@pytest.fixture
def bare_client(tmp_path: Path) -> TestClient:
    return TestClient(create_app(Settings(database_url=f"sqlite:///{tmp_path / 'unused.db'}"), dashboard=False))


def _post_raw(client: TestClient, body: str) -> httpx.Response:
    return client.post("/v1/diagnose", content=body, headers={"content-type": "application/json"})


def test_diagnose_takes_a_history_with_nan_strings(bare_client: TestClient) -> None:
    response = bare_client.post("/v1/diagnose", json=DIVERGED)
    assert response.status_code == 200, response.text
    body = response.json()
    _assert_diagnosis(body)
    assert (body["verdict"], body["healthy"]) == ("diverged", False) and body["onset_epoch"] is not None
    assert body == diagnose(DIVERGED).to_dict()  # the library's answer, in the contract's shape
    for remedy in body["remedies"]:
        assert set(remedy) <= {"param", "action", "factor", "value", "reason"}
        assert remedy.get("factor", 0) is not None and remedy.get("value", 0) is not None  # absent, not null


def test_diagnose_takes_bare_nan_and_infinity_tokens(bare_client: TestClient) -> None:
    body = ('{"epochs": [{"epoch": 0, "train_loss": 2.0, "val_loss": Infinity},'
            ' {"epoch": 1, "train_loss": NaN, "val_loss": -Infinity}]}')
    response = _post_raw(bare_client, body)
    assert response.status_code == 200, response.text
    assert response.json()["verdict"] == "diverged" and response.json()["onset_epoch"] is not None


def test_diagnose_takes_the_metrics_endpoints_body_and_optional_metrics_left_out(bare_client: TestClient) -> None:
    metrics_body = {"study": "s", "trial": 0, **IMPROVING}  # extra keys are ignored
    metrics_body["epochs"] = [{**e, "val_acc": None, "epoch_seconds": 0.1} for e in metrics_body["epochs"]]
    assert bare_client.post("/v1/diagnose", json=metrics_body).status_code == 200
    minimal = {"epochs": [{"epoch": 0, "train_loss": 1.0}, {"epoch": 2.0, "train_loss": 0.9}]}
    assert bare_client.post("/v1/diagnose", json=minimal).status_code == 200


def test_diagnose_names_out_of_order_epochs(bare_client: TestClient) -> None:
    history = _history([2.0, 1.5, 1.2])
    history["epochs"][2]["epoch"] = 0
    response = bare_client.post("/v1/diagnose", json=history)
    assert response.status_code == 422
    body = response.json()
    assert body["detail"].startswith("invalid history (1 problem)")
    (problem,) = body["problems"]
    assert "out of order" in problem and "epochs[2]" in problem and problem in body["detail"]


def test_diagnose_refuses_more_than_the_epoch_limit_saying_so(bare_client: TestClient) -> None:
    history = {"epochs": [{"epoch": i, "train_loss": 1.0} for i in range(MAX_EPOCHS + 1)]}
    response = bare_client.post("/v1/diagnose", json=history)
    assert response.status_code == 422
    assert f"{MAX_EPOCHS + 1} epochs" in response.json()["detail"]
    assert f"at most {MAX_EPOCHS}" in response.json()["detail"]
    history["epochs"].pop()
    assert bare_client.post("/v1/diagnose", json=history).status_code == 200  # the limit itself is fine


@pytest.mark.parametrize("body, words", [
    ("[1, 2]", "got list"),
    ('"a history"', "got str"),
    ("{}", "'epochs'"),
    ('{"epochs": [{"epoch": 0}]}', "train_loss is required"),
    ('{"epochs": [{"epoch": 0, "train_loss": "lots"}]}', "train_loss must be a number"),
    ("not json", "not valid JSON"),
    ("", "the body is empty"),
])
def test_diagnose_refuses_what_is_not_a_history_in_the_apps_error_format(bare_client: TestClient, body: str,
                                                                          words: str) -> None:
    response = _post_raw(bare_client, body)
    assert response.status_code == 422, response.text
    payload = response.json()
    assert set(payload) == {"detail", "problems"}
    assert payload["detail"].startswith("invalid history (")
    assert any(words in p for p in payload["problems"]), payload


def test_diagnose_is_documented_with_its_body_schema_and_an_example(bare_client: TestClient) -> None:
    operation = bare_client.get("/openapi.json").json()["paths"]["/v1/diagnose"]["post"]
    assert operation["description"]
    content = operation["requestBody"]["content"]["application/json"]
    assert "epochs" in content["schema"]["properties"] and content["schema"]["required"] == ["epochs"]
    for example in content["examples"].values():
        assert bare_client.post("/v1/diagnose", json=example["value"]).status_code == 200
    assert "422" in operation["responses"]


# ---------------------------------------------------------------- live diagnosis in real trials


def test_the_objective_diagnoses_the_history_so_far_and_marks_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-memory history: contract keys only, the trial's epochs as max_epochs, a bounded window."""
    import converge.studies.objective as objective
    from converge.studies.spec import parse_spec

    seen: list[dict[str, Any]] = []

    def spy(history: dict[str, Any]) -> Diagnosis:
        seen.append(json.loads(json.dumps(history)))
        return diagnose(history)

    monkeypatch.setattr(objective, "diagnose", spy)
    monkeypatch.setattr(objective, "MAX_EPOCHS", 3)
    diagnoser = objective.TrialDiagnoser(parse_spec(tiny_spec("unit")), trial_number=4, max_epochs=5)
    for epoch in range(5):
        result = diagnoser.add_epoch({"epoch": epoch, "train_loss": 1.0 / (epoch + 1), "epoch_seconds": 0.5})
        assert result is not None and result["verdict"] in VERDICTS
    assert seen[0]["objective"] == {"metric": "val_loss", "direction": "minimize"}
    assert seen[0]["max_epochs"] == 5
    assert [e["epoch"] for e in seen[-1]["epochs"]] == [2, 3, 4]  # only the latest MAX_EPOCHS epochs
    assert "epoch_seconds" not in seen[-1]["epochs"][0]
    assert diagnoser.last is not None and diagnoser.last[0] == 4


def test_a_failing_diagnosis_is_logged_and_skipped(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    import converge.studies.objective as objective
    from converge.studies.spec import parse_spec

    def broken(history: dict[str, Any]) -> Diagnosis:
        raise RuntimeError("detector bug")

    diagnoser = objective.TrialDiagnoser(parse_spec(tiny_spec("unit")), trial_number=7, max_epochs=3)
    assert diagnoser.add_epoch({"epoch": 0, "train_loss": 1.0}) is not None
    monkeypatch.setattr(objective, "diagnose", broken)
    with caplog.at_level("WARNING", logger="converge.objective"):
        assert diagnoser.add_epoch({"epoch": 1, "train_loss": 0.9}) is None
    assert "trial 7" in caplog.text and "epoch 1" in caplog.text
    assert diagnoser.last is not None and diagnoser.last[0] == 0  # the last one that worked stays


@pytest.mark.slow
def test_every_trial_of_a_sweep_ends_with_a_final_diagnosis_and_a_nan_loss_is_diverged(
        settings: Settings, client: TestClient) -> None:
    from converge.studies.spec import parse_spec
    from converge.studies.sweep import run_sweep

    assert run_sweep(settings, parse_spec(tiny_spec("diag-sweep")), progress=False) == "done"
    trials = client.get("/v1/studies/diag-sweep/trials").json()["trials"]
    with session_scope(get_engine(settings.database_url)) as session:
        rows = repo.diagnoses_by_trial(session, repo.get_study(session, "diag-sweep").id)
    assert sorted(rows) == [t["number"] for t in trials] == [0, 1, 2]
    for trial in trials:
        row = rows[trial["number"]]
        assert row.final is True and row.epoch == trial["params"]["epochs"] - 1
        assert row.verdict in VERDICTS and row.diagnosis["verdict"] == row.verdict
        assert trial["verdict"] == row.verdict and trial["confidence"] == pytest.approx(row.confidence)
        served = client.get(f"/v1/studies/diag-sweep/trials/{trial['number']}/diagnosis").json()
        _assert_diagnosis(served)
        assert served["final"] is True and served["epoch"] == row.epoch

    spec = tiny_spec("diag-diverge", n_trials=1)
    spec["search_space"].update(lr=1e6, epochs=3)  # lr 50 stays finite on this tiny MLP; 1e6 gives a NaN loss
    assert run_sweep(settings, parse_spec(spec), progress=False) == "failed"
    diverged = client.get("/v1/studies/diag-diverge/trials/0/diagnosis").json()
    assert (diverged["verdict"], diverged["healthy"], diverged["final"]) == ("diverged", False, True)
    assert diverged["epoch"] == 0  # a NaN objective stops the trial after the epoch it appears in
    listed = client.get("/v1/studies/diag-diverge/trials", params={"verdict": "diverged"}).json()["trials"]
    assert [(t["number"], t["state"]) for t in listed] == [(0, "failed")]
    # The stored metrics, sent back as they are served, get the same verdict.
    metrics = client.get("/v1/studies/diag-diverge/trials/0/metrics", params={"layout": "history"}).json()
    assert client.post("/v1/diagnose", json=metrics).json()["verdict"] == "diverged"


@pytest.mark.slow
def test_a_diagnosis_that_fails_never_fails_the_trial(settings: Settings, client: TestClient,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    import converge.studies.objective as objective
    from converge.studies.spec import parse_spec
    from converge.studies.sweep import run_sweep

    def broken(history: dict[str, Any]) -> Diagnosis:
        raise RuntimeError("detector bug")

    monkeypatch.setattr(objective, "diagnose", broken)
    with caplog.at_level("WARNING", logger="converge.objective"):
        assert run_sweep(settings, parse_spec(tiny_spec("diag-broken", n_trials=1)), progress=False) == "done"
    (trial,) = client.get("/v1/studies/diag-broken/trials").json()["trials"]
    assert trial["state"] == "complete" and trial["epochs_recorded"] >= 1 and trial["verdict"] is None
    assert "trial 0: the diagnosis failed at epoch 0" in caplog.text and "detector bug" in caplog.text
    missing = client.get("/v1/studies/diag-broken/trials/0/diagnosis")
    assert missing.status_code == 404 and "no diagnosis" in missing.json()["detail"]
