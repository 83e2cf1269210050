"""`GET /metrics` (Prometheus text format, read from the database) and JSON logs."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from test_plots import _seed

from conftest import CLI, REPO, converge_env
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.logs import JsonFormatter
from converge.core.settings import Settings
from converge.service import auth
from converge.service.api.app import create_app

SAMPLE = re.compile(r'^([a-z_]+)(\{[^}]*\})? (-?[0-9.e+]+|\+Inf)$')


def _samples(text: str) -> dict[str, float]:
    """Every sample line, `name{labels}` -> value; the format itself checked line by line."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def test_metrics_count_studies_trials_workers_and_durations(settings: Settings) -> None:
    _seed(settings, "measured")  # 2 complete, 1 pruned, 1 waiting; 6 epochs each for three trials
    engine = get_engine(settings.database_url)
    with session_scope(engine) as session:
        repo.register_worker(session, "host-1-abc", "host", 1, "cpu", 2)
        repo.heartbeat_worker(session, "host-1-abc", [{"study": "measured", "trial_id": 1, "device": "cpu",
                                                      "slot": 0}])
    client = TestClient(create_app(settings, dashboard=False))
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    s = _samples(response.text)
    assert s['converge_studies{state="queued"}'] == 1 and s['converge_studies{state="done"}'] == 0
    assert (s['converge_trials{state="complete"}'], s['converge_trials{state="pruned"}'],
            s['converge_trials{state="waiting"}'], s['converge_trials{state="running"}']) == (2, 1, 1, 0)
    assert s['converge_workers{alive="true"}'] == 1 and s['converge_worker_running_trials{worker="host-1-abc"}'] == 1
    assert any(k.startswith('converge_worker_last_heartbeat_timestamp_seconds{worker="host-1-abc"') for k in s)
    assert s["converge_trial_duration_seconds_count"] == 3  # the waiting trial has not ended
    assert s['converge_trial_duration_seconds_bucket{le="+Inf"}'] == 3
    assert s["converge_epoch_duration_seconds_count"] == 0  # the seeded epochs carry no duration
    assert "# TYPE converge_epoch_duration_seconds histogram" in response.text


def test_metrics_need_a_read_token_once_one_exists(settings: Settings) -> None:
    client = TestClient(create_app(settings, dashboard=False))
    assert client.get("/metrics").status_code == 200  # open while no token exists, like the API
    token, _ = auth.create_token(get_engine(settings.database_url), "read", "prometheus")
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]  # not JSON: not in the API's contract


def test_json_logs_are_one_object_per_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("converge.worker", logging.ERROR, __file__, 1, "trial %d failed", (7,),
                                   sys.exc_info())
    entry = json.loads(JsonFormatter("slot cpu").format(record))
    assert entry["message"] == "trial 7 failed" and entry["level"] == "ERROR" and entry["logger"] == "converge.worker"
    assert entry["component"] == "slot cpu" and "ValueError: boom" in entry["exception"] and entry["time"]


@pytest.mark.slow  # a real worker: its slot process imports torch
def test_converge_commands_log_json_when_asked(db_url: str) -> None:
    done = subprocess.run([*CLI, "worker", "--devices", "cpu", "--exit-when-idle"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=converge_env(db_url, CONVERGE_LOG_FORMAT="json"))
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and all(json.loads(line)["level"] for line in lines), done.stderr
