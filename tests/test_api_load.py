"""The API load benchmark runs end to end at a tiny size, closed loop and paced (its latencies are not
checked here); its paced clients count latency from each request's scheduled send time; and its
fast fill stores what Optuna's own `add_trials` stores."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import REPO, scratch_postgres
from converge.core.db.engine import get_engine
from converge.core.db.migrate import upgrade
from converge.core.db.models import Study, TrialDiagnosis, TrialMetric

sys.path.insert(0, str(REPO / "benchmarks"))
import api_load  # noqa: E402


@pytest.fixture
def pg_url(postgres_admin: sa.Engine) -> Iterator[str]:
    """An empty scratch PostgreSQL database with both schemas."""
    with scratch_postgres(postgres_admin) as url:
        upgrade(url)
        yield url


@pytest.mark.postgres
@pytest.mark.slow
def test_the_benchmark_measures_every_endpoint_without_errors_while_the_worker_writes(
        pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    trials, epochs, clients, rate, seconds = 30, 5, 4, 4.0, 1.5
    figures = api_load.main(["--trials", str(trials), "--epochs", str(epochs), "--clients", str(clients),
                             "--seconds", str(seconds), "--rate", str(rate), "--timeout", "10",
                             "--database-url", pg_url])
    out = capsys.readouterr().out
    assert out.index("SATURATION: closed loop") < out.index("PACED: open loop")  # both tables, in that order
    for mode in ("saturation", "paced"):
        for key in api_load.ENDPOINTS:
            endpoint = figures[mode][key]
            assert endpoint["requests"] > 0, (mode, key, endpoint)
            assert endpoint["p50_ms"] is not None and endpoint["p99_ms"] >= endpoint["p50_ms"]
            assert endpoint["writer_rows"] > 0, f"the worker wrote nothing during the {mode} {key} window"
            if key != "dashboard":
                assert endpoint["errors"] == 0 and endpoint["unfinished"] == 0, (mode, key, endpoint)
    for key in api_load.ENDPOINTS:
        assert sum(line.startswith(api_load.LABELS[key] + " ") for line in out.splitlines()) == 2  # one a table
        paced = figures["paced"][key]
        assert paced["offered_rps"] == clients * rate
        # Every client's schedule within the window: 6 sends each, 0.25 s apart from its phase (under 0.25 s).
        assert clients * 5 <= paced["scheduled"] <= clients * int(seconds * rate) and paced["scheduled"] == (
            paced["requests"] + paced["errors"] + paced["unfinished"])
        assert figures["saturation"][key]["offered_rps"] is None
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


@pytest.mark.postgres
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


class _SlowHandler(BaseHTTPRequestHandler):
    """Answers `/slow` after 0.2 s, anything else at once; keep-alive (HTTP/1.1)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/slow":
            time.sleep(0.2)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def slow_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_paced_latency_counts_from_the_scheduled_send_time(slow_server: str) -> None:
    """One client, ten requests a second, a server that takes 0.2 s each: the client falls behind, and
    each answer's latency counts from its scheduled time. The k-th (from 0) goes out no earlier than
    0.2 k s into the window and is answered no earlier than 0.2 (k + 1) s, 0.1 k s after its scheduled
    time: at least 0.2 + 0.1 k s. A closed loop on the same server sees about 0.2 s every time."""
    def window(rate: float | None) -> api_load.Window:
        return asyncio.run(api_load.load_window(slow_server, {}, "detail", lambda rng: "/slow", clients=1,
                                                seconds=1.0, timeout_s=10, seed=0, rate=rate))

    paced = window(10.0)
    assert paced.n_errors == 0 and paced.unfinished == 0 and paced.requests == paced.scheduled
    assert paced.requests in (10, 11)  # 0, 0.1, ..., 0.9 s (and 1.0 s should rounding put it before the end)
    slowest_bound = 0.2 + 0.1 * (paced.requests - 1)
    assert max(paced.latencies) >= slowest_bound and paced.percentile_ms(99) >= slowest_bound * 1e3
    assert sorted(paced.latencies)[len(paced.latencies) // 2] >= 0.2 + 0.1 * (paced.requests // 2) - 0.05

    closed = window(None)
    assert closed.n_errors == 0 and closed.scheduled == 0 and 2 <= closed.requests <= 6
    assert min(closed.latencies) >= 0.2 and closed.percentile_ms(99) < paced.percentile_ms(99)
