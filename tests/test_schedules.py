"""Scheduled sweeps: cron and time zones (daylight saving), the schedule API and CLI, the scheduler's
exactly-once firing (two schedulers racing), misfire and overlap policies, warm start, run reports
with regression flags, and webhooks against a real local HTTP receiver (one that answers 500, one
that hangs). Time is a controllable clock; databases are real SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from fastapi.testclient import TestClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from conftest import tiny_spec
from converge.core.db import repo, schedule_repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.db.models import ScheduleRun, utcnow
from converge.core.settings import Settings, get_settings
from converge.service import schedule_rules as rules
from converge.service import schedules
from converge.service.api.app import create_app
from converge.service.outbound import Allow
from converge.service.scheduler import Scheduler
from converge.service.webhooks import Notifier
from converge.studies.spec import parse_spec
from converge.studies.storage import storage_for

UTC = timezone.utc
BERLIN = "Europe/Berlin"


class Clock:
    """A clock the test moves."""

    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def to(self, moment: datetime) -> None:
        self.now = moment


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# ---------------------------------------------------------------- pure rules


def test_daily_cron_across_daylight_saving_changes() -> None:
    # Berlin springs forward on 2026-03-29 at 02:00 (to 03:00): 02:30 does not exist that day and fires at 03:00;
    # it falls back on 2026-10-25 at 03:00 (to 02:00): 02:30 happens twice and fires once.
    spring = rules.fire_times("30 2 * * *", BERLIN, utc(2026, 3, 27, 12), utc(2026, 3, 31, 12))
    assert spring == [utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30),
                      utc(2026, 3, 31, 0, 30)]
    assert [rules.run_name("nightly", t, BERLIN) for t in spring] == [
        "nightly-20260328-0230", "nightly-20260329-0300", "nightly-20260330-0230", "nightly-20260331-0230"]
    autumn = rules.fire_times("30 2 * * *", BERLIN, utc(2026, 10, 24, 12), utc(2026, 10, 26, 12))
    assert autumn == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]
    # An hourly job keeps firing every real hour through the repeated hour: 4 fires in 3 wall-clock hours.
    hourly = rules.fire_times("0 * * * *", BERLIN, utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 2, 30))
    assert hourly == [utc(2026, 10, 25, 0), utc(2026, 10, 25, 1), utc(2026, 10, 25, 2)]
    assert [rules.run_name("h", t, BERLIN) for t in hourly] == ["h-20261025-0200", "h-20261025-0200",
                                                                 "h-20261025-0300"]
    # New York's spring change on 2026-03-08 (02:00 -> 03:00), the next fire time after one.
    assert rules.next_fire_time("15 2 * * *", "America/New_York", utc(2026, 3, 7, 12)) == utc(2026, 3, 8, 7, 0)
    assert rules.next_fire_time("15 2 * * *", "America/New_York", utc(2026, 3, 8, 12)) == utc(2026, 3, 9, 6, 15)


def test_bad_cron_and_zone_are_named() -> None:
    for expr, words in [("61 2 * * *", "Bad minute"), ("0 0 30 2 *", "day-of-month"), ("@daily", "5 fields"),
                        ("* * * * * *", "5 fields")]:
        with pytest.raises(ValueError, match=words) as info:
            rules.check_cron(expr)
        assert repr(expr) in str(info.value)
    for zone in ("Mars/Olympus", "", "../etc/passwd", "Europe"):
        with pytest.raises(ValueError, match="unknown time zone"):
            rules.check_timezone(zone)


def test_misfire_plan_runs_the_latest_within_grace_once() -> None:
    now = utc(2026, 5, 4, 2, 10)
    due = [utc(2026, 5, 2, 2), utc(2026, 5, 3, 2), utc(2026, 5, 4, 2)]
    plans = rules.plan_fires(due, now, grace_s=3600)
    assert [p.action for p in plans] == ["skip", "skip", "run"]
    assert "beyond the misfire grace" in plans[0].reason
    assert [p.action for p in rules.plan_fires(due, now, grace_s=60)] == ["skip", "skip", "skip"]
    assert rules.overlap_action("skip", True) == "skip"
    assert rules.overlap_action("queue", True) == "queue"
    assert rules.overlap_action("skip", False) == "launch"


def test_top_k_params_best_first_within_the_new_space() -> None:
    space = parse_spec(tiny_spec("x")).search_space  # lr in [1e-3, 1e-1], batch 64|128, epochs 2..3, fixed wd/dropout
    trials = [(0.9, {"lr": 0.01, "batch_size": 64, "epochs": 2, "weight_decay": 1e-4, "dropout": 0.0}),
              (0.1, {"lr": 0.05, "batch_size": 128, "epochs": 3, "weight_decay": 1e-4, "dropout": 0.0}),
              (0.3, {"lr": 0.5, "batch_size": 64, "epochs": 3, "weight_decay": 1e-4, "dropout": 0.0}),  # lr outside
              (float("nan"), {"lr": 0.02, "batch_size": 64, "epochs": 2}), (None, {"lr": 0.03})]
    assert rules.top_k_params(trials, "minimize", 2, space) == [
        {"lr": 0.05, "batch_size": 128, "epochs": 3}, {"batch_size": 64, "epochs": 3}]
    assert rules.top_k_params(trials, "maximize", 1, space) == [{"lr": 0.01, "batch_size": 64, "epochs": 2}]
    assert rules.top_k_params(trials, "minimize", 0, space) == []


def test_run_report_and_regression_flag() -> None:
    prev = rules.RunSummary("n-1", "done", 0.50, {"lr": 0.01, "epochs": 3}, {"converged": 5, "diverged": 2})
    same = rules.RunSummary("n-2", "done", 0.52, {"lr": 0.02, "epochs": 3}, {"converged": 6, "overfitting": 1})
    report = rules.run_report(same, prev, "minimize", 0.05)  # 4% worse: within the threshold
    assert report["regression"] is False
    assert report["best_delta"] == pytest.approx(0.02)
    assert report["verdict_shift"] == {"converged": 1, "diverged": -2, "overfitting": 1}
    assert report["params_changed"] == {"lr": {"from": 0.01, "to": 0.02}}
    worse = rules.RunSummary("n-3", "done", 0.56, {}, {})
    assert rules.run_report(worse, prev, "minimize", 0.05)["regression"] is True
    assert rules.run_report(worse, prev, "maximize", 0.05)["regression"] is False  # higher is better there
    assert rules.is_regression(0.40, 0.50, "maximize", 0.1) is True
    assert rules.is_regression(None, 0.50, "minimize", 0.1) is True  # no completed trial at all
    assert rules.run_report(worse, None, "minimize", 0.05)["previous_study"] is None


# ---------------------------------------------------------------- helpers with a database


@pytest.fixture
def settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """This file's webhook receivers listen on 127.0.0.1, which a webhook reaches only where the operator allows
    it (`CONVERGE_WEBHOOK_ALLOW`, tests/test_webhook_policy.py): allowed here, as a deployment would."""
    monkeypatch.setenv("CONVERGE_WEBHOOK_ALLOW", "127.0.0.1")
    get_settings.cache_clear()
    yield Settings(**settings.model_dump(exclude={"webhook_allow"}))
    get_settings.cache_clear()


def make_schedule(settings: Settings, now: datetime, prefix: str = "nightly", **fields: Any) -> int:
    data = schedules.ScheduleIn.model_validate({"cron": "30 2 * * *", "timezone": BERLIN,
                                                "template": tiny_spec(prefix), **fields})
    with session_scope(get_engine(settings.database_url)) as session:
        return schedules.create_schedule(session, data, now=now, allow=Allow.from_setting(settings.webhook_allow)).id


def runs(settings: Settings, schedule_id: int) -> list[ScheduleRun]:
    with session_scope(get_engine(settings.database_url)) as session:
        return list(reversed(schedule_repo.list_runs(session, schedule_id)))


def end_study(settings: Settings, name: str, state: str = "done") -> None:
    with session_scope(get_engine(settings.database_url)) as session:
        repo.get_study(session, name).state = state


DISTRIBUTIONS = {"lr": FloatDistribution(1e-3, 1e-1, log=True), "batch_size": CategoricalDistribution([64, 128]),
                 "epochs": IntDistribution(2, 3), "weight_decay": CategoricalDistribution([1e-4]),
                 "dropout": CategoricalDistribution([0.0])}


def add_completed_trials(settings: Settings, name: str, values: list[float], verdict: str = "converged") -> None:
    """Completed trials (no training): values[i] with lr 0.001*(i+1); each gets a final diagnosis."""
    study = optuna.load_study(study_name=name, storage=storage_for(settings))
    study.add_trials([create_trial(state=TrialState.COMPLETE, value=v, distributions=DISTRIBUTIONS,
                                   params={"lr": 1e-3 * (i + 1), "batch_size": (64, 128)[i % 2], "epochs": 2 + i % 2,
                                           "weight_decay": 1e-4, "dropout": 0.0})
                      for i, v in enumerate(values)])
    healthy = verdict in ("converged", "still_improving")
    with session_scope(get_engine(settings.database_url)) as session:
        study_id = repo.get_study(session, name).id
        for trial in study.get_trials(deepcopy=False):
            repo.save_diagnosis(session, study_id, trial._trial_id, trial.number, 1,
                                {"verdict": verdict, "healthy": healthy, "onset_epoch": None, "confidence": 0.8,
                                 "findings": [], "remedies": [], "summary": verdict}, final=True)


class Receiver:
    """A local HTTP receiver for webhooks: `mode` ok (200), fail (500) or hang (never answers in time)."""

    def __init__(self, mode: str = "ok"):
        self.mode = mode
        self.received: list[dict[str, Any]] = []
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.received.append(body)
                if receiver.mode == "hang":
                    receiver.release.wait(10)
                    return
                self.send_response(200 if receiver.mode == "ok" else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def fast_scheduler(settings: Settings, clock: Clock, **notifier: Any) -> Scheduler:
    options = {"timeout_s": 2.0, "retries": 2, "backoff_s": 0.05,
               "allow": Allow.from_setting(settings.webhook_allow), **notifier}
    return Scheduler(settings, clock=clock, notifier=Notifier(get_engine(settings.database_url), **options))


# ---------------------------------------------------------------- the API


def test_schedule_api_create_read_change_delete(settings: Settings) -> None:
    client = TestClient(create_app(settings, dashboard=False))
    body = {"cron": "30 2 * * *", "timezone": BERLIN, "template": tiny_spec("nightly"), "overlap": "queue",
            "warm_start_top_k": 3, "webhook_url": "http://127.0.0.1:9/hook"}
    created = client.post("/v1/schedules", json=body)
    assert created.status_code == 201, created.text
    out = created.json()
    assert out["template"]["name"] == "nightly" and out["template"]["n_trials"] == 3
    assert out["overlap"] == "queue" and out["enabled"] is True and out["misfire_grace_s"] == 3600
    next_fire = datetime.fromisoformat(out["next_fire_time"]).astimezone(ZoneInfoBerlin())
    assert (next_fire.hour, next_fire.minute) in ((2, 30), (3, 0))
    sid = out["id"]
    assert [s["id"] for s in client.get("/v1/schedules").json()] == [sid]
    assert client.get(f"/v1/schedules/{sid}").json()["cron"] == "30 2 * * *"

    changed = client.patch(f"/v1/schedules/{sid}", json={"enabled": False, "webhook_url": None})
    assert changed.status_code == 200, changed.text
    assert changed.json()["enabled"] is False and changed.json()["next_fire_time"] is None
    assert changed.json()["webhook_url"] is None and changed.json()["warm_start_top_k"] == 3

    bad = client.post("/v1/schedules", json={**body, "cron": "61 2 * * *", "timezone": "Mars/Olympus"})
    assert bad.status_code == 422
    assert "'61 2 * * *'" in bad.json()["detail"] and "'Mars/Olympus'" in bad.json()["detail"]
    assert len(bad.json()["problems"]) == 2
    bad_template = client.post("/v1/schedules", json={**body, "template": {"name": "x" * 90}})
    assert bad_template.status_code == 422 and "prefix" in bad_template.json()["detail"]
    assert client.patch(f"/v1/schedules/{sid}", json={"timezone": "Nowhere"}).status_code == 422
    assert client.patch(f"/v1/schedules/{sid}", json={"regression_threshold": -1}).status_code == 422

    assert client.get("/v1/schedules/999").status_code == 404
    assert client.get("/v1/schedules/999").json()["detail"] == "no schedule with id 999"
    assert client.get("/v1/schedules/999/runs").status_code == 404
    assert client.post("/v1/schedules/999/run-now").status_code == 404
    deleted = client.delete(f"/v1/schedules/{sid}")
    assert deleted.status_code == 200 and deleted.json()["id"] == sid
    assert client.delete(f"/v1/schedules/{sid}").status_code == 404
    assert client.get("/v1/schedules").json() == []


def ZoneInfoBerlin() -> Any:  # noqa: N802 - reads like the zone it is
    from zoneinfo import ZoneInfo

    return ZoneInfo(BERLIN)


def test_run_now_through_the_api_creates_the_study(settings: Settings) -> None:
    client = TestClient(create_app(settings, dashboard=False))
    sid = client.post("/v1/schedules", json={"cron": "0 3 * * *", "template": tiny_spec("manual")}).json()["id"]
    run = client.post(f"/v1/schedules/{sid}/run-now")
    assert run.status_code == 201, run.text
    assert run.json()["state"] == "running" and run.json()["manual"] is True
    name = run.json()["study_name"]
    assert name.startswith("manual-") and client.get(f"/v1/studies/{name}").json()["state"] == "queued"
    again = client.post(f"/v1/schedules/{sid}/run-now")  # overlap skip, the first run still queued
    assert again.status_code == 409 and "still going" in again.json()["detail"]
    listed = client.get(f"/v1/schedules/{sid}/runs").json()
    assert [r["study_name"] for r in listed] == [name]


# ---------------------------------------------------------------- the scheduler


def test_fires_once_at_its_fire_time_and_reports_with_webhook(settings: Settings, receiver: Receiver) -> None:
    clock = Clock(utc(2026, 3, 28, 12))
    sid = make_schedule(settings, clock.now, webhook_url=receiver.url)
    scheduler = fast_scheduler(settings, clock)
    scheduler.tick()
    assert runs(settings, sid) == []
    clock.to(utc(2026, 3, 29, 1, 0, 5))  # 03:00:05 in Berlin, the day 02:30 does not exist
    scheduler.tick()
    scheduler.tick()
    (run,) = runs(settings, sid)
    assert (run.state, run.study_name, run.fire_time) == ("running", "nightly-20260329-0300", utc(2026, 3, 29, 1))
    add_completed_trials(settings, run.study_name, [0.5, 0.3, 0.4])
    end_study(settings, run.study_name)
    scheduler.tick()
    scheduler.notifier.wait(10)
    (run,) = runs(settings, sid)
    assert run.state == "done" and run.regression is False
    assert run.report["best_value"] == 0.3 and run.report["previous_study"] is None
    assert run.report["verdicts"] == {"converged": 3}
    assert [r["event"] for r in receiver.received] == ["run.finished"]
    assert receiver.received[0]["study"] == "nightly-20260329-0300"
    assert receiver.received[0]["report"]["best_value"] == 0.3
    with session_scope(get_engine(settings.database_url)) as session:
        (delivery,) = schedule_repo.deliveries_of_runs(session, [run.id])
        assert delivery.state == "delivered" and delivery.attempts[0]["status"] == 200


def test_two_schedulers_racing_fire_once(settings: Settings) -> None:
    clock = Clock(utc(2026, 6, 1, 0))
    sid = make_schedule(settings, clock.now, overlap="queue")
    clock.to(utc(2026, 6, 1, 0, 30, 1))  # 02:30:01 in Berlin
    schedulers = [fast_scheduler(settings, clock) for _ in range(2)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def race(scheduler: Scheduler) -> None:
        try:
            barrier.wait(5)
            for _ in range(3):
                scheduler.tick()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(s,)) for s in schedulers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    (run,) = runs(settings, sid)
    assert run.state == "running" and run.study_name == "nightly-20260601-0230"
    with session_scope(get_engine(settings.database_url)) as session:
        assert [s.name for s in repo.list_studies(session)] == ["nightly-20260601-0230"]


def test_misfire_after_downtime_runs_once_within_grace_else_skips(settings: Settings) -> None:
    clock = Clock(utc(2026, 7, 1, 12))
    within = make_schedule(settings, clock.now, prefix="within", misfire_grace_s=3600)
    beyond = make_schedule(settings, clock.now, prefix="beyond", misfire_grace_s=600)
    clock.to(utc(2026, 7, 4, 1, 0))  # down for three nights; the last fire (00:30 UTC) is 30 minutes late
    fast_scheduler(settings, clock).tick()
    states = [(r.fire_time.day, r.state) for r in runs(settings, within)]
    assert states == [(2, "skipped"), (3, "skipped"), (4, "running")]
    assert "beyond the misfire grace" in runs(settings, within)[0].reason
    assert [r.state for r in runs(settings, beyond)] == ["skipped", "skipped", "skipped"]
    assert all(r.study_name is None for r in runs(settings, beyond))


@pytest.mark.parametrize("policy", ["skip", "queue"])
def test_overlap_policy(settings: Settings, policy: str) -> None:
    clock = Clock(utc(2026, 8, 1, 12))
    sid = make_schedule(settings, clock.now, overlap=policy)
    scheduler = fast_scheduler(settings, clock)
    clock.to(utc(2026, 8, 2, 0, 30, 2))
    scheduler.tick()
    clock.to(utc(2026, 8, 3, 0, 30, 2))  # the first run's study is still queued
    scheduler.tick()
    first, second = runs(settings, sid)
    assert first.state == "running"
    if policy == "skip":
        assert second.state == "skipped" and "still going" in second.reason
    else:
        assert second.state == "waiting" and second.study_name is None
    end_study(settings, first.study_name, "cancelled")
    scheduler.tick()
    first, second = runs(settings, sid)
    assert first.state == "cancelled"
    if policy == "queue":
        assert second.state == "running" and second.study_name == "nightly-20260803-0230"


def test_warm_start_enqueues_previous_top_k_and_recommended_space(settings: Settings) -> None:
    clock = Clock(utc(2026, 9, 1, 12))
    sid = make_schedule(settings, clock.now, warm_start_top_k=2, warm_start_search_space=True)
    scheduler = fast_scheduler(settings, clock)
    clock.to(utc(2026, 9, 2, 0, 30, 2))
    scheduler.tick()
    (first,) = runs(settings, sid)
    assert first.warm_start == {"previous_study": None, "enqueued": 0, "search_space": False}
    add_completed_trials(settings, first.study_name, [0.9, 0.2, 0.5, 0.1, 0.7])
    end_study(settings, first.study_name)
    scheduler.tick()
    with session_scope(get_engine(settings.database_url)) as session:
        from converge.service import views

        recommended = views.get_study_diagnosis(session, first.study_name).recommendation.spec["search_space"]
    clock.to(utc(2026, 9, 3, 0, 30, 2))
    scheduler.tick()
    first, second = runs(settings, sid)
    assert first.state == "done" and second.state == "running"
    assert second.warm_start["previous_study"] == first.study_name and second.warm_start["search_space"] is True
    with session_scope(get_engine(settings.database_url)) as session:
        spec = repo.get_study(session, second.study_name).spec
    assert spec["search_space"] == parse_spec({"name": "x", "search_space": recommended}).model_dump(
        mode="json")["search_space"]
    space = parse_spec(spec).search_space
    # trials 3 (0.1) and 1 (0.2) of the first run, best first, reduced to what the new space sweeps and holds
    expected = rules.top_k_params([(0.1, {"lr": 0.004, "batch_size": 128, "epochs": 3}),
                                   (0.2, {"lr": 0.002, "batch_size": 128, "epochs": 3})], "minimize", 2, space)
    assert second.warm_start["params"] == expected and len(expected) == 2
    waiting = optuna.load_study(study_name=second.study_name, storage=storage_for(settings)).get_trials(
        states=(TrialState.WAITING,))
    assert [{k: t.system_attrs["fixed_params"][k] for k in e} for t, e in zip(waiting, expected)] == expected
    assert all(t.user_attrs["converge_warm_start"] for t in waiting)


def test_regression_is_flagged_and_notified(settings: Settings, receiver: Receiver) -> None:
    clock = Clock(utc(2026, 10, 1, 12))
    sid = make_schedule(settings, clock.now, regression_threshold=0.1, webhook_url=receiver.url)
    scheduler = fast_scheduler(settings, clock)
    for day, values, verdict in [(2, [0.5, 0.4], "converged"), (3, [0.6, 0.7], "diverged")]:
        clock.to(utc(2026, 10, day, 0, 30, 2))
        scheduler.tick()
        run = runs(settings, sid)[-1]
        add_completed_trials(settings, run.study_name, values, verdict)
        end_study(settings, run.study_name)
        scheduler.tick()
    scheduler.notifier.wait(10)
    first, second = runs(settings, sid)
    assert first.regression is False and second.regression is True
    assert second.report["best_delta"] == pytest.approx(0.2)
    assert second.report["verdict_shift"] == {"converged": -2, "diverged": 2}
    assert second.report["params_changed"]["lr"] == {"from": 0.002, "to": 0.001}
    # the deliveries are posted concurrently, so their order may vary
    assert sorted((r["event"], r["study"]) for r in receiver.received) == [
        ("run.finished", first.study_name), ("run.finished", second.study_name), ("run.regression", second.study_name)]
    assert all(r["regression"] is (r["study"] == second.study_name) for r in receiver.received)


@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_failing_webhook_is_retried_recorded_and_never_blocks(settings: Settings, mode: str) -> None:
    bad = Receiver(mode)
    try:
        clock = Clock(utc(2026, 11, 1, 12))
        sid = make_schedule(settings, clock.now, webhook_url=bad.url)
        # A hanging receiver holds each attempt for the whole timeout: a tick that waited on it would
        # take at least that long, however loaded the machine (the tick's own work is well under it).
        timeout_s = 2.0
        scheduler = fast_scheduler(settings, clock, timeout_s=timeout_s, retries=2, backoff_s=0.05)
        clock.to(utc(2026, 11, 2, 1, 30, 2))
        scheduler.tick()
        (run,) = runs(settings, sid)
        end_study(settings, run.study_name, "failed")
        started = time.monotonic()
        scheduler.tick()  # finishes the run and hands the webhook to the notifier
        assert time.monotonic() - started < timeout_s  # it did not wait for the receiver
        scheduler.notifier.wait(20)
        (run,) = runs(settings, sid)
        assert run.state == "failed"
        with session_scope(get_engine(settings.database_url)) as session:
            (delivery,) = schedule_repo.deliveries_of_runs(session, [run.id])
            assert delivery.event == "run.failed" and delivery.state == "failed"
            assert [a["attempt"] for a in delivery.attempts] == [1, 2, 3]
            if mode == "fail":
                assert all(a["status"] == 500 and "HTTP 500" in a["error"] for a in delivery.attempts)
            else:
                assert all("timed out" in a["error"] for a in delivery.attempts)
        assert len(bad.received) == 3
        scheduler.tick()  # the scheduler goes on
    finally:
        bad.close()


class DeadNotifier(Notifier):
    """A notifier whose process stops before posting anything: the deliveries stay pending."""

    def submit(self, delivery_id: int, url: str, payload: dict[str, Any], **_: Any) -> Any:
        return None


def test_a_delivery_left_pending_by_a_stopped_process_is_posted_once_by_another(
        settings: Settings, receiver: Receiver) -> None:
    clock = Clock(utc(2026, 11, 1, 12))
    sid = make_schedule(settings, clock.now, webhook_url=receiver.url)
    engine = get_engine(settings.database_url)
    crashed = Scheduler(settings, clock=clock, notifier=DeadNotifier(engine))
    clock.to(utc(2026, 11, 2, 1, 30, 2))
    crashed.tick()
    (run,) = runs(settings, sid)
    end_study(settings, run.study_name)
    crashed.tick()  # the run is done and its delivery written, but never posted
    with session_scope(engine) as session:
        (delivery,) = schedule_repo.deliveries_of_runs(session, [run.id])
        assert (delivery.state, delivery.attempts) == ("pending", [])
    survivors = [fast_scheduler(settings, clock) for _ in range(2)]
    for scheduler in survivors:  # not stale yet: left alone
        scheduler.tick()
    assert receiver.received == []

    with session_scope(engine) as session:  # as if the crash was long ago
        schedule_repo.deliveries_of_runs(session, [run.id])[0].updated_at = utcnow() - timedelta(hours=1)
    for scheduler in survivors:
        scheduler.tick()
    for scheduler in survivors:
        scheduler.notifier.wait(10)
    assert [r["event"] for r in receiver.received] == ["run.finished"]  # once, by one of the two
    with session_scope(engine) as session:
        (delivery,) = schedule_repo.deliveries_of_runs(session, [run.id])
        assert delivery.state == "delivered" and [a["attempt"] for a in delivery.attempts] == [1]


def test_launch_failure_marks_the_run_failed_and_notifies(settings: Settings, receiver: Receiver) -> None:
    clock = Clock(utc(2026, 12, 1, 12))
    sid = make_schedule(settings, clock.now, webhook_url=receiver.url)
    clock.to(utc(2026, 12, 2, 1, 30, 2))
    with session_scope(get_engine(settings.database_url)) as session:  # a template that no longer validates
        schedule_repo.get_schedule(session, sid).template = {**tiny_spec("nightly"), "n_trials": 0}
    scheduler = fast_scheduler(settings, clock)
    scheduler.tick()
    scheduler.notifier.wait(10)
    (run,) = runs(settings, sid)
    assert run.state == "failed" and "n_trials" in run.reason
    assert [r["event"] for r in receiver.received] == ["run.failed"]


# ---------------------------------------------------------------- CLI and migration


def test_schedule_cli(settings: Settings, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from converge.core.settings import get_settings
    from converge.service.cli import cli

    monkeypatch.setenv("CONVERGE_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    try:
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps(tiny_spec("clinightly")))
        runner = CliRunner()
        bad = runner.invoke(cli, ["schedule", "create", "--cron", "99 * * * *", "--timezone", BERLIN,
                                  "--spec", str(spec)])
        assert bad.exit_code == 2 and "'99 * * * *'" in bad.output
        made = runner.invoke(cli, ["schedule", "create", "--cron", "30 2 * * *", "--timezone", BERLIN,
                                   "--spec", str(spec), "--overlap", "queue", "--warm-start-top-k", "2"])
        assert made.exit_code == 0, made.output
        sid = int(made.output.split()[1])
        listed = runner.invoke(cli, ["schedule", "list"])
        assert listed.exit_code == 0 and "clinightly" in listed.output and "30 2 * * *" in listed.output
        now = runner.invoke(cli, ["schedule", "run-now", str(sid)])
        assert now.exit_code == 0, now.output
        assert "clinightly-" in now.output
        shown = runner.invoke(cli, ["schedule", "runs", str(sid)])
        assert shown.exit_code == 0 and "running" in shown.output
        assert runner.invoke(cli, ["schedule", "delete", str(sid)]).exit_code == 0
        missing = runner.invoke(cli, ["schedule", "delete", str(sid)])
        assert missing.exit_code == 1 and f"no schedule with id {sid}" in missing.output
        assert "Run the scheduler alone" in runner.invoke(cli, ["scheduler", "--help"]).output
    finally:
        get_settings.cache_clear()


def test_migration_0008_down_and_up(db_url: str) -> None:
    from alembic import command

    from converge.core.db.migrate import _alembic_config

    tables = {"converge_schedules", "converge_schedule_runs", "converge_webhook_deliveries"}
    assert tables <= set(sa.inspect(get_engine(db_url)).get_table_names())
    config = _alembic_config(db_url)
    command.downgrade(config, "0007")
    get_engine(db_url).dispose()
    assert not tables & set(sa.inspect(get_engine(db_url)).get_table_names())
    command.upgrade(config, "head")
    get_engine(db_url).dispose()
    assert tables <= set(sa.inspect(get_engine(db_url)).get_table_names())


def test_fire_times_limit_keeps_the_latest() -> None:
    times = rules.fire_times("* * * * *", "UTC", utc(2026, 1, 1), utc(2026, 1, 2), limit=5)
    assert times == [utc(2026, 1, 2) - timedelta(minutes=m) for m in (4, 3, 2, 1, 0)]
