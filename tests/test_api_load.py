"""The API load benchmark runs end to end at a tiny size (its latencies are not checked here), and its
fast fill stores what Optuna's own `add_trials` stores."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import PG_ADMIN_URL, REPO
from service.db.engine import get_engine
from service.db.migrate import upgrade
from service.db.models import Study, TrialDiagnosis, TrialMetric

sys.path.insert(0, str(REPO / "benchmarks"))
import api_load  # noqa: E402

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url(postgres_admin: sa.Engine) -> Iterator[str]:
    """An empty scratch PostgreSQL database with both schemas."""
    name = f"converge_test_{uuid.uuid4().hex[:12]}"
    with postgres_admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        get_engine(url).dispose()
        with postgres_admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.mark.slow
def test_the_benchmark_measures_every_endpoint_without_errors_while_the_worker_writes(
        pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    trials, epochs = 30, 5
    figures = api_load.main(["--trials", str(trials), "--epochs", str(epochs), "--clients", "4", "--seconds", "1.5",
                             "--timeout", "10", "--database-url", pg_url])
    out = capsys.readouterr().out
    for key in api_load.ENDPOINTS:
        assert api_load.LABELS[key] in out
        endpoint = figures["endpoints"][key]
        assert endpoint["requests"] > 0, (key, endpoint)
        assert endpoint["p50_ms"] is not None and endpoint["p99_ms"] >= endpoint["p50_ms"]
        assert endpoint["writer_rows"] > 0, f"the worker wrote nothing during the {key} window"
        if key != "dashboard":
            assert endpoint["errors"] == 0 and endpoint["unfinished"] == 0, (key, endpoint)
    assert "ERRORS" not in out
    assert figures["pages"] is True  # the trial list answers pages

    # The fill stored what was asked for, counted here in the database the benchmark used.
    with get_engine(pg_url).connect() as conn:
        study_id, state, n_trials = conn.execute(sa.select(Study.id, Study.state, Study.n_trials)
                                                 .where(Study.name == figures["study"])).one()
        optuna_trials = conn.scalar(sa.text("SELECT count(*) FROM trials WHERE study_id = :s"),
                                    {"s": figures["optuna_study_id"]})
        params = conn.scalar(sa.text("SELECT count(*) FROM trial_params p JOIN trials t USING (trial_id) "
                                     "WHERE t.study_id = :s"), {"s": figures["optuna_study_id"]})
        metric_rows = conn.scalar(sa.select(sa.func.count()).select_from(TrialMetric)
                                  .where(TrialMetric.study_id == study_id))
        per_trial = set(conn.scalars(sa.select(sa.func.count()).select_from(TrialMetric)
                                     .where(TrialMetric.study_id == study_id).group_by(TrialMetric.trial_number)))
        diagnoses = conn.scalar(sa.select(sa.func.count()).select_from(TrialDiagnosis)
                                .where(TrialDiagnosis.study_id == study_id, TrialDiagnosis.final.is_(True)))
    assert (state, n_trials, optuna_trials, params) == ("done", trials, trials, 5 * trials)
    assert metric_rows == trials * epochs and per_trial == {epochs}
    assert diagnoses == trials
    assert figures["counts"]["metric_rows"] == trials * epochs
    assert sum(figures["states"].values()) == trials


def _optuna_rows(url: str, optuna_id: int) -> dict[str, list[tuple[Any, ...]]]:
    """Every Optuna row of one study's trials, keyed by trial number instead of trial id."""
    queries = {
        "trials": "SELECT number, state, datetime_start, datetime_complete FROM trials t WHERE study_id = :s",
        "trial_params": "SELECT number, param_name, param_value, distribution_json FROM trial_params",
        "trial_values": "SELECT number, objective, value, value_type FROM trial_values",
        "trial_intermediate_values": "SELECT number, step, intermediate_value, intermediate_value_type "
                                     "FROM trial_intermediate_values",
        "trial_user_attributes": "SELECT number, key, value_json FROM trial_user_attributes",
        "trial_system_attributes": "SELECT number, key, value_json FROM trial_system_attributes",
    }
    rows = {}
    with get_engine(url).connect() as conn:
        for table, query in queries.items():
            if table != "trials":
                query += " JOIN trials t USING (trial_id) WHERE t.study_id = :s"
            rows[table] = sorted(tuple(r) for r in conn.execute(sa.text(query), {"s": optuna_id}))
    return rows


def test_the_bulk_fill_stores_the_rows_add_trials_stores(pg_url: str) -> None:
    start = datetime(2024, 5, 1, 12, 0, 0)
    stored, states = {}, {}
    for how in ("bulk", "add_trials"):  # each also reads its trials back through Optuna's storage
        fill = api_load.fill_study(pg_url, f"fill-{how}", 40, 6, seed=3, how=how, start=start)
        assert fill.counts["trials"] == 40 and fill.counts["metric_rows"] == 40 * 6
        stored[how], states[how] = _optuna_rows(pg_url, fill.optuna_study_id), fill.states
    assert set(states["bulk"]) == {"complete", "fail", "pruned"}  # every kind of row is compared
    assert stored["bulk"]["trial_intermediate_values"] and stored["bulk"]["trial_user_attributes"]
    assert stored["bulk"] == stored["add_trials"]
