"""The REST API through the real ASGI app, on SQLite and PostgreSQL."""

from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient

from conftest import tiny_spec
from service.api.app import create_app
from service.db import repo
from service.db.engine import get_engine, session_scope
from service.settings import Settings


@pytest.fixture
def client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings))


def test_submit_list_and_get_a_study(client: TestClient) -> None:
    created = client.post("/v1/studies", json=tiny_spec("api-one"))
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == "api-one" and body["state"] == "queued" and body["n_trials"] == 3
    assert body["trials"] == {"running": 0, "waiting": 0, "complete": 0, "pruned": 0, "failed": 0, "rerun": 0}
    assert body["best"] is None
    assert body["spec"]["search_space"]["weight_decay"] == {"value": 1e-4}

    listed = client.get("/v1/studies").json()
    assert [s["name"] for s in listed] == ["api-one"]
    assert client.get("/v1/studies", params={"state": "done"}).json() == []
    assert client.get("/v1/studies/api-one").json()["name"] == "api-one"
    assert client.get("/v1/studies/api-one/trials").json() == {"trials": [], "next_cursor": None, "total": 0}


def test_invalid_spec_is_a_422_listing_every_problem_and_writes_nothing(client: TestClient,
                                                                         settings: Settings) -> None:
    bad = tiny_spec("bad name", n_trials=0)
    bad["search_space"]["lr"] = {"low": 1, "high": 0.1}
    bad["pruner"] = {"name": "nope"}
    response = client.post("/v1/studies", json=bad)
    assert response.status_code == 422
    body = response.json()
    assert body["detail"].startswith("invalid study spec (4 problems)")
    assert set(body["problems"]) == {
        "name: name 'bad name' must be 1-100 characters of A-Z a-z 0-9 . _ -",
        "search_space.lr: low (1) must be below high (0.1); use {value: x} to fix a value",
        "n_trials: n_trials must be between 1 and 10000, got 0",
        "pruner.name: unknown pruner 'nope'; known pruners: convergence, none, median, hyperband, sha",
    }
    with session_scope(get_engine(settings.database_url)) as session:
        assert repo.count_studies(session) == 0
    assert client.get("/api/studies").json()["study_summaries"] == []  # no Optuna study either


@pytest.mark.parametrize("body", ["not json", "[1, 2]", '{"n_trials": 3}'])
def test_malformed_bodies_are_4xx_with_a_detail(client: TestClient, body: str) -> None:
    response = client.post("/v1/studies", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], str)


def test_duplicate_name_is_409(client: TestClient) -> None:
    assert client.post("/v1/studies", json=tiny_spec("twice")).status_code == 201
    again = client.post("/v1/studies", json=tiny_spec("twice"))
    assert again.status_code == 409
    assert again.json() == {"detail": "a study named 'twice' already exists"}


def test_unknown_study_and_trial_are_404(client: TestClient) -> None:
    for path in ("/v1/studies/ghost", "/v1/studies/ghost/trials", "/v1/studies/ghost/trials/0",
                 "/v1/studies/ghost/trials/0/metrics", "/v1/studies/ghost/trials/0/diagnosis",
                 "/v1/studies/ghost/export"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["detail"] == "no study named 'ghost'"
    client.post("/v1/studies", json=tiny_spec("real"))
    assert client.get("/v1/studies/real/trials/5").json() == {"detail": "study 'real' has no trial 5"}
    assert client.get("/v1/studies/real/trials/5/metrics").json() == {"detail": "study 'real' has no trial 5"}
    assert client.get("/v1/studies/real/trials/5/diagnosis").json() == {"detail": "study 'real' has no trial 5"}
    assert client.get("/v1/studies/real/trials/-1").status_code == 422


def test_health(client: TestClient) -> None:
    response = client.get("/v1/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_health_is_503_before_db_upgrade(empty_db_url: str) -> None:
    client = TestClient(create_app(Settings(database_url=empty_db_url)))
    response = client.get("/v1/health")
    assert response.status_code == 503
    assert "converge db upgrade" in response.json()["database"]


def test_openapi_describes_every_operation(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {"/v1/studies", "/v1/studies/{name}", "/v1/studies/{name}/cancel",
                          "/v1/studies/{name}/diagnosis", "/v1/studies/{name}/trials",
                          "/v1/studies/{name}/trials/{number}", "/v1/studies/{name}/trials/{number}/metrics",
                          "/v1/studies/{name}/trials/{number}/diagnosis", "/v1/studies/{name}/trials/{number}/repair",
                          "/v1/studies/{name}/export", "/v1/diagnose", "/v1/workers", "/v1/health"}
    for path, operations in paths.items():
        for method, operation in operations.items():
            assert operation.get("description"), f"{method.upper()} {path} has no description"


def test_non_finite_metrics_are_sent_as_strings(client: TestClient, settings: Settings) -> None:
    import optuna

    from studies.storage import storage_for

    client.post("/v1/studies", json=tiny_spec("nan-study", n_trials=1))
    study = optuna.load_study(study_name="nan-study", storage=storage_for(settings))
    trial = study.ask()
    with session_scope(get_engine(settings.database_url)) as session:
        study_id = repo.get_study(session, "nan-study").id
        repo.record_epoch(session, study_id, trial._trial_id, trial.number,
                          {"epoch": 0, "train_loss": 2.0, "val_loss": math.inf, "grad_norm": math.nan})
    metrics = client.get("/v1/studies/nan-study/trials/0/metrics")
    assert metrics.status_code == 200, metrics.text
    columns = metrics.json()["columns"]
    assert columns["train_loss"] == [2.0] and columns["val_loss"] == ["Infinity"] and columns["grad_norm"] == ["NaN"]
    (epoch,) = client.get("/v1/studies/nan-study/trials/0/metrics", params={"layout": "history"}).json()["epochs"]
    assert epoch["train_loss"] == 2.0 and epoch["val_loss"] == "Infinity" and epoch["grad_norm"] == "NaN"
    assert client.get("/v1/studies/nan-study/trials").json()["trials"][0]["state"] == "running"
