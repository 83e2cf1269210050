"""Storage faults: a read-only database and a full disk are said in one line, seen by /v1/health, and cost no trial.

A read-only SQLite file is made with `chattr +i` (tests run as root, where chmod stops no write); a
read-only PostgreSQL database with `default_transaction_read_only`. A full disk is a small tmpfs
mounted for the test, filled up; where mounting (or chattr) is refused the test is skipped, saying why.
Trials interrupted by the database run in-process, as a slot process runs them, with the retry window
of their writes (`RETRY_WITHIN_S`, 60 s) cut to a fraction of a second.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
import yaml
from fastapi.testclient import TestClient
from optuna.trial import TrialState

import converge.core.db.engine as db_engine
from conftest import CLI, REPO, converge_env, epoch_rows, tiny_spec
from converge.core.db import repo
from converge.core.db.engine import as_service_error, get_engine, is_transient, session_scope
from converge.core.db.migrate import upgrade
from converge.core.db.models import HealthProbe
from converge.core.errors import DatabaseNotWritable, DatabaseUnavailable
from converge.core.settings import Settings
from converge.service.api.app import create_app
from converge.studies.lifecycle import submit_study
from converge.studies.retries import CRASHED
from converge.studies.runner import STORAGE_LOST, run_slot
from converge.studies.spec import StudySpec
from converge.studies.storage import open_storage, storage_for
from converge.studies.worker import SlotProcess, Worker

SHORT_RETRY_S = 0.3  # instead of RETRY_WITHIN_S: how long a trial's writes wait for the database here


def _skip(reason: str) -> None:
    print(f"skipped: {reason}")  # shown with -s; -ra shows it in the summary too
    pytest.skip(reason)


def _forget_connections(url: str, busy_timeout_s: float = 30.0) -> None:
    """Close this process's pooled connections to the database, as a server started afresh would have none: a
    SQLite connection opened while the file was writable would go on writing (and SQLite hands its open file
    to the next connection of the process)."""
    get_engine(url).dispose()
    get_engine(url, busy_timeout_s).dispose()
    open_storage.cache_clear()


@contextlib.contextmanager
def read_only(url: str) -> Iterator[None]:
    """The database refuses every write within the block: SQLite's file immutable (`chattr +i`), PostgreSQL's
    database read-only for new sessions (`default_transaction_read_only`)."""
    _forget_connections(url)
    if url.startswith("sqlite"):
        path = sa.make_url(url).database
        done = subprocess.run(["chattr", "+i", path], capture_output=True, text=True)
        if done.returncode != 0:
            _skip(f"chattr +i is refused here, so no SQLite file can be made read-only for root: {done.stderr.strip()}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", path], check=True)
            _forget_connections(url)
        return
    name = sa.make_url(url).database
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
    try:
        yield
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" RESET default_transaction_read_only'))
        admin.dispose()
        _forget_connections(url)


@contextlib.contextmanager
def small_filesystem(where: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` for the block; skipped where mounting is refused."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        _skip(f"cannot mount a small filesystem to fill (needs root and CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)  # a file still open: detach it lazily


def fill(folder: Path) -> Path:
    """Write a file into `folder` until its filesystem has no space left; the file (delete it to free the space)."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f:  # unbuffered: nothing left over for the close to fail on
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=REPO, env=converge_env(url),
                          capture_output=True, text=True, timeout=120)


def _assert_one_line(done: subprocess.CompletedProcess[str], *words: str) -> None:
    where = f"{done.args[3:]}: {done.stderr}"
    assert done.returncode == 1, where
    assert "Traceback" not in done.stderr, where
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("converge: "), where
    for word in words:
        assert word in done.stderr, where


def _spec_file(folder: Path, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(name)))
    return path


def _probe_statements(url: str, busy_timeout_s: float = 30.0) -> list[str]:
    """The health probe's writes, as they are sent (counted on the engine the API uses)."""
    sent: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "converge_health" in statement and statement.lstrip().upper().startswith("UPDATE"):
            sent.append(statement)

    sa.event.listen(get_engine(url, busy_timeout_s), "before_cursor_execute", count)
    return sent


