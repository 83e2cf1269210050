"""Cancelling a study: through the repository, the API, the CLI, and against a real worker mid-trial."""

from __future__ import annotations

import subprocess
import time

import pytest
from fastapi.testclient import TestClient

from conftest import CLI, REPO, converge_env, tiny_spec
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.errors import Conflict, NotFound
from converge.core.settings import Settings
from converge.service.api.app import create_app


def test_a_cancelled_study_hands_out_no_more_trials(settings: Settings) -> None:
    client = TestClient(create_app(settings, dashboard=False))
    assert client.post("/v1/studies", json=tiny_spec("to-cancel")).status_code == 201
    engine = get_engine(settings.database_url)
    with session_scope(engine) as session:
        assert repo.claim_trial_slot(session, "to-cancel") is not None
        study = repo.cancel_study(session, "to-cancel")
        assert study.state == "cancelled" and study.finished_at is not None
        assert repo.claim_trial_slot(session, "to-cancel") is None
        assert repo.finish_study_if_complete(session, study.id) is None  # stays cancelled
    with session_scope(engine) as session, pytest.raises(Conflict, match="already cancelled"):
        repo.cancel_study(session, "to-cancel")
    with session_scope(engine) as session, pytest.raises(NotFound):
        repo.cancel_study(session, "no-such-study")


def test_cancel_over_http(settings: Settings) -> None:
    client = TestClient(create_app(settings, dashboard=False))
    client.post("/v1/studies", json=tiny_spec("http-cancel"))
    response = client.post("/v1/studies/http-cancel/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "cancelled" and response.json()["detail"] == "cancelled by a user"
    again = client.post("/v1/studies/http-cancel/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    assert client.post("/v1/studies/nope/cancel").status_code == 404


def test_cancel_from_the_cli(settings: Settings) -> None:
    client = TestClient(create_app(settings, dashboard=False))
    client.post("/v1/studies", json=tiny_spec("cli-cancel"))
    env = converge_env(settings.database_url)
    command = [*CLI, "study", "cancel", "cli-cancel"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "cancelled" in done.stdout
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "already cancelled" in again.stderr and len(again.stderr.splitlines()) == 1


@pytest.mark.slow
def test_cancel_stops_the_running_trial_within_an_epoch(settings: Settings) -> None:
    spec = tiny_spec("long-cancel", n_trials=4)
    spec["search_space"]["epochs"] = {"value": 400}
    # Epochs of 70-100 ms, not tiny_spec's 10-20: the count read before the cancel is sent must stay
    # within an epoch of the count when it lands, however busy the machine (CI saw 3 tiny epochs in between).
    spec["task"]["params"] = {"width": 512, "depth": 3}
    client = TestClient(create_app(settings, dashboard=False))
    client.post("/v1/studies", json=spec)
    worker = subprocess.Popen([*CLI, "worker", "--devices", "cpu", "--exit-when-idle"],
                              cwd=REPO, env=converge_env(settings.database_url), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            trials = client.get("/v1/studies/long-cancel/trials").json()["trials"]
            if trials and trials[0]["epochs_recorded"] >= 2:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the trial never started")
        at_cancel = client.get("/v1/studies/long-cancel/trials").json()["trials"][0]["epochs_recorded"]
        assert client.post("/v1/studies/long-cancel/cancel").status_code == 200
        output, _ = worker.communicate(timeout=120)
    finally:
        worker.kill()
    assert worker.returncode == 0, output
    trials = client.get("/v1/studies/long-cancel/trials").json()["trials"]
    assert len(trials) == 1, "no new trial starts after a cancel"
    (trial,) = trials
    assert trial["state"] == "failed" and "cancelled" in trial["error"]
    assert trial["epochs_recorded"] <= at_cancel + 2  # the epoch under way, then it stops
    assert client.get("/v1/studies/long-cancel").json()["state"] == "cancelled"
