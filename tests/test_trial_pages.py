"""Trial pages, filters and sorting, trial detail with attempts, metrics as columns and CSV, study export:
through the real ASGI app, on SQLite and PostgreSQL.

Studies are filled with Optuna's `create_trial`/`add_trials` and Converge's repository functions
(metrics, diagnoses) rather than by training.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import math
from collections.abc import Iterator
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from optuna.trial import TrialState, create_trial
from sqlalchemy import event
from sqlalchemy.engine import Engine

from conftest import TINY_DISTRIBUTIONS, tiny_spec
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.settings import Settings
from converge.service import auth
from converge.service.api.app import create_app
from converge.studies.retries import CRASHED, settle_dead_attempt
from converge.studies.storage import storage_for

HEALTHY = ("converged", "still_improving")


@pytest.fixture
def client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings, dashboard=False))


def _params(i: int) -> dict[str, Any]:
    return {"lr": round(1e-3 * (1 + i), 6), "batch_size": (64, 128)[i % 2], "epochs": 2 + i % 2,
            "weight_decay": 1e-4, "dropout": 0.0}


def _diagnosis(verdict: str) -> dict[str, Any]:
    return {"verdict": verdict, "healthy": verdict in HEALTHY, "onset_epoch": None, "confidence": 0.75,
            "findings": [{"kind": verdict, "epoch": 0, "evidence": "made up for the test"}], "remedies": [],
            "summary": f"{verdict} (test)"}


def _add(settings: Settings, name: str, trials: list[dict[str, Any]]) -> None:
    """Add trials: each {"state", "value"?, "error"?, "verdict"?, "epochs"?: [metric rows]}."""
    study = optuna.load_study(study_name=name, storage=storage_for(settings))
    start = len(study.get_trials(deepcopy=False))
    made = []
    for i, spec in enumerate(trials, start):
        attrs = {"error": spec["error"]} if "error" in spec else {}
        if spec["state"] == TrialState.PRUNED:
            attrs["converge_pruned_by"] = {"rule": "diverged", "epoch": 1, "reason": "loss is NaN"}
        made.append(create_trial(state=spec["state"], value=spec.get("value"), params=_params(i),
                                 distributions=TINY_DISTRIBUTIONS, user_attrs=attrs,
                                 intermediate_values={0: 1.0, 1: spec["value"]} if spec.get("value") is not None
                                 else {}))
    study.add_trials(made)
    numbers = {t.number: t for t in study.get_trials(deepcopy=False)}
    with session_scope(get_engine(settings.database_url)) as session:
        study_id = repo.get_study(session, name).id
        for i, spec in enumerate(trials, start):
            trial = numbers[i]
            for row in spec.get("epochs", []):
                repo.record_epoch(session, study_id, trial._trial_id, i, row)
            if "verdict" in spec:
                repo.save_diagnosis(session, study_id, trial._trial_id, i, 0, _diagnosis(spec["verdict"]), final=True)


def _submit(client: TestClient, name: str, n_trials: int = 20, direction: str = "minimize") -> None:
    spec = tiny_spec(name, n_trials=n_trials, objective={"metric": "val_loss", "direction": direction})
    assert client.post("/v1/studies", json=spec).status_code == 201


# Twelve trials: completes (one tied, one infinite), pruned ones with a value, a failure, running, waiting.
MIXED = [
    {"state": TrialState.COMPLETE, "value": 0.5, "verdict": "converged"},  # 0
    {"state": TrialState.COMPLETE, "value": 0.2, "verdict": "still_improving"},  # 1
    {"state": TrialState.PRUNED, "value": 0.01, "verdict": "diverged"},  # 2: the lowest value, yet pruned
    {"state": TrialState.FAIL, "error": "RuntimeError: boom", "verdict": "diverged"},  # 3
    {"state": TrialState.COMPLETE, "value": 0.9, "verdict": "overfitting"},  # 4
    {"state": TrialState.COMPLETE, "value": 0.2, "verdict": "converged"},  # 5: tied with 1
    {"state": TrialState.RUNNING, "verdict": "still_improving"},  # 6
    {"state": TrialState.COMPLETE, "value": math.inf},  # 7: infinite
    {"state": TrialState.WAITING},  # 8
    {"state": TrialState.PRUNED, "value": 3.0, "verdict": "diverged"},  # 9
    {"state": TrialState.COMPLETE, "value": -1.5, "verdict": "converged"},  # 10
    {"state": TrialState.COMPLETE, "value": 0.05, "verdict": "underfitting"},  # 11
]


def _pages(client: TestClient, name: str, **params: Any) -> list[dict[str, Any]]:
    """Every page of a listing, following next_cursor; each page as returned."""
    pages, cursor = [], None
    while True:
        response = client.get(f"/v1/studies/{name}/trials", params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        pages.append(response.json())
        cursor = pages[-1]["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100


def _numbers(pages: list[dict[str, Any]]) -> list[int]:
    return [t["number"] for page in pages for t in page["trials"]]


# ---------------------------------------------------------------- pages


def test_paging_with_limit_3_gives_every_trial_once_in_order(client: TestClient, settings: Settings) -> None:
    _submit(client, "paged")
    _add(settings, "paged", MIXED[:10])
    pages = _pages(client, "paged", limit=3)
    assert [[t["number"] for t in p["trials"]] for p in pages] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert {p["total"] for p in pages} == {10}
    assert pages[-1]["next_cursor"] is None

    exact = _pages(client, "paged", limit=5)  # a last page that is exactly full has no cursor after it
    assert [len(p["trials"]) for p in exact] == [5, 5] and exact[-1]["next_cursor"] is None

    default = client.get("/v1/studies/paged/trials").json()
    assert _numbers([default]) == list(range(10)) and default["next_cursor"] is None and default["total"] == 10
    by_number = {t["number"]: t for t in default["trials"]}
    assert by_number[0]["params"] == _params(0) and by_number[0]["value"] == 0.5
    assert by_number[0]["verdict"] == "converged" and by_number[0]["confidence"] == 0.75
    assert by_number[3]["state"] == "failed" and by_number[3]["error"] == "RuntimeError: boom"
    assert by_number[2]["pruned_by"]["rule"] == "diverged"
    assert by_number[7]["value"] == "Infinity"
    assert by_number[8]["state"] == "waiting" and by_number[8]["datetime_start"] is None
    assert by_number[1]["datetime_start"].endswith(("Z", "+00:00")) and by_number[1]["duration_s"] >= 0


def test_filters_by_state_and_verdict_and_their_totals(client: TestClient, settings: Settings) -> None:
    _submit(client, "filtered")
    _add(settings, "filtered", MIXED)
    expected = {
        (("state", "complete"),): [0, 1, 4, 5, 7, 10, 11],
        (("state", "pruned"),): [2, 9],
        (("state", "failed"),): [3],
        (("state", "running"),): [6],
        (("state", "waiting"),): [8],
        (("verdict", "diverged"),): [2, 3, 9],
        (("verdict", "converged"),): [0, 5, 10],
        (("verdict", "oscillating"),): [],
        (("state", "complete"), ("verdict", "converged")): [0, 5, 10],
        (("state", "pruned"), ("verdict", "converged")): [],
    }
    for filters, numbers in expected.items():
        pages = _pages(client, "filtered", limit=2, **dict(filters))
        assert _numbers(pages) == numbers, filters
        assert {p["total"] for p in pages} == {len(numbers)}, filters
        assert all(len(p["trials"]) <= 2 for p in pages)
    for trial in _pages(client, "filtered", verdict="diverged")[0]["trials"]:
        assert trial["verdict"] == "diverged"


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_sort_by_objective_puts_the_best_completed_trials_first(client: TestClient, settings: Settings,
                                                                 direction: str) -> None:
    _submit(client, f"sorted-{direction}", direction=direction)
    _add(settings, f"sorted-{direction}", MIXED)
    complete = [(i, t["value"]) for i, t in enumerate(MIXED) if t["state"] == TrialState.COMPLETE]
    sign = 1 if direction == "minimize" else -1
    best_first = [i for i, _ in sorted(complete, key=lambda iv: (sign * iv[1], iv[0]))]
    rest = [i for i, t in enumerate(MIXED) if t["state"] != TrialState.COMPLETE]  # pruned ones too, by number
    expected = best_first + rest
    assert best_first[:3] == ([10, 11, 1] if direction == "minimize" else [7, 4, 0])  # +inf is best when maximizing
    assert best_first.index(1) + 1 == best_first.index(5)  # a tie goes by number

    one_page = _pages(client, f"sorted-{direction}", sort="objective", limit=1000)
    assert _numbers(one_page) == expected
    small = _pages(client, f"sorted-{direction}", sort="objective", limit=3)
    assert _numbers(small) == expected and len(small) == 4
    assert _numbers(_pages(client, f"sorted-{direction}", sort="objective", state="complete", limit=2)) == best_first
    diverged = _pages(client, f"sorted-{direction}", sort="objective", verdict="diverged", limit=1)
    assert _numbers(diverged) == [2, 3, 9] and diverged[0]["total"] == 3


@pytest.mark.parametrize("sort", ["number", "objective"])
def test_pages_stay_stable_while_trials_are_added(client: TestClient, settings: Settings, sort: str) -> None:
    name = f"growing-{sort}"
    _submit(client, name, n_trials=50)
    _add(settings, name, MIXED)
    snapshot = _numbers(_pages(client, name, sort=sort, limit=1000))
    first = client.get(f"/v1/studies/{name}/trials", params={"sort": sort, "limit": 4}).json()
    assert first["total"] == len(MIXED)

    # New trials: better than everything so far, worse, in between, and unfinished ones.
    complete = TrialState.COMPLETE
    _add(settings, name, [{"state": complete, "value": -100.0}, {"state": complete, "value": 50.0},
                          {"state": complete, "value": 0.3}, {"state": TrialState.RUNNING},
                          {"state": complete, "value": -99.0}])
    seen = [t["number"] for t in first["trials"]]
    cursor = first["next_cursor"]
    while cursor is not None:
        page = client.get(f"/v1/studies/{name}/trials", params={"sort": sort, "limit": 4, "cursor": cursor}).json()
        assert page["total"] == len(MIXED) + 5
        seen += [t["number"] for t in page["trials"]]
        cursor = page["next_cursor"]
    assert len(seen) == len(set(seen)), f"a trial was repeated: {seen}"
    assert [n for n in seen if n in snapshot] == snapshot, "a trial of the first snapshot was skipped or moved"
    if sort == "number":
        assert seen == list(range(len(MIXED) + 5))  # the new trials come after, in order


def _cursor_payload(cursor: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))


def _encode(payload: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def test_bad_inputs_are_422_or_404_with_a_detail(client: TestClient, settings: Settings) -> None:
    _submit(client, "strict")
    _submit(client, "other")
    _add(settings, "strict", MIXED[:6])
    _add(settings, "other", MIXED[:6])
    url = "/v1/studies/strict/trials"
    cursor = client.get(url, params={"limit": 2}).json()["next_cursor"]
    complete_cursor = client.get(url, params={"limit": 2, "state": "complete"}).json()["next_cursor"]
    payload = _cursor_payload(cursor)

    def refused(path: str, params: dict[str, Any], *words: str) -> None:
        response = client.get(path, params=params)
        assert response.status_code == 422, (params, response.text)
        detail = response.json()["detail"]
        assert isinstance(detail, str)
        for word in words:
            assert word in detail, (params, detail)

    for bad in ("not-a-cursor", "!!!", _encode("a string"), _encode({"after": [1]}), _encode([1, 2]),
                base64.urlsafe_b64encode(b"\xff\xfe").decode(), _encode({**payload, "after": ["x"]}),
                _encode({**payload, "after": [1]}), _encode({**payload, "after": [1, 2, 3]}),
                _encode({**payload, "after": [1.5, 2]}), _encode({**payload, "after": {"number": 1}})):
        refused(url, {"cursor": bad}, "cursor is not valid")
    for after in ([1, "x", 2, 3], [True, 0.5, 2, 3], [1, 0.5, 2], [1, 0.5, 2.5, 3], [1, 0.5, 2, None]):
        refused(url, {"cursor": _encode({**payload, "sort": "objective", "after": after}), "sort": "objective"},
                "cursor is not valid")
    refused(url, {"cursor": complete_cursor}, "issued for", "state=complete", "state=any")
    refused(url, {"cursor": cursor, "state": "complete"}, "issued for", "state=any", "state=complete")
    refused(url, {"cursor": cursor, "verdict": "diverged"}, "issued for", "verdict=diverged")
    refused(url, {"cursor": cursor, "sort": "objective"}, "issued for", "sort=number", "sort=objective")
    refused("/v1/studies/other/trials", {"cursor": cursor}, "issued for", "'strict'", "'other'")
    refused(url, {"limit": 0}, "limit")
    refused(url, {"limit": 1001}, "limit")
    refused(url, {"limit": "many"}, "limit")
    refused(url, {"state": "done"}, "state", "complete")
    refused(url, {"verdict": "melted"}, "verdict", "diverged")
    refused(url, {"sort": "value"}, "sort", "objective")
    refused("/v1/studies/strict/trials/0/metrics", {"format": "xml"}, "format", "csv")
    refused("/v1/studies/strict/trials/0/metrics", {"layout": "rows"}, "layout", "history")
    refused("/v1/studies/strict/export", {"format": "xlsx"}, "format", "csv")
    assert client.get(url, params={"cursor": cursor}).status_code == 200  # the cursor itself is fine

    for path in ("/v1/studies/ghost/trials", "/v1/studies/ghost/trials/0", "/v1/studies/ghost/trials/0/metrics",
                 "/v1/studies/ghost/export", "/v1/studies/ghost/export?format=csv"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json() == {"detail": "no study named 'ghost'"}
    for path in ("/v1/studies/strict/trials/99", "/v1/studies/strict/trials/99/metrics",
                 "/v1/studies/strict/trials/99/metrics?format=csv"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json() == {"detail": "study 'strict' has no trial 99"}


# ---------------------------------------------------------------- metrics

EPOCHS = [
    {"epoch": 0, "train_loss": 2.25, "val_loss": 2.0, "val_acc": 0.3, "grad_norm": 1.5, "param_norm": 3.0,
     "lr": 0.01, "epoch_seconds": 0.5},
    {"epoch": 1, "train_loss": 1.5, "val_loss": math.inf, "val_acc": None, "grad_norm": math.nan, "param_norm": 3.25,
     "lr": 0.01, "epoch_seconds": 0.25},
    {"epoch": 2, "train_loss": 1.0, "val_loss": -math.inf, "val_acc": 0.6, "grad_norm": 0.1, "param_norm": None,
     "lr": 0.005, "epoch_seconds": 0.125},
]
COLUMNS = ("epoch", "train_loss", "val_loss", "val_acc", "grad_norm", "param_norm", "lr", "epoch_seconds")


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _csv_value(cell: str) -> Any:
    """A CSV cell back as the JSON has it: empty is null, the non-finite strings stay strings."""
    if cell == "":
        return None
    if cell in ("NaN", "Infinity", "-Infinity"):
        return cell
    number = float(cell)
    return int(number) if number.is_integer() and "." not in cell and "e" not in cell else number


def test_metrics_as_columns_as_a_history_and_as_csv(client: TestClient, settings: Settings) -> None:
    _submit(client, "curves")
    _add(settings, "curves", [{"state": TrialState.COMPLETE, "value": 1.0, "epochs": EPOCHS},
                              {"state": TrialState.RUNNING}])
    url = "/v1/studies/curves/trials/0/metrics"

    columnar = client.get(url)
    assert columnar.status_code == 200, columnar.text
    body = columnar.json()
    assert (body["study"], body["trial"], body["max_epochs"]) == ("curves", 0, _params(0)["epochs"])
    assert body["objective"] == {"metric": "val_loss", "direction": "minimize"}
    assert list(body["columns"]) == list(COLUMNS)
    assert body["columns"] == {c: [_json_value(e[c]) for e in EPOCHS] for c in COLUMNS}
    assert body["columns"]["val_loss"] == [2.0, "Infinity", "-Infinity"]
    assert body["columns"]["grad_norm"][1] == "NaN" and body["columns"]["val_acc"][1] is None

    history = client.get(url, params={"layout": "history"})
    assert history.status_code == 200
    assert history.json()["epochs"] == [{c: _json_value(e[c]) for c in COLUMNS} for e in EPOCHS]
    assert history.json()["max_epochs"] == body["max_epochs"]
    diagnosed = client.post("/v1/diagnose", json=history.json())  # the diagnosis input, as it is
    assert diagnosed.status_code == 200, diagnosed.text
    assert diagnosed.json()["verdict"] and diagnosed.json()["findings"]

    as_csv = client.get(url, headers={"Accept": "text/csv"})
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    assert client.get(url, params={"format": "csv"}).text == as_csv.text
    assert client.get(url, params={"format": "csv", "layout": "history"}).text == as_csv.text
    header, *rows = list(csv.reader(io.StringIO(as_csv.text)))
    assert header == list(COLUMNS)
    assert {c: [_csv_value(row[i]) for row in rows] for i, c in enumerate(header)} == body["columns"]
    assert rows[1][header.index("val_acc")] == ""  # null is an empty cell

    for accept in ("application/xml", "*/*", "application/json, text/csv;q=0.5", "text/csv;q=0"):
        response = client.get(url, headers={"Accept": accept})
        assert response.status_code == 200 and response.json() == body, accept
    assert client.get(url, params={"format": "json"}, headers={"Accept": "text/csv"}).json() == body
    assert client.get(url, headers={"Accept": "text/html, text/csv;q=0.9, application/json;q=0.8"}).text == as_csv.text

    empty = client.get("/v1/studies/curves/trials/1/metrics").json()  # a running trial without epochs yet
    assert empty["columns"] == {c: [] for c in COLUMNS}
    assert client.get("/v1/studies/curves/trials/1/metrics", params={"format": "csv"}).text.strip() == ",".join(COLUMNS)


# ---------------------------------------------------------------- export


def test_export_as_json_and_csv_have_equal_content(client: TestClient, settings: Settings) -> None:
    _submit(client, "exported")
    _add(settings, "exported", [{**t, "epochs": EPOCHS[:2]} if i == 0 else t for i, t in enumerate(MIXED)])

    response = client.get("/v1/studies/exported/export")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    exported = response.json()
    assert exported["study"] == client.get("/v1/studies/exported").json()
    listed = client.get("/v1/studies/exported/trials", params={"limit": 1000}).json()["trials"]
    assert exported["trials"] == listed and len(listed) == len(MIXED)

    as_csv = client.get("/v1/studies/exported/export", headers={"Accept": "text/csv"})
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    assert as_csv.headers["content-disposition"] == 'attachment; filename="exported.csv"'
    assert client.get("/v1/studies/exported/export", params={"format": "csv"}).text == as_csv.text
    header, *rows = list(csv.reader(io.StringIO(as_csv.text)))
    params = sorted(TINY_DISTRIBUTIONS)
    assert header == ["number", "state", "value", *(f"params_{p}" for p in params), "datetime_start",
                      "datetime_complete", "duration_s", "epochs_recorded", "verdict", "confidence", "retry_of",
                      "rerun_as", "repair_of", "repaired_as", "pruned_by", "error"]
    assert len(rows) == len(exported["trials"])
    for row, trial in zip(rows, exported["trials"]):
        cells = dict(zip(header, row))
        for column in header:
            if column.startswith("params_"):
                expected = trial["params"].get(column.removeprefix("params_"))
            elif column == "pruned_by":
                expected = (trial["pruned_by"] or {}).get("rule")
            else:
                expected = trial[column]
            actual = cells[column]
            if isinstance(expected, float | int) and not isinstance(expected, bool) and actual != "":
                assert float(actual) == expected, (trial["number"], column)
            else:
                assert actual == ("" if expected is None else str(expected)), (trial["number"], column)
    assert rows[0][header.index("epochs_recorded")] == "2"
    assert rows[2][header.index("pruned_by")] == "diverged"
    assert rows[7][header.index("value")] == "Infinity"


def test_export_streams_a_study_larger_than_one_read(client: TestClient, settings: Settings,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from converge.service import trial_pages

    monkeypatch.setattr(trial_pages, "EXPORT_PAGE", 4)  # several reads of 4 trials, as 1,000 in production
    _submit(client, "streamed", n_trials=20)
    _add(settings, "streamed", MIXED)
    exported = client.get("/v1/studies/streamed/export").json()
    assert [t["number"] for t in exported["trials"]] == list(range(len(MIXED)))
    rows = list(csv.reader(io.StringIO(client.get("/v1/studies/streamed/export?format=csv").text)))
    assert [int(r[0]) for r in rows[1:]] == list(range(len(MIXED)))


def test_an_empty_study_exports_and_lists_nothing(client: TestClient) -> None:
    _submit(client, "empty")
    assert client.get("/v1/studies/empty/trials").json() == {"trials": [], "next_cursor": None, "total": 0}
    assert client.get("/v1/studies/empty/export").json()["trials"] == []
    assert client.get("/v1/studies/empty/export?format=csv").text.startswith("number,state,value,datetime_start,")


# ---------------------------------------------------------------- trial detail


def test_trial_detail_shows_a_retried_trials_attempts(client: TestClient, settings: Settings) -> None:
    _submit(client, "retried", n_trials=2)
    study = optuna.load_study(study_name="retried", storage=storage_for(settings))
    engine = get_engine(settings.database_url)

    def attempt(epochs: int) -> optuna.Trial:
        with session_scope(engine) as session:
            assert repo.claim_trial_slot(session, "retried") is not None
        trial = study.ask()
        trial.suggest_float("lr", 1e-3, 1e-1, log=True)
        with session_scope(engine) as session:
            study_id = repo.get_study(session, "retried").id
            for epoch in range(epochs):
                repo.record_epoch(session, study_id, trial._trial_id, trial.number,
                                  {"epoch": epoch, "train_loss": 1.0, "epoch_seconds": 0.25 * (trial.number + 1)})
        return trial

    first = attempt(2)
    assert settle_dead_attempt(storage_for(settings), engine, "retried", first._trial_id, CRASHED,
                               "trial process died (exit code -9)") == 1
    second = attempt(1)  # the claim runs the waiting copy
    assert second.number == 1
    assert settle_dead_attempt(storage_for(settings), engine, "retried", second._trial_id, CRASHED,
                               "trial process died (exit code -9)") == 2
    third = attempt(3)
    assert third.number == 2
    study.tell(third, 0.5)
    lone = attempt(1)  # another slot's trial, never rerun
    assert lone.number == 3

    details = {n: client.get(f"/v1/studies/retried/trials/{n}").json() for n in range(4)}
    chain = [(a["number"], a["state"], a["epochs_recorded"]) for a in details[1]["attempts"]]
    assert chain == [(0, "failed", 2), (1, "failed", 1), (2, "complete", 3)]
    assert details[0]["attempts"] == details[1]["attempts"] == details[2]["attempts"]
    errors = [a["error"] for a in details[2]["attempts"]]
    assert errors == ["trial process died (exit code -9); rerun as trial 1",
                      "trial process died (exit code -9); rerun as trial 2", None]
    for a in details[2]["attempts"]:
        assert a["datetime_start"] is not None and a["datetime_complete"] is not None and a["duration_s"] >= 0
    assert (details[1]["retry_of"], details[1]["rerun_as"]) == (0, 2)
    assert details[2]["value"] == 0.5 and details[2]["state"] == "complete"
    assert details[0]["train_seconds"] == 0.5 and details[1]["train_seconds"] == 0.5
    assert details[2]["train_seconds"] == 2.25

    (only,) = details[3]["attempts"]
    assert only == {k: details[3][k] for k in only} and only["state"] == "running"
    assert details[3]["train_seconds"] == 1.0 and details[3]["intermediate_values"] == {}
    listed = {t["number"]: t for t in client.get("/v1/studies/retried/trials").json()["trials"]}
    for n in range(4):  # the detail starts with the list's fields, the same values
        assert {k: details[n][k] for k in listed[n]} == listed[n]


def test_trial_detail_keeps_its_fields(client: TestClient, settings: Settings) -> None:
    _submit(client, "detailed")
    _add(settings, "detailed", [{"state": TrialState.COMPLETE, "value": 0.25, "verdict": "converged",
                                 "epochs": EPOCHS[:1]}])
    detail = client.get("/v1/studies/detailed/trials/0").json()
    assert detail["intermediate_values"] == {"0": 1.0, "1": 0.25}
    assert detail["diagnosis"]["verdict"] == "converged" and detail["diagnosis"]["summary"] == "converged (test)"
    assert detail["params"] == _params(0) and detail["epochs_recorded"] == 1 and detail["train_seconds"] == 0.5
    assert [a["number"] for a in detail["attempts"]] == [0]


@contextlib.contextmanager
def _statements() -> Iterator[list[str]]:
    """Every SQL statement any engine of this process sends meanwhile."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def test_a_page_a_detail_and_metrics_take_a_few_statements_whatever_the_study_size(
        client: TestClient, settings: Settings) -> None:
    """Per request: the token check (one lookup), the study, then statements bounded by the page or
    the trial, as many for 40 trials as for 10,000; a read of the whole study (Optuna's
    `get_all_trials`, every diagnosis of the study) or a query per trial would add statements."""
    _submit(client, "counted", n_trials=40)
    _add(settings, "counted", [{"state": TrialState.COMPLETE, "value": 0.1 * i, "verdict": "converged",
                                "epochs": EPOCHS[:2]} for i in range(30)]
         + [{"state": TrialState.FAIL, "error": "RuntimeError: boom", "verdict": "diverged"}] * 5
         + [{"state": TrialState.PRUNED, "value": 3.0, "verdict": "diverged"}] * 5)
    token, _ = auth.create_token(get_engine(settings.database_url), "read", "counted")
    client.headers["Authorization"] = f"Bearer {token}"
    first = client.get("/v1/studies/counted/trials", params={"limit": 10})  # the token's first use also records it
    assert first.status_code == 200, first.text
    cursor = first.json()["next_cursor"]
    expected = {
        # token, study, the page's rows with their attributes and the total, the page's params
        "/v1/studies/counted/trials?limit=10": 4,
        f"/v1/studies/counted/trials?limit=10&cursor={cursor}": 4,
        "/v1/studies/counted/trials?limit=10&sort=objective&state=complete": 4,
        "/v1/studies/counted/trials?limit=10&verdict=diverged": 4,
        # token, study, the trial's row with its diagnosis and training time, its params, attributes and values
        "/v1/studies/counted/trials/7": 4,
        "/v1/studies/counted/trials/32": 4,  # a failed one
        # token, study, the trial with its epochs param and its metric rows
        "/v1/studies/counted/trials/7/metrics": 3,
        "/v1/studies/counted/trials/7/metrics?layout=history": 3,
        "/v1/studies/counted/trials/7/metrics?format=csv": 3,
    }
    counted = {}
    for path in expected:
        with _statements() as seen:
            response = client.get(path)
        assert response.status_code == 200, (path, response.text)
        counted[path] = len(seen)
    assert counted == expected


