"""Schema upgrades and repository queries, on SQLite and PostgreSQL."""

from __future__ import annotations

import math
import subprocess
import threading

import pytest
import sqlalchemy as sa

from conftest import CLI, REPO, converge_env, epoch_rows, tiny_spec
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.db.migrate import VERSION_TABLE, check_schema, converge_head, upgrade
from converge.core.errors import Conflict, SchemaNotReady


def _versions(url: str) -> tuple[list, list]:
    with get_engine(url).connect() as conn:
        optuna_rows = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
        converge_rows = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
    return optuna_rows, converge_rows


def test_upgrade_creates_both_schemas_and_is_idempotent(empty_db_url: str) -> None:
    with pytest.raises(SchemaNotReady, match="converge db upgrade"):
        check_schema(empty_db_url)
    first = upgrade(empty_db_url)
    optuna_rows, converge_rows = _versions(empty_db_url)
    assert optuna_rows == [(first["optuna"],)]
    assert converge_rows == [(converge_head(),)]
    tables = set(sa.inspect(get_engine(empty_db_url)).get_table_names())
    assert {"converge_studies", "converge_trial_metrics", "converge_workers", "studies", "trials"} <= tables

    assert upgrade(empty_db_url) == first  # second run: same versions, nothing duplicated
    assert _versions(empty_db_url) == (optuna_rows, converge_rows)
    check_schema(empty_db_url)


def test_db_upgrade_cli(empty_db_url: str) -> None:
    for _ in range(2):
        done = subprocess.run([*CLI, "db", "upgrade"], cwd=REPO,
                              env=converge_env(empty_db_url), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"converge schema {converge_head()}" in done.stdout


def test_unreachable_database_is_one_line_not_a_traceback() -> None:
    done = subprocess.run([*CLI, "study", "list"], cwd=REPO,
                          env=converge_env("postgresql://nobody@127.0.0.1:1/none"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("converge: cannot use database postgresql://nobody@127.0.0.1:1/none")


def test_claims_never_exceed_n_trials_under_racing_threads(db_url: str) -> None:
    engine = get_engine(db_url)
    with session_scope(engine) as session:
        repo.add_study(session, "race", tiny_spec("race"), n_trials=7)
    claimed: list[int] = []
    lock = threading.Lock()

    def grab() -> None:
        while True:
            with session_scope(engine) as session:
                slot = repo.claim_trial_slot(session)
            if slot is None:
                return
            with lock:
                claimed.append(slot.slot)

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == list(range(7))
    with session_scope(engine) as session:
        study = repo.get_study(session, "race")
        assert (study.state, study.n_claimed) == ("running", 7)
        repo.release_trial_slot(session, study.id)
    with session_scope(engine) as session:
        assert repo.claim_trial_slot(session).slot == 6


def test_duplicate_study_name_conflicts(db_url: str) -> None:
    engine = get_engine(db_url)
    with session_scope(engine) as session:
        repo.add_study(session, "dup", tiny_spec("dup"), n_trials=1)
    with pytest.raises(Conflict, match="already exists"):
        with session_scope(engine) as session:
            repo.add_study(session, "dup", tiny_spec("dup"), n_trials=1)


def test_metrics_keep_nan_and_infinity(db_url: str) -> None:
    engine = get_engine(db_url)
    with session_scope(engine) as session:
        study = repo.add_study(session, "nan", tiny_spec("nan"), n_trials=1)
        repo.record_epoch(session, study.id, trial_id=1, trial_number=0,
                          metrics={"epoch": 0, "train_loss": float("nan"), "val_loss": float("inf"),
                                   "val_acc": None, "grad_norm": 1.5})
    with session_scope(engine) as session:
        (row,) = epoch_rows(session, study.id, 0)
        assert math.isnan(row.train_loss)
        assert row.val_loss == math.inf
        assert row.val_acc is None and row.grad_norm == 1.5


def test_writing_a_stored_epoch_again_changes_nothing(db_url: str) -> None:
    """A retried epoch write whose first commit went through must not fail the trial."""
    engine = get_engine(db_url)
    with session_scope(engine) as session:
        study = repo.add_study(session, "twice", tiny_spec("twice"), n_trials=1)
    for train_loss in (0.5, 0.9):
        with session_scope(engine) as session:
            repo.record_epoch(session, study.id, trial_id=1, trial_number=0,
                              metrics={"epoch": 0, "train_loss": train_loss})
    with session_scope(engine) as session:
        (row,) = epoch_rows(session, study.id, 0)
        assert row.train_loss == 0.5


def test_models_and_migrations_agree(db_url: str) -> None:
    """Autogenerate against an upgraded database finds nothing to do (and ignores Optuna's tables)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from converge.core.db.migrate import include_object
    from converge.core.db.models import Base

    with get_engine(db_url).connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": include_object, "compare_type": True,
                                                         "version_table": VERSION_TABLE})
        assert compare_metadata(context, Base.metadata) == []


def test_timestamps_are_utc_aware(db_url: str) -> None:
    with session_scope(get_engine(db_url)) as session:
        repo.add_study(session, "tz", tiny_spec("tz"), n_trials=1)
    with session_scope(get_engine(db_url)) as session:
        assert repo.get_study(session, "tz").created_at.utcoffset().total_seconds() == 0
