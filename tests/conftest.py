"""Shared fixtures: every database test runs on SQLite and on PostgreSQL.

PostgreSQL tests use a fresh database per test on 127.0.0.1:5432. Where that server is
down they are skipped, unless CONVERGE_REQUIRE_POSTGRES=1 (CI), where they fail instead.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from sqlalchemy import select
from sqlalchemy.orm import Session

from benchmarks.scratch_db import new_database
from converge.core.db.migrate import upgrade
from converge.core.db.models import TrialMetric
from converge.core.settings import Settings

# The operator's allow-list for the suite: the test plug-ins and the examples' package (docs/security.md).
# Set before any Settings is made, so in-process Settings and every worker subprocess see it;
# the security tests pass their own Settings(plugin_modules=...) where the setting is what they test.
os.environ.setdefault("CONVERGE_PLUGIN_MODULES", "converge_test_plugins,converge_examples")

PG_ADMIN_URL = os.environ.get("CONVERGE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUIRE_PG = os.environ.get("CONVERGE_REQUIRE_POSTGRES") == "1"
REPO = Path(__file__).resolve().parents[1]
# `converge ...` as a subprocess of this interpreter (the virtualenv's console script need not be on PATH).
CLI = (sys.executable, "-m", "converge.service.cli")


def _pg_admin() -> sa.Engine:
    return sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


def _postgres_available() -> str | None:
    try:
        with _pg_admin().connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        return str(exc).splitlines()[0]
    return None


@pytest.fixture(scope="session")
def postgres_admin() -> sa.Engine:
    problem = _postgres_available()
    if problem is not None:
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL required (CONVERGE_REQUIRE_POSTGRES=1) but unreachable: {problem}")
        pytest.skip(f"PostgreSQL not reachable: {problem}")
    return _pg_admin()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database of each kind (no tables)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'converge.db'}"
        return
    with scratch_postgres(request.getfixturevalue("postgres_admin")) as url:
        yield url


def scratch_postgres(admin: sa.Engine, prefix: str = "converge_test") -> contextlib.AbstractContextManager[str]:
    """A new, empty PostgreSQL database's URL; dropped (its engine's connections closed) afterwards."""
    return new_database(admin, prefix)


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    """A database of each kind with both schemas upgraded."""
    upgrade(empty_db_url)
    return empty_db_url


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(database_url=db_url, heartbeat_interval_s=1, grace_period_s=5, worker_poll_s=0.2)


# The Optuna distributions of `tiny_spec`'s search space, for trials written directly with create_trial.
TINY_DISTRIBUTIONS = {
    "lr": FloatDistribution(1e-3, 1e-1, log=True),
    "batch_size": CategoricalDistribution([64, 128]),
    "epochs": IntDistribution(2, 3),
    "weight_decay": CategoricalDistribution([1e-4]),  # a fixed value is a one-choice categorical
    "dropout": CategoricalDistribution([0.0]),
}


def tiny_spec(name: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """A study that trains in about a second per trial."""
    spec: dict[str, Any] = {
        "name": name,
        "task": {"model": "mlp", "dataset": "sklearn:digits", "params": {"width": 16, "depth": 1}},
        "search_space": {
            "lr": {"low": 1e-3, "high": 1e-1, "log": True},
            "batch_size": {"choices": [64, 128]},
            "epochs": {"low": 2, "high": 3},
            "weight_decay": 1e-4,
            "dropout": 0.0,
        },
        "n_trials": 3,
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
    }
    spec.update(overrides)
    return spec


def converge_env(db_url: str, **extra: str) -> dict[str, str]:
    """Environment for a `converge` subprocess on this database."""
    env = dict(os.environ)
    env.update({"CONVERGE_DATABASE_URL": db_url, "CONVERGE_HEARTBEAT_INTERVAL_S": "1",
                "CONVERGE_GRACE_PERIOD_S": "5", "CONVERGE_WORKER_POLL_S": "0.2", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


_STARTED_WORKERS: list[subprocess.Popen[str]] = []


def start_worker(db_url: str, *args: str, new_session: bool = False, **env: str) -> subprocess.Popen[str]:
    """A real `converge worker` on the CPU, its output captured; `new_session` puts it and its
    slot processes in a process group of their own (to kill the whole worker at once). A worker
    still running when its test ends (a failed assertion) is killed then (`_no_stray_workers`)."""
    worker = subprocess.Popen([*CLI, "worker", "--devices", "cpu", *args],
                              cwd=REPO, env=converge_env(db_url, **env), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=new_session)
    _STARTED_WORKERS.append(worker)
    return worker


@pytest.fixture(autouse=True)
def _no_stray_workers() -> Iterator[None]:
    yield
    while _STARTED_WORKERS:
        worker = _STARTED_WORKERS.pop()
        if worker.poll() is None:
            worker.kill()
            worker.communicate(timeout=30)


def epoch_rows(session: Session, study_id: int, trial_number: int) -> list[TrialMetric]:
    """A trial's stored epoch rows in order, read straight from `converge_trial_metrics`."""
    return list(session.scalars(
        select(TrialMetric).where(TrialMetric.study_id == study_id, TrialMetric.trial_number == trial_number)
        .order_by(TrialMetric.epoch)
    ))