# ---------------------------------------------------------------- OpenAPI


def test_openapi_describes_and_exemplifies_the_trial_operations(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    operations = {
        "/v1/studies/{name}/trials": ("TrialPage", False),
        "/v1/studies/{name}/trials/{number}": ("TrialDetail", False),
        "/v1/studies/{name}/trials/{number}/metrics": (None, True),
        "/v1/studies/{name}/export": (None, True),
    }
    for path, (schema, has_csv) in operations.items():
        operation = spec["paths"][path]["get"]
        assert operation["description"], path
        ok = operation["responses"]["200"]["content"]
        json_content = ok["application/json"]
        if schema is not None:
            assert schemas[schema]["examples"], path
        else:
            assert json_content.get("example") or json_content.get("examples"), path
        if has_csv:
            assert ok["text/csv"]["example"].startswith(("epoch,", "number,")), path
            assert "format" in {p["name"] for p in operation["parameters"]}
        assert "422" in operation["responses"] or path.endswith("{number}"), path
    params = {p["name"]: p for p in spec["paths"]["/v1/studies/{name}/trials"]["get"]["parameters"]}
    assert set(params) == {"name", "limit", "cursor", "state", "verdict", "sort"}
    assert params["limit"]["schema"]["maximum"] == 1000 and params["limit"]["schema"]["minimum"] == 1
    for name in ("limit", "cursor", "state", "verdict", "sort"):
        assert params[name]["description"] and params[name]["examples"], name