# ---------------------------------------------------------------- the CLI: one line, exit 1


@pytest.mark.slow
def test_every_cli_command_on_a_read_only_database_says_so_in_one_line(db_url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=db_url)
    submit_study(settings, StudySpec.model_validate(tiny_spec("existing")))
    spec = _spec_file(tmp_path, "fresh")
    with read_only(db_url):
        for args in (["study", "create", "--spec", str(spec)],
                     ["study", "create", "--spec", "examples/digits-demo.yaml"],
                     ["study", "cancel", "existing"], ["token", "create", "--scope", "read"],
                     ["schedule", "create", "--cron", "0 3 * * *", "--spec", str(spec)],
                     ["sweep", "--spec", str(spec), "--quiet"], ["worker", "--devices", "cpu", "--exit-when-idle"]):
            _assert_one_line(_cli(db_url, *args), "cannot be written", sa.make_url(db_url).render_as_string())
        assert _cli(db_url, "study", "list").returncode == 0  # reads still work
    with session_scope(get_engine(db_url)) as session:
        assert [s.name for s in repo.list_studies(session)] == ["existing"]
        assert repo.get_study(session, "existing").state == "queued"


def test_a_refused_write_becomes_database_not_writable_under_any_wrapper(db_url: str) -> None:
    """Converge's own session and Optuna's RDBStorage report the same error, and both count as transient."""
    settings = Settings(database_url=db_url)
    with read_only(db_url):
        with pytest.raises(DatabaseNotWritable, match="cannot be written") as own:
            with session_scope(get_engine(db_url)) as session:
                repo.add_study(session, "nope", tiny_spec("nope"), 1)
        with pytest.raises(optuna.exceptions.StorageInternalError) as optunas:
            storage_for(settings, patient=False).create_new_study([optuna.study.StudyDirection.MINIMIZE], "nope")
    assert is_transient(own.value) and is_transient(optunas.value)
    found = as_service_error(optunas.value, db_url)
    assert isinstance(found, DatabaseNotWritable) and str(found).startswith(
        f"the database at {sa.make_url(db_url).render_as_string()} cannot be written: ")
    assert as_service_error(ValueError("not the database"), db_url) is None


# ---------------------------------------------------------------- /v1/health


def test_health_is_503_while_the_database_refuses_writes_and_probes_at_most_every_n_seconds(db_url: str) -> None:
    settings = Settings(database_url=db_url, health_probe_every_s=5)
    app = create_app(settings, dashboard=False)
    now = [1000.0]
    app.state.health_probe.clock = lambda: now[0]
    probes = _probe_statements(db_url, settings.sqlite_busy_timeout_s)
    client = TestClient(app)

    for _ in range(3):
        assert client.get("/v1/health").json() == {"status": "ok", "database": "ok", "version": app.version}
    assert len(probes) == 1  # one write for three requests within the interval
    with session_scope(get_engine(db_url)) as session:
        assert session.get(HealthProbe, 1).probes == 1  # it was committed

    with read_only(db_url):
        now[0] += 4.9
        assert client.get("/v1/health").status_code == 200  # the last answer, cached: no write yet
        assert len(probes) == 1
        now[0] += 0.2
        response = client.get("/v1/health")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "unavailable" and "cannot be written" in body["detail"]
        assert body["database"] == body["detail"]
        assert len(probes) == 2
        now[0] += 1
        assert client.get("/v1/health").status_code == 503  # cached too
        assert len(probes) == 2
    now[0] += 1
    assert client.get("/v1/health").status_code == 503  # still the last answer, until the interval is over
    now[0] += 5
    assert client.get("/v1/health").status_code == 200  # recovered: the next probe's write went through
    assert len(probes) == 3
    with session_scope(get_engine(db_url)) as session:
        assert session.get(HealthProbe, 1).probes == 2


