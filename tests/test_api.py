"""The REST API through the real ASGI app, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import jsonschema_rs
import pytest
from fastapi.testclient import TestClient

from conftest import tiny_spec
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.settings import Settings
from converge.service.api.app import create_app


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


@pytest.mark.parametrize("n_trials, accepted", [(1, True), (10_000, True), (0, False), (10_001, False), (-3, False)])
def test_n_trials_must_be_within_1_and_10000(client: TestClient, n_trials: int, accepted: bool) -> None:
    response = client.post("/v1/studies", json=tiny_spec(f"trials-{n_trials}", n_trials=n_trials))
    if accepted:
        assert response.status_code == 201 and response.json()["n_trials"] == n_trials
    else:
        assert response.status_code == 422
        assert response.json()["problems"] == [f"n_trials: n_trials must be between 1 and 10000, got {n_trials}"]


@pytest.mark.parametrize("name", ["", "a" * 101, "a/b", "a b", "é", "a\u0000b", "../x"])
def test_the_name_pattern_is_enforced(client: TestClient, name: str) -> None:
    response = client.post("/v1/studies", json=tiny_spec(name))
    assert response.status_code == 422
    assert response.json()["problems"] == [f"name: name {name!r} must be 1-100 characters of A-Z a-z 0-9 . _ -"]


def test_names_of_1_to_100_allowed_characters_are_taken(client: TestClient) -> None:
    for name in ("a", "A-Za-z0-9._", "x" * 100):
        assert client.post("/v1/studies", json=tiny_spec(name)).status_code == 201, name
        assert client.get(f"/v1/studies/{name}").status_code == 200, name
    assert client.get(f"/v1/studies/{'x' * 101}").status_code == 422  # the path says the same


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


OPERATIONS = {"/v1/studies", "/v1/studies/{name}", "/v1/studies/{name}/cancel", "/v1/studies/{name}/diagnosis",
              "/v1/studies/{name}/trials", "/v1/studies/{name}/trials/{number}",
              "/v1/studies/{name}/trials/{number}/metrics", "/v1/studies/{name}/trials/{number}/diagnosis",
              "/v1/studies/{name}/trials/{number}/repair", "/v1/studies/{name}/export", "/v1/diagnose", "/v1/workers",
              "/v1/studies/{name}/plot", "/v1/studies/{name}/trials/{number}/plot",
              "/v1/schedules", "/v1/schedules/{schedule_id}", "/v1/schedules/{schedule_id}/runs",
              "/v1/schedules/{schedule_id}/run-now",
              "/v1/studies/{name}/trials/{number}/artifacts", "/v1/studies/{name}/artifacts/{artifact_id}",
              "/v1/health"}


def _examples(media: dict[str, Any], schemas: dict[str, Any]) -> list[Any]:
    """A media type's examples: its own (`example`, `examples`), else those of its schema (a `$ref` followed)."""
    found = [media["example"]] if "example" in media else []
    found += [e["value"] for e in media.get("examples", {}).values()]
    schema = media.get("schema", {})
    while "$ref" in schema:
        schema = schemas[schema["$ref"].rsplit("/", 1)[-1]]
    return found or list(schema.get("examples", []))


def _validator(schema: dict[str, Any], components: dict[str, Any]) -> Any:
    return jsonschema_rs.validator_for({**schema, "components": components})


def test_openapi_is_complete(client: TestClient) -> None:
    """Every operation: a summary and a description; examples of its 2xx bodies and of its request body, each
    valid against its schema (nulls included); a schema for every error, 422 wherever it takes input, 413
    wherever it takes a body, 503 everywhere (the database)."""
    spec = client.get("/openapi.json").json()
    components, schemas = spec["components"], spec["components"]["schemas"]
    assert set(spec["paths"]) == OPERATIONS
    assert "1,048,576 bytes (`CONVERGE_MAX_BODY_BYTES`) is a 413" in spec["info"]["description"]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            assert operation.get("summary") and operation.get("description"), f"{where} has no summary/description"
            responses = operation["responses"]
            takes_input = bool(operation.get("parameters") or operation.get("requestBody"))
            assert ("422" in responses) == takes_input, f"{where}: 422 documented iff it takes input"
            assert ("413" in responses) == ("requestBody" in operation), f"{where}: 413 iff it takes a body"
            assert "503" in responses, where
            for media in operation.get("requestBody", {}).get("content", {}).values():
                examples = [e["value"] for e in media.get("examples", {}).values()]
                assert examples, f"{where} has no example of its request body"
                for example in examples:
                    assert _validator(media["schema"], components).is_valid(example), (where, example)
            for status, response in responses.items():
                content = response.get("content", {})
                assert response.get("description") and content, f"{where} {status} has no description or schema"
                if status.startswith("2"):
                    assert "application/json" in content, f"{where} {status}"
                if status[0] in "45":
                    schema = content["application/json"]["schema"]
                    model = {"422": "ProblemsOut", "503": "HealthOut" if path == "/v1/health" else "ErrorOut"}
                    assert schema == {"$ref": f"#/components/schemas/{model.get(status, 'ErrorOut')}"}, (where, status)
                for media_type, media in content.items():
                    examples = _examples(media, schemas)
                    if status.startswith("2"):
                        assert examples, f"{where} {status} {media_type} has no example"
                    validator = _validator(media["schema"], components)
                    for example in examples:
                        errors = [e.message for e in validator.iter_errors(example)]
                        assert not errors, (where, status, media_type, errors[:3])


