"""`converge worker` as a real process: claims, runs each trial in a child, finishes studies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from fastapi.testclient import TestClient

from conftest import REPO, converge_env, tiny_spec
from service.api.app import create_app
from service.db import repo
from service.db.engine import get_engine, session_scope
from service.settings import Settings
from studies.storage import storage_for

pytestmark = pytest.mark.slow


def _worker(db_url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--devices", "cpu", *args],
                            cwd=REPO, env=converge_env(db_url), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_worker_runs_a_study_submitted_through_the_api(settings: Settings) -> None:
    client = TestClient(create_app(settings))
    assert client.post("/v1/studies", json=tiny_spec("via-worker", n_trials=3)).status_code == 201
    worker = _worker(settings.database_url, "--slots-per-device", "2", "--exit-when-idle")
    output, _ = worker.communicate(timeout=240)
    assert worker.returncode == 0, output

    study = client.get("/v1/studies/via-worker").json()
    assert study["state"] == "done", output
    assert study["trials"]["complete"] == 3 and study["best"] is not None
    trials = client.get("/v1/studies/via-worker/trials").json()
    assert [t["number"] for t in trials] == [0, 1, 2]
    for trial in trials:
        assert trial["epochs_recorded"] == trial["params"]["epochs"]
        metrics = client.get(f"/v1/studies/via-worker/trials/{trial['number']}/metrics").json()
        assert [e["epoch"] for e in metrics["epochs"]] == list(range(trial["params"]["epochs"]))
        assert metrics["objective"] == {"metric": "val_loss", "direction": "minimize"}
        detail = client.get(f"/v1/studies/via-worker/trials/{trial['number']}").json()
        assert detail["user_attrs"]["converge_worker_pid"] != worker.pid  # ran in a child process
    with session_scope(get_engine(settings.database_url)) as session:
        (record,) = repo.list_workers(session)
        assert record.state == "stopped" and record.slots == 2 and record.devices == "cpu"


def test_a_killed_trial_process_fails_its_trial_and_the_study_goes_on(settings: Settings) -> None:
    spec = tiny_spec("killed", n_trials=2)
    spec["search_space"]["epochs"] = {"value": 40}
    client = TestClient(create_app(settings))
    client.post("/v1/studies", json=spec)
    worker = _worker(settings.database_url, "--exit-when-idle")
    storage = storage_for(settings)
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline:
        trials = optuna.load_study(study_name="killed", storage=storage).get_trials(deepcopy=False)
        running = [t for t in trials if t.state.name == "RUNNING" and "converge_worker_pid" in t.user_attrs]
        if running and client.get("/v1/studies/killed/trials").json()[0]["epochs_recorded"] >= 1:
            victim = running[0]
        time.sleep(0.2)
    assert victim is not None, "no trial started"
    os.kill(victim.user_attrs["converge_worker_pid"], signal.SIGKILL)
    output, _ = worker.communicate(timeout=240)
    assert worker.returncode == 0, output

    trials = client.get("/v1/studies/killed/trials").json()
    assert trials[0]["state"] == "failed"
    assert trials[0]["error"] == "trial process died (exit code -9)"
    assert trials[0]["epochs_recorded"] >= 1  # its partial metrics are kept
    assert trials[0]["verdict"] is not None  # and its diagnosis, marked final by the worker
    assert client.get("/v1/studies/killed/trials/0/diagnosis").json()["final"] is True
    assert trials[1]["state"] == "complete"
    assert client.get("/v1/studies/killed").json()["state"] == "done"


def test_sigterm_lets_the_running_trial_finish_and_exits(settings: Settings) -> None:
    client = TestClient(create_app(settings))
    client.post("/v1/studies", json=tiny_spec("graceful", n_trials=5))
    worker = _worker(settings.database_url)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if client.get("/v1/studies/graceful").json()["trials"]["running"] >= 1:
            break
        time.sleep(0.2)
    worker.send_signal(signal.SIGTERM)
    output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, output
    counts = client.get("/v1/studies/graceful").json()["trials"]
    assert counts["running"] == 0 and counts["complete"] >= 1
    assert counts["complete"] < 5  # it stopped claiming


def test_four_racing_workers_run_exactly_n_trials(settings: Settings) -> None:
    """Four worker processes claim from one study at once: never more trials than `n_trials`."""
    client = TestClient(create_app(settings))
    client.post("/v1/studies", json=tiny_spec("raced", n_trials=6))
    workers = [_worker(settings.database_url, "--exit-when-idle") for _ in range(4)]
    outputs = [w.communicate(timeout=280)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    trials = client.get("/v1/studies/raced/trials").json()
    assert [t["number"] for t in trials] == list(range(6))
    assert all(t["state"] == "complete" for t in trials), trials
    assert client.get("/v1/studies/raced").json()["state"] == "done"
    pids = {client.get(f"/v1/studies/raced/trials/{t['number']}").json()["user_attrs"]["converge_worker_pid"]
            for t in trials}
    assert len(pids) == 6  # each trial in a child process of its own