def test_the_health_probe_is_documented_and_survives_a_deleted_row(db_url: str) -> None:
    client = TestClient(create_app(Settings(database_url=db_url, health_probe_every_s=0), dashboard=False))
    operation = client.get("/openapi.json").json()["paths"]["/v1/health"]["get"]
    assert "cannot take a write" in operation["responses"]["503"]["description"]
    with session_scope(get_engine(db_url)) as session:
        session.execute(sa.delete(HealthProbe))
    assert client.get("/v1/health").status_code == 200
    with session_scope(get_engine(db_url)) as session:
        assert session.get(HealthProbe, 1).probes == 1


# ---------------------------------------------------------------- trials the database drops


def _claim(settings: Settings, name: str) -> repo.ClaimedSlot | None:
    with session_scope(get_engine(settings.database_url)) as session:
        return repo.claim_trial_slot(session, study_name=name)


def _run_remaining(settings: Settings, name: str) -> str | None:
    """Run the study's remaining trial slots here, as a slot process would; the study's final state."""
    while (claim := _claim(settings, name)) is not None:
        run_slot(settings, claim, device="cpu", read_back=False)
    with session_scope(get_engine(settings.database_url)) as session:
        return repo.finish_study_if_complete(session, repo.get_study(session, name).id)


def _trials(settings: Settings, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage_for(settings)).get_trials(deepcopy=False)


@pytest.mark.slow
@pytest.mark.parametrize("retries", [1, 0])
def test_a_trial_whose_epoch_write_finds_the_database_unavailable_is_rerun_like_a_crashed_one(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, retries: int) -> None:
    monkeypatch.setattr(db_engine, "RETRY_WITHIN_S", SHORT_RETRY_S)
    name = f"dropped-{retries}"
    submit_study(settings, StudySpec.model_validate(tiny_spec(name, n_trials=2, retries=retries)))
    record_epoch = repo.record_epoch
    refused: list[int] = []

    def unavailable_at_trial_0_epoch_1(session: Any, study_id: int, trial_id: int, trial_number: int,
                                       metrics: dict[str, Any]) -> None:
        if trial_number == 0 and metrics["epoch"] == 1:
            refused.append(trial_number)
            raise DatabaseUnavailable("cannot use database: server closed the connection unexpectedly")
        record_epoch(session, study_id, trial_id, trial_number, metrics)

    monkeypatch.setattr(repo, "record_epoch", unavailable_at_trial_0_epoch_1)
    claim = _claim(settings, name)
    assert claim is not None
    assert run_slot(settings, claim, device="cpu") is None  # dropped, then settled as soon as the database answered
    assert len(refused) > 1  # the write was retried before the trial gave up

    attempt = _trials(settings, name)[0]
    assert attempt.state == TrialState.FAIL
    assert attempt.user_attrs["error"].startswith("the database became unavailable during the trial: cannot use "
                                                  "database: server closed the connection unexpectedly")
    with session_scope(get_engine(settings.database_url)) as session:
        study = repo.get_study(session, name)
        assert [m.epoch for m in epoch_rows(session, study.id, 0)] == [0]  # what it wrote is kept
        assert repo.get_diagnosis(session, study.id, 0).final is True
        retry = repo.get_retry(session, study.id, 0)
    if retries:
        assert attempt.user_attrs["error"].endswith("; rerun as trial 1")
        assert (retry.retry_number, retry.reason, retry.failures) == (1, CRASHED, 1)
    else:  # its budget is spent: the failure stays and counts as one of the study's trials
        assert retry is None

    assert _run_remaining(settings, name) == "done"
    trials = _trials(settings, name)
    if retries:
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
        assert trials[1].params == attempt.params and trials[1].user_attrs["converge_retry_of"] == 0
    else:
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]


