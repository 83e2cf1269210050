"""`converge worker` as a real process: claims, runs each trial in a child, finishes studies."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from conftest import start_worker, tiny_spec
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.settings import Settings
from converge.service.api.app import create_app

pytestmark = pytest.mark.slow


def test_worker_runs_a_study_submitted_through_the_api(settings: Settings) -> None:
    client = TestClient(create_app(settings))
    assert client.post("/v1/studies", json=tiny_spec("via-worker", n_trials=3)).status_code == 201
    worker = start_worker(settings.database_url, "--slots-per-device", "2", "--exit-when-idle")
    output, _ = worker.communicate(timeout=240)
    assert worker.returncode == 0, output

    study = client.get("/v1/studies/via-worker").json()
    assert study["state"] == "done", output
    assert study["trials"]["complete"] == 3 and study["best"] is not None
    trials = client.get("/v1/studies/via-worker/trials").json()["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2]
    for trial in trials:
        assert trial["epochs_recorded"] == trial["params"]["epochs"]
        metrics = client.get(f"/v1/studies/via-worker/trials/{trial['number']}/metrics").json()
        assert metrics["columns"]["epoch"] == list(range(trial["params"]["epochs"]))
        assert metrics["objective"] == {"metric": "val_loss", "direction": "minimize"}
        detail = client.get(f"/v1/studies/via-worker/trials/{trial['number']}").json()
        assert detail["user_attrs"]["converge_worker_pid"] != worker.pid  # ran in a slot process
    pids = {client.get(f"/v1/studies/via-worker/trials/{n}").json()["user_attrs"]["converge_worker_pid"]
            for n in range(3)}
    assert len(pids) <= 2  # two slot processes, each running trial after trial
    with session_scope(get_engine(settings.database_url)) as session:
        (record,) = repo.list_workers(session)
        assert record.state == "stopped" and record.slots == 2 and record.devices == "cpu"


def test_four_racing_workers_run_exactly_n_trials(settings: Settings) -> None:
    """Four worker processes claim from one study at once: never more trials than `n_trials`."""
    client = TestClient(create_app(settings))
    client.post("/v1/studies", json=tiny_spec("raced", n_trials=6))
    workers = [start_worker(settings.database_url, "--exit-when-idle") for _ in range(4)]
    outputs = [w.communicate(timeout=280)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    trials = client.get("/v1/studies/raced/trials").json()["trials"]
    assert [t["number"] for t in trials] == list(range(6))
    assert all(t["state"] == "complete" for t in trials), trials
    assert client.get("/v1/studies/raced").json()["state"] == "done"
    pids = {client.get(f"/v1/studies/raced/trials/{t['number']}").json()["user_attrs"]["converge_worker_pid"]
            for t in trials}
    assert not pids & {w.pid for w in workers}  # trials ran in the workers' slot processes


def test_slot_processes_run_at_a_lower_cpu_priority_with_their_startup_heap_frozen(settings: Settings) -> None:
    import os
    import re

    TestClient(create_app(settings)).post("/v1/studies", json=tiny_spec("niced", n_trials=1))
    worker = start_worker(settings.database_url, "--exit-when-idle", CONVERGE_SLOT_NICE="7")
    output, _ = worker.communicate(timeout=240)
    assert worker.returncode == 0, output
    ready = re.search(r"slot process \d+ ready on cpu: nice (\d+), .* (\d+) startup objects frozen", output)
    assert ready is not None, output
    # the slot's niceness as it read it itself: the worker's own (this test's) plus 7, at most 19
    assert int(ready.group(1)) == min(os.nice(0) + 7, 19) and int(ready.group(2)) > 10_000
