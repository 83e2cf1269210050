"""Database faults: a PostgreSQL restart mid-study, SQLite under concurrent writers, the retry helpers.

The two end-to-end tests run a real `converge worker` (two trial slots) beside the API's real
ASGI app, and then count every trial and every metric row.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from conftest import PG_ADMIN_URL, start_worker, tiny_spec
from converge.core.db import repo
from converge.core.db.engine import get_engine, is_transient, retry_unit_of_work, session_scope
from converge.core.errors import Conflict, DatabaseUnavailable, SchemaNotReady
from converge.core.settings import Settings
from converge.service.api.app import create_app
from converge.studies.storage import PatientRDBStorage, open_storage

# The workers' grace period here (the other tests use 5 s): longer than a PostgreSQL restart on a
# loaded 2-core machine, so the heartbeats missed meanwhile do not fail running trials as stale.
GRACE_PERIOD_S = 20


def _worker(db_url: str) -> subprocess.Popen[str]:
    return start_worker(db_url, "--slots-per-device", "2", "--exit-when-idle",
                        CONVERGE_GRACE_PERIOD_S=str(GRACE_PERIOD_S))


def _assert_every_trial_complete_with_all_its_epochs(client: TestClient, name: str, n_trials: int) -> None:
    trials = client.get(f"/v1/studies/{name}/trials").json()["trials"]
    assert [t["number"] for t in trials] == list(range(n_trials))
    assert [t["state"] for t in trials] == ["complete"] * n_trials, trials
    for trial in trials:
        epochs = trial["params"]["epochs"]
        assert trial["epochs_recorded"] == epochs, trial
        metrics = client.get(f"/v1/studies/{name}/trials/{trial['number']}/metrics").json()
        assert metrics["columns"]["epoch"] == list(range(epochs))
        assert client.get(f"/v1/studies/{name}/trials/{trial['number']}/diagnosis").json()["final"] is True
    assert client.get(f"/v1/studies/{name}").json()["state"] == "done"


# ---------------------------------------------------------------- the retry helpers


def _locked_sqlite(url: str) -> sqlite3.Connection:
    """A connection holding SQLite's write lock until it commits."""
    holder = sqlite3.connect(sa.make_url(url).database, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def _release_after(holder: sqlite3.Connection, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, holder.commit)
    timer.start()
    return timer


@pytest.mark.parametrize("empty_db_url", ["sqlite"], indirect=True)
def test_a_unit_of_work_is_rerun_whole_after_a_lock(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    engine = get_engine(db_url, busy_timeout_s=0.1)  # locked errors at once instead of after 30 s
    sessions = []

    def work(session: sa.orm.Session) -> int:
        sessions.append(session)
        study = repo.add_study(session, f"s{len(sessions)}", tiny_spec(), 3)
        session.flush()
        return study.id

    holder = _locked_sqlite(db_url)
    timer = _release_after(holder, 0.6)
    with caplog.at_level(logging.WARNING, logger="converge.db"):
        retry_unit_of_work(engine, work, what="adding a study", within_s=20)
    timer.join()
    assert len(sessions) >= 2 and len(set(map(id, sessions))) == len(sessions)  # a fresh session each time
    assert "adding a study failed (attempt 1)" in caplog.text and "database is locked" in caplog.text
    with session_scope(engine) as session:
        assert [s.name for s in repo.list_studies(session)] == [f"s{len(sessions)}"]  # nothing half-written

    holder = _locked_sqlite(db_url)
    try:
        started = time.monotonic()
        with pytest.raises(OperationalError, match="database is locked"):
            retry_unit_of_work(engine, work, what="adding a study", within_s=0.5)
        assert time.monotonic() - started < 3  # gives up after within_s, with the driver's error
    finally:
        holder.commit()


@pytest.mark.parametrize("empty_db_url", ["sqlite"], indirect=True)
def test_only_transient_errors_are_retried(db_url: str) -> None:
    engine = get_engine(db_url)
    calls = Counter[str]()

    def duplicate(session: sa.orm.Session) -> None:
        calls["duplicate"] += 1
        repo.add_study(session, "twice", tiny_spec(), 3)
        repo.add_study(session, "twice", tiny_spec(), 3)
        session.flush()

    with pytest.raises(Conflict):  # a unique violation
        retry_unit_of_work(engine, duplicate, what="a bug", within_s=10)
    assert calls["duplicate"] == 1
    assert not is_transient(SchemaNotReady("run converge db upgrade"))
    assert is_transient(DatabaseUnavailable("down"))
    wrapped = optuna.exceptions.StorageInternalError("commit failed")
    wrapped.__cause__ = OperationalError("SELECT 1", {}, sqlite3.OperationalError("database is locked"))
    assert is_transient(wrapped)  # seen through Optuna's wrapper


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
@pytest.mark.parametrize("empty_db_url", ["sqlite"], indirect=True)
def test_optuna_storage_waits_out_a_lock_and_a_heartbeat_miss_is_not_fatal(
        db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    storage = open_storage(db_url, 1, GRACE_PERIOD_S, 0.1)
    assert isinstance(storage, PatientRDBStorage)
    with storage.engine.connect() as conn:  # WAL is the file's; the busy timeout comes from engine_kwargs
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 100
    study = optuna.create_study(study_name="patient", storage=storage)
    trial = study.ask()

    holder = _locked_sqlite(db_url)
    with caplog.at_level(logging.WARNING):
        storage.record_heartbeat(trial._trial_id)  # missed, logged, no exception: the thread lives on
        timer = _release_after(holder, 0.6)
        trial.report(0.5, step=0)  # waits for the lock instead of failing the trial
        timer.join()
    assert "heartbeat missed: database is locked" in caplog.text
    assert "Optuna storage set_trial_intermediate_value failed (attempt 1)" in caplog.text
    study.tell(trial, 0.5)
    assert storage.get_trial(trial._trial_id).intermediate_values == {0: 0.5}


# ---------------------------------------------------------------- SQLite: the API and two slots at once


@pytest.mark.slow
@pytest.mark.parametrize("empty_db_url", ["sqlite"], indirect=True)
def test_sqlite_api_and_two_slots_write_at_once_without_locks(settings: Settings,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The worker's parent and two trial processes write every epoch while the API reads and writes."""
    n_trials = 6
    spec = tiny_spec("busy", n_trials=n_trials)
    spec["search_space"]["epochs"] = {"low": 4, "high": 6}
    app = create_app(settings, dashboard=False)
    TestClient(app).post("/v1/studies", json=spec).raise_for_status()
    worker = _worker(settings.database_url)
    engine = get_engine(settings.database_url)
    history = {"objective": {"metric": "val_loss", "direction": "minimize"}, "max_epochs": 10,
               "epochs": [{"epoch": i, "train_loss": 1 / (i + 1), "val_loss": 1.1 / (i + 1)} for i in range(8)]}

    def claiming() -> bool:
        with session_scope(engine) as session:
            return repo.get_study(session, "busy").n_claimed < n_trials

    def hammer(who: int) -> list[tuple[str, int, str]]:
        """Requests until the worker exits; a study is added (and cancelled at once, so no worker
        runs it) only while the busy study still has slots to hand out."""
        client = TestClient(app, raise_server_exceptions=False)
        seen: list[tuple[str, int, str]] = []

        def call(method: str, path: str, **kwargs: Any) -> None:
            response = client.request(method, path, **kwargs)
            seen.append((f"{method} {path}", response.status_code, response.text))

        i = 0
        while worker.poll() is None:
            i += 1
            call("GET", "/v1/studies")
            call("GET", "/v1/studies/busy/trials")
            call("GET", f"/v1/studies/busy/trials/{i % n_trials}/metrics")
            call("GET", f"/v1/studies/busy/trials/{i % n_trials}/diagnosis")
            call("POST", "/v1/diagnose", json=history)
            call("GET", "/v1/workers")
            if i % 3 == 0 and claiming():
                call("POST", "/v1/studies", json=tiny_spec(f"extra-{who}-{i}", n_trials=1))
                call("POST", f"/v1/studies/extra-{who}-{i}/cancel")
        return seen

    try:
        with caplog.at_level(logging.WARNING), ThreadPoolExecutor(2) as pool:
            results = [r for rs in pool.map(hammer, range(2)) for r in rs]
        output, _ = worker.communicate(timeout=240)
    finally:
        worker.kill()
    assert worker.returncode == 0, output
    assert "locked" not in output.lower() and "Traceback" not in output, output
    assert "locked" not in caplog.text.lower()
    failures = [r for r in results if r[1] not in (200, 201, 404) or "locked" in r[2].lower()]
    assert not failures, failures[:5]
    counts = Counter(path.split()[0] + " " + str(status) for path, status, _ in results)
    assert counts["POST 201"] >= 2 and counts["GET 200"] >= 20, counts  # the API did write and read meanwhile
    _assert_every_trial_complete_with_all_its_epochs(TestClient(app), "busy", n_trials)


# ---------------------------------------------------------------- PostgreSQL: a restart mid-study


def _restartable_cluster(url: str) -> list[str]:
    """`pg_ctlcluster` arguments for the local cluster serving `url`, or skip saying why not."""
    if shutil.which("pg_ctlcluster") is None or shutil.which("pg_lsclusters") is None:
        pytest.skip("restarting PostgreSQL needs pg_ctlcluster/pg_lsclusters (Debian's postgresql-common)")
    if os.geteuid() != 0:
        pytest.skip("restarting PostgreSQL needs root (pg_ctlcluster as root); this test does not use sudo")
    parsed = sa.make_url(url)
    if parsed.host not in ("127.0.0.1", "localhost", None):
        pytest.skip(f"the test database is on {parsed.host}, not a local cluster this test may restart")
    for line in subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True).stdout.splitlines():
        version, name, port, status = line.split()[:4]
        if int(port) == (parsed.port or 5432) and status == "online":
            return ["pg_ctlcluster", "--skip-systemctl-redirect", version, name]
    pytest.skip(f"no online local cluster listens on port {parsed.port or 5432}")


def _server_started_at() -> Any:
    engine = sa.create_engine(PG_ADMIN_URL)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT pg_postmaster_start_time()")).scalar()
    finally:
        engine.dispose()


def _both_slots_training(client: TestClient, storage: optuna.storages.BaseStorage) -> bool:
    """Both slot processes have started a trial (each has its study and storage open) and a
    trial is part-way, so the outage hits running trials: epoch writes, reports, heartbeats."""
    trials = optuna.load_study(study_name="restarted", storage=storage).get_trials(deepcopy=False)
    processes = {t.user_attrs.get("converge_worker_pid") for t in trials} - {None}
    epochs = [t["epochs_recorded"] for t in client.get("/v1/studies/restarted/trials").json()["trials"]]
    return len(processes) == 2 and any(2 <= n < 12 for n in epochs)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("empty_db_url", ["postgresql"], indirect=True)
def test_postgres_restart_mid_study_loses_no_trial_and_no_metric(settings: Settings) -> None:
    """Stops PostgreSQL while trials train, checks the API answers 503, starts it again.

    It restarts the whole local server, so other tests using it at that moment lose their
    connections: run it alone (CI runs the suite serially).
    """
    cluster = _restartable_cluster(settings.database_url)
    n_trials = 4
    spec = tiny_spec("restarted", n_trials=n_trials)
    spec["search_space"]["epochs"] = {"value": 12}
    client = TestClient(create_app(settings, dashboard=False), raise_server_exceptions=False)
    client.post("/v1/studies", json=spec).raise_for_status()
    storage = open_storage(settings.database_url, settings.heartbeat_interval_s, settings.grace_period_s)
    started_at = _server_started_at()
    worker = _worker(settings.database_url)
    try:
        deadline = time.monotonic() + 120
        while not _both_slots_training(client, storage):
            if time.monotonic() > deadline or worker.poll() is not None:
                pytest.fail("the two slots never trained at once")
            time.sleep(0.1)
        subprocess.run([*cluster, "stop"], check=True, capture_output=True, timeout=60)
        try:
            during = client.get("/v1/studies/restarted/trials")
            time.sleep(1)  # every process notices: trials at their epoch's end, the worker at its poll
        finally:
            subprocess.run([*cluster, "start"], check=True, capture_output=True, timeout=60)
        output, _ = worker.communicate(timeout=180)
    finally:
        worker.kill()

    assert _server_started_at() > started_at  # the server really restarted
    assert during.status_code == 503 and "cannot use database" in during.json()["detail"]
    assert worker.returncode == 0, output
    # The outage hit running trials: a slot process retried one of its writes (its epoch row, or
    # an Optuna call such as the epoch's report, whichever the stop caught first).
    assert any("[slot " in line and "retrying" in line for line in output.splitlines()), output
    assert client.get("/v1/health").status_code == 200  # the API's pool reconnected by itself
    _assert_every_trial_complete_with_all_its_epochs(client, "restarted", n_trials)
    states = Counter(t.state.name for t in optuna.load_study(study_name="restarted", storage=storage).trials)
    assert states == {"COMPLETE": n_trials}  # none left RUNNING, none failed and rerun
    with session_scope(get_engine(settings.database_url)) as session:
        study_id = repo.get_study(session, "restarted").id
        assert sum(repo.epochs_recorded(session, study_id).values()) == n_trials * 12

