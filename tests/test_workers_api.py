"""Worker visibility: `GET /v1/workers` and `converge worker list`, from heartbeats in the database."""

from __future__ import annotations

import subprocess
import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from conftest import CLI, REPO, converge_env, tiny_spec
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.db.models import Worker, utcnow
from converge.core.settings import Settings
from converge.service.api.app import create_app


def test_a_worker_without_a_recent_heartbeat_is_not_alive(settings: Settings) -> None:
    with session_scope(get_engine(settings.database_url)) as session:
        repo.register_worker(session, "fresh", "host-a", 11, "cpu", 2)
        repo.register_worker(session, "stale", "host-b", 12, "cuda:0,cuda:1", 2)
        session.flush()
        session.execute(update(Worker).where(Worker.id == "stale")
                        .values(last_heartbeat=utcnow() - timedelta(seconds=settings.grace_period_s + 5)))
    workers = {w["id"]: w for w in TestClient(create_app(settings, dashboard=False)).get("/v1/workers").json()}
    assert workers["fresh"]["alive"] is True and workers["fresh"]["devices"] == "cpu"
    assert workers["stale"]["alive"] is False and workers["stale"]["host"] == "host-b"
    assert workers["fresh"]["current_trials"] == []


@pytest.mark.slow
def test_a_running_worker_shows_its_trial_then_stops(settings: Settings) -> None:
    spec = tiny_spec("watched", n_trials=1)
    spec["search_space"]["epochs"] = {"value": 200}
    client = TestClient(create_app(settings, dashboard=False))
    client.post("/v1/studies", json=spec)
    env = converge_env(settings.database_url)
    worker = subprocess.Popen([*CLI, "worker", "--devices", "cpu", "--exit-when-idle"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = None
        deadline = time.monotonic() + 120
        while seen is None and time.monotonic() < deadline:
            for w in client.get("/v1/workers").json():
                if w["current_trials"] and w["current_trials"][0]["trial"] is not None:
                    seen = w
            time.sleep(0.2)
        assert seen is not None, "the worker never reported its trial"
        assert seen["alive"] and seen["state"] == "running" and seen["slots"] == 1 and seen["devices"] == "cpu"
        assert seen["current_trials"][0] == {"study": "watched", "trial": 0, "device": "cpu", "slot": 0}
        listing = subprocess.run([*CLI, "worker", "list"], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=60)
        assert listing.returncode == 0, listing.stderr
        assert "watched#0@cpu" in listing.stdout and str(seen["pid"]) in listing.stdout
        client.post("/v1/studies/watched/cancel")
        output, _ = worker.communicate(timeout=120)
    finally:
        worker.kill()
    assert worker.returncode == 0, output
    (after,) = client.get("/v1/workers").json()
    assert after["state"] == "stopped" and after["alive"] is False and after["current_trials"] == []