def test_non_finite_metrics_are_sent_as_strings(client: TestClient, settings: Settings) -> None:
    import optuna

    from converge.studies.storage import storage_for

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


# ---------------------------------------------------------------- found by fuzzing (tests/test_fuzz.py) and probing


@pytest.mark.parametrize("path, what", [("/v1/studies", "study spec"), ("/v1/diagnose", "history")])
def test_a_body_that_is_not_utf8_or_nested_too_deeply_is_a_422_saying_so(client: TestClient, path: str,
                                                                        what: str) -> None:
    """Was FastAPI's bare 400 "There was an error parsing the body", a status no operation documented."""
    for body, words in ((b'{"name": "\xe9t\xe9"}', "not UTF-8 text (invalid continuation byte at byte 10)"),
                        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply")):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        (problem,) = response.json()["problems"]
        assert words in problem and response.json()["detail"].startswith(f"invalid {what} (1 problem)")


def test_a_bad_query_parameter_is_not_called_an_invalid_study_spec(client: TestClient) -> None:
    """GET /v1/studies?state=... said "invalid study spec": the 422 named POST's body for the path's GET."""
    response = client.get("/v1/studies", params={"state": "sleeping"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("invalid request (1 problem)")
    assert response.json()["problems"] == [
        "query.state: Input should be 'queued', 'running', 'done', 'cancelled' or 'failed'"]


def test_every_422_has_detail_and_problems(client: TestClient) -> None:
    """A 422 raised by the service (a bad cursor) had no `problems`, unlike the others and the documented schema."""
    client.post("/v1/studies", json=tiny_spec("cursed"))
    response = client.get("/v1/studies/cursed/trials", params={"cursor": "not-a-cursor"})
    assert response.status_code == 422
    assert set(response.json()) == {"detail", "problems"}
    assert response.json()["problems"] == [response.json()["detail"]]


def test_a_trial_number_beyond_optunas_integers_is_a_422_not_a_500(client: TestClient) -> None:
    """Trial numbers past 2**31 - 1 (PostgreSQL's INTEGER; past 2**63 on SQLite) failed to bind: a 500."""
    client.post("/v1/studies", json=tiny_spec("numbered"))
    base = "/v1/studies/numbered/trials"
    for number in (2**31, 2**63, 10**23):
        for method, path in (("GET", f"{base}/{number}"), ("GET", f"{base}/{number}/metrics"),
                             ("GET", f"{base}/{number}/diagnosis"), ("POST", f"{base}/{number}/repair")):
            response = client.request(method, path)
            assert response.status_code == 422, (path, response.text)
            assert response.json()["problems"] == ["path.number: Input should be less than or equal to 2147483647"]
    assert client.get(f"{base}/{2**31 - 1}").json() == {"detail": f"study 'numbered' has no trial {2**31 - 1}"}


@pytest.mark.parametrize("sort, after", [("number", [2**31, 1]), ("number", [1, 10**23]),
                                         ("objective", [1, 0.5, 2**63, 1]), ("objective", [1, 10**400, 1, 1])])
def test_a_cursor_with_numbers_no_page_issues_is_a_422_not_a_500(client: TestClient, sort: str,
                                                                 after: list[int | float]) -> None:
    """Integers past the database's in a hand-made cursor failed to bind: a 500."""
    client.post("/v1/studies", json=tiny_spec("paged"))
    payload = {"study": "paged", "sort": sort, "state": None, "verdict": None, "after": after}
    cursor = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    response = client.get("/v1/studies/paged/trials", params={"cursor": cursor, "sort": sort})
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("cursor is not valid")


def test_a_large_integer_sort_value_in_a_cursor_reads_as_a_float(client: TestClient) -> None:
    client.post("/v1/studies", json=tiny_spec("paged"))
    payload = {"study": "paged", "sort": "objective", "state": None, "verdict": None, "after": [1, 10**23, 0, 1]}
    cursor = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    response = client.get("/v1/studies/paged/trials", params={"cursor": cursor, "sort": "objective"})
    assert response.status_code == 200 and response.json()["trials"] == []