@pytest.mark.slow
def test_a_full_disk_is_one_line_a_503_and_its_trial_is_rerun_once_space_is_freed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with small_filesystem(tmp_path / "small") as disk:
        url = f"sqlite:///{disk / 'converge.db'}"
        upgrade(url)
        settings = Settings(database_url=url, heartbeat_interval_s=1, grace_period_s=60, worker_poll_s=0.2,
                            health_probe_every_s=0)
        monkeypatch.setattr(db_engine, "RETRY_WITHIN_S", SHORT_RETRY_S)
        name = "full"
        submit_study(settings, StudySpec.model_validate(tiny_spec(name, n_trials=2, retries=1)))
        health = TestClient(create_app(settings, dashboard=False))
        assert health.get("/v1/health").status_code == 200
        spec = _spec_file(tmp_path, "another")

        # A slot runs trial 0; the disk fills after its first epoch was stored. (The write-ahead log is emptied
        # first: SQLite would otherwise write the next epochs over its old frames, in space it already has.)
        filled: list[Path] = []

        def fill_after_first_epoch(trial: optuna.Trial, metrics: dict[str, Any]) -> None:
            if not filled:
                with contextlib.closing(sqlite3.connect(disk / "converge.db")) as conn:
                    assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0  # not busy
                filled.append(fill(disk))

        claim = _claim(settings, name)
        assert claim is not None
        started: list[int] = []
        with pytest.raises(Exception) as dropped:  # the database still full when its slot gave up on it
            run_slot(settings, claim, device="cpu", on_epoch=fill_after_first_epoch,
                     on_trial_start=lambda trial: started.append(trial._trial_id))
        assert is_transient(dropped.value)
        assert "cannot be written: database or disk is full" in str(as_service_error(dropped.value, url))

        # (a) the CLI, (b) health, while the disk is full.
        _assert_one_line(_cli(url, "study", "create", "--spec", str(spec)), "cannot be written",
                         "database or disk is full")
        response = health.get("/v1/health")
        assert response.status_code == 503 and "database or disk is full" in response.json()["detail"]

        # (c) the slot answered STORAGE_LOST: its worker waits out the full disk, then settles the trial.
        worker = Worker(settings, [])
        fake_slot = SimpleNamespace(index=0, device="cpu")
        fake_process = SimpleNamespace(is_alive=lambda: True, join=lambda *a: None, exitcode=None)
        answers = [STORAGE_LOST]
        conn = SimpleNamespace(poll=lambda: bool(answers), recv=answers.pop, send=lambda _: None)
        worker.processes[0] = slot = SlotProcess(fake_slot, fake_process, conn, SimpleNamespace(value=started[0]),
                                                 SimpleNamespace(is_set=lambda: False), claim=claim)
        worker._step()  # the database refuses: logged, nothing settled, the worker goes on
        assert slot.claim is claim and slot.answer == STORAGE_LOST and not slot.settled
        assert _trials(settings, name)[0].state == TrialState.RUNNING

        filled[0].unlink()  # space freed
        worker._step()
        assert slot.claim is None  # settled
        attempt, rerun = _trials(settings, name)
        assert attempt.state == TrialState.FAIL and rerun.state == TrialState.WAITING
        assert attempt.user_attrs["error"] == ("the database became unavailable during the trial (see the worker's "
                                               "log); rerun as trial 1")
        with session_scope(get_engine(url)) as session:
            retry = repo.get_retry(session, repo.get_study(session, name).id, 0)
            assert (retry.retry_number, retry.reason, retry.failures) == (1, CRASHED, 1)

        assert _run_remaining(settings, name) == "done"  # not a trial short
        assert [t.state for t in _trials(settings, name)] == [TrialState.FAIL, TrialState.COMPLETE,
                                                                TrialState.COMPLETE]
        assert health.get("/v1/health").status_code == 200
        assert _cli(url, "study", "create", "--spec", str(spec)).returncode == 0
        for engine in (get_engine(url), get_engine(url, settings.sqlite_busy_timeout_s)):
            engine.dispose()  # nothing left open on the filesystem before it is unmounted
        open_storage.cache_clear()
