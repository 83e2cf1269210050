"""Real workers killed mid-trial: the trial is failed, rerun, the study still ends with exactly n_trials.

SIGKILL of a slot process (its worker notices at once), SIGKILL of a whole worker (the
trial's heartbeat stops; another worker fails and reruns it after the grace period), and
SIGTERM (the trial stops at its epoch's end, is rerun elsewhere, the worker exits in time).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from conftest import start_worker, tiny_spec
from converge.core.db.engine import get_engine
from converge.core.settings import Settings
from converge.service.api.app import create_app

pytestmark = pytest.mark.slow

N_TRIALS = 3


def _long_spec(name: str) -> dict[str, Any]:
    spec = tiny_spec(name, n_trials=N_TRIALS)
    spec["search_space"]["epochs"] = {"value": 60}  # a few seconds a trial: time to kill one mid-way
    return spec


def _running_trial(client: TestClient, name: str, min_epochs: int = 1, timeout_s: float = 120) -> dict[str, Any]:
    """The first trial seen running with at least `min_epochs` epochs recorded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for trial in client.get(f"/v1/studies/{name}/trials").json()["trials"]:
            if trial["state"] == "running" and trial["epochs_recorded"] >= min_epochs:
                return client.get(f"/v1/studies/{name}/trials/{trial['number']}").json()
        time.sleep(0.1)
    raise AssertionError(f"no trial of {name} ran {min_epochs} epoch(s) within {timeout_s} s")


def _assert_exactly_n_with_one_rerun(client: TestClient, name: str, victim: dict[str, Any]) -> None:
    study = client.get(f"/v1/studies/{name}").json()
    trials = client.get(f"/v1/studies/{name}/trials").json()["trials"]
    assert study["state"] == "done", (study, [(t["number"], t["state"], t["error"]) for t in trials])
    assert not [t for t in trials if t["state"] in ("running", "waiting")]
    assert [t["state"] for t in trials].count("complete") == N_TRIALS
    assert len(trials) == N_TRIALS + 1
    attempt = trials[victim["number"]]
    assert attempt["state"] == "failed" and attempt["epochs_recorded"] >= 1  # its partial metrics are kept
    assert client.get(f"/v1/studies/{name}/trials/{victim['number']}/diagnosis").json()["final"] is True
    (rerun,) = [t for t in trials if t["number"] == attempt["rerun_as"]]
    assert rerun["state"] == "complete" and rerun["params"] == attempt["params"]
    assert rerun["retry_of"] == victim["number"]


def _finish_with_a_second_worker(settings: Settings, client: TestClient, name: str, victim: dict[str, Any]) -> None:
    """Another worker runs the study to its end: exactly n_trials, the victim's rerun among them."""
    second = start_worker(settings.database_url, "--exit-when-idle")
    output, _ = second.communicate(timeout=240)
    assert second.returncode == 0, output
    _assert_exactly_n_with_one_rerun(client, name, victim)


def test_a_killed_slot_process_has_its_trial_rerun(settings: Settings) -> None:
    client = TestClient(create_app(settings))
    client.post("/v1/studies", json=_long_spec("killed-slot"))
    worker = start_worker(settings.database_url, "--exit-when-idle")
    victim = _running_trial(client, "killed-slot")
    os.kill(victim["user_attrs"]["converge_worker_pid"], signal.SIGKILL)
    output, _ = worker.communicate(timeout=240)
    assert worker.returncode == 0, output

    _assert_exactly_n_with_one_rerun(client, "killed-slot", victim)
    error = client.get(f"/v1/studies/killed-slot/trials/{victim['number']}").json()["error"]
    assert error.startswith("trial process died (exit code -9); rerun as trial ")


def test_a_killed_worker_has_its_trial_failed_after_the_grace_period_and_rerun(settings: Settings) -> None:
    client = TestClient(create_app(settings))
    client.post("/v1/studies", json=_long_spec("killed-worker"))
    first = start_worker(settings.database_url, new_session=True)
    victim = _running_trial(client, "killed-worker")
    os.killpg(first.pid, signal.SIGKILL)  # the worker and its slot processes, at once
    first.communicate(timeout=30)
    assert client.get(f"/v1/studies/killed-worker/trials/{victim['number']}").json()["state"] == "running"

    time.sleep(settings.grace_period_s + 1)  # its heartbeat is now stale
    _finish_with_a_second_worker(settings, client, "killed-worker", victim)


def test_sigterm_stops_the_trial_at_its_epoch_end_requeues_it_and_exits(settings: Settings) -> None:
    client = TestClient(create_app(settings))
    client.post("/v1/studies", json=_long_spec("sigterm"))
    first = start_worker(settings.database_url)
    victim = _running_trial(client, "sigterm", min_epochs=2)
    signalled = time.monotonic()
    first.send_signal(signal.SIGTERM)
    output, _ = first.communicate(timeout=60)
    assert time.monotonic() - signalled < 30, output
    assert first.returncode == 0, output

    attempt = client.get(f"/v1/studies/sigterm/trials/{victim['number']}").json()
    assert attempt["state"] == "failed"
    assert attempt["error"].startswith("TrialInterrupted: the worker stopped after epoch ")
    assert attempt["epochs_recorded"] < 60  # it did not run to its end
    waiting = client.get(f"/v1/studies/sigterm/trials/{attempt['rerun_as']}").json()
    assert waiting["state"] == "waiting" and waiting["params"] == attempt["params"]

    _finish_with_a_second_worker(settings, client, "sigterm", victim)


def test_a_trial_that_cannot_reach_its_epoch_end_in_time_is_killed_and_requeued(settings: Settings) -> None:
    client = TestClient(create_app(settings))
    client.post("/v1/studies", json=_long_spec("stop-timeout"))
    worker = start_worker(settings.database_url, CONVERGE_STOP_TIMEOUT_S="1")
    victim = _running_trial(client, "stop-timeout")
    os.kill(victim["user_attrs"]["converge_worker_pid"], signal.SIGSTOP)  # stuck in an endless epoch
    signalled = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    output, _ = worker.communicate(timeout=60)
    assert time.monotonic() - signalled < 30, output
    assert worker.returncode == 0, output
    attempt = client.get(f"/v1/studies/stop-timeout/trials/{victim['number']}").json()
    assert attempt["state"] == "failed"
    assert attempt["error"].startswith("trial process died (exit code -9); rerun as trial ")
    assert client.get(f"/v1/studies/stop-timeout/trials/{attempt['rerun_as']}").json()["state"] == "waiting"


@contextlib.contextmanager
def _workers_table_locked(db_url: str) -> Iterator[None]:
    """Block every write to `converge_workers` (the worker's heartbeat), as a frozen slot process
    holding SQLite's write lock would. Waits for a write in progress (a slot's epoch) to end."""
    if db_url.startswith("sqlite"):
        conn = sqlite3.connect(sa.make_url(db_url).database, isolation_level=None, timeout=30)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.rollback()
            conn.close()
        return
    with get_engine(db_url).connect() as conn:
        conn.execute(sa.text("LOCK TABLE converge_workers IN ACCESS EXCLUSIVE MODE"))
        yield
        conn.rollback()


def _gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_stop_timeout_kills_even_while_the_worker_waits_on_a_locked_database(settings: Settings) -> None:
    client = TestClient(create_app(settings))
    client.post("/v1/studies", json=_long_spec("stop-locked"))
    worker = start_worker(settings.database_url, CONVERGE_STOP_TIMEOUT_S="1")
    victim = _running_trial(client, "stop-locked")
    pid = victim["user_attrs"]["converge_worker_pid"]
    # Lock first, then freeze the slot: frozen first, it may be stopped inside its epoch's write
    # transaction, holding SQLite's lock for good, and the lock here could never be taken.
    with _workers_table_locked(settings.database_url):
        os.kill(pid, signal.SIGSTOP)
        worker.send_signal(signal.SIGTERM)  # its next heartbeat waits on the lock
        deadline = time.monotonic() + 10
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(pid), "the frozen slot process outlived its stop timeout while the worker waited"
    output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, output
    attempt = client.get(f"/v1/studies/stop-locked/trials/{victim['number']}").json()
    assert attempt["state"] == "failed"
    assert attempt["error"].startswith("trial process died (exit code -9); rerun as trial ")
