"""The scheduler: fires schedules (nightly sweeps), launches their runs' studies, and reports on them.

One `tick()` reports on runs whose study has ended, does for every enabled schedule what its fire
times due by now ask for, then starts queued runs whose predecessor has ended:

- **Exactly once.** Each fire time becomes one `converge_schedule_runs` row, UNIQUE (schedule_id,
  fire_time): the scheduler whose insert wins launches the run; another one (a second API replica on
  the same PostgreSQL) gets the constraint violation and leaves it. Finishing a run is one conditional
  UPDATE (running → done), so its report and notifications happen once too.
- **Misfires.** Fire times missed while no scheduler ran: the latest one runs if it is at most the
  schedule's `misfire_grace_s` late; every other one is recorded as skipped (`schedule_rules.plan_fires`).
- **No overlap.** A fire while the schedule's previous run is going is recorded as skipped, or queued
  (`waiting`) and started once that run has ended, per schedule (`overlap`).
- **Warm start.** A run may enqueue the previous run's best k parameter sets as its first trials and
  start from the search space the previous run's study diagnosis recommends.
- **Reports.** A run whose study ended is compared with the schedule's previous finished run
  (`schedule_rules.run_report`) and flagged as a regression past the schedule's threshold.
- **Webhooks** are written as delivery rows with the change they report, then posted by
  `service.webhooks.Notifier` on its own threads: the tick never waits on a receiver. They go to
  public addresses only, unless `CONVERGE_WEBHOOK_ALLOW` lists them (`service.outbound`).

Time comes from an injected `clock` (tests control it). `converge serve` runs the scheduler as a daemon
thread of the API process rather than as a child process: it only reads and writes the database and
creates studies (Optuna and SQLAlchemy, never torch), holds no state in memory that another process
would need (so two API replicas each running one are safe, see above), and a thread costs no second
interpreter start nor a process to supervise. `converge scheduler` runs the same loop alone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import optuna

from converge.core.db import repo, schedule_repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.db.models import Schedule, ScheduleRun
from converge.core.errors import Conflict, NotFound, ServiceError
from converge.core.settings import Settings
from converge.service import outbound, views
from converge.service import schedule_rules as rules
from converge.service.webhooks import Notifier
from converge.studies import lifecycle
from converge.studies.spec import SpecError, parse_spec
from converge.studies.storage import storage_for

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
STARTING_TIMEOUT_S = 600  # a run still `starting` after this long lost its scheduler while launching
ENDED_STUDY_STATES = {"done": "done", "failed": "failed", "cancelled": "cancelled"}


def system_clock() -> datetime:
    return datetime.now(timezone.utc)


class Scheduler:
    def __init__(self, settings: Settings, *, clock: Clock = system_clock, notifier: Notifier | None = None):
        self.settings = settings
        self.clock = clock
        self.engine = get_engine(settings.database_url, settings.sqlite_busy_timeout_s)
        self.notifier = notifier or Notifier(self.engine, timeout_s=settings.webhook_timeout_s,
                                             retries=settings.webhook_retries, backoff_s=settings.webhook_backoff_s,
                                             allow=outbound.Allow.from_setting(settings.webhook_allow))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ the loop

    def tick(self) -> None:
        """One pass: fire what is due, start queued runs, report on ended ones. Errors are logged, per schedule."""
        now = self.clock()
        self._guard("ended runs", self._finish_ended, now)  # first: a run that ended no longer overlaps
        with session_scope(self.engine) as session:
            schedule_ids = [s.id for s in schedule_repo.list_schedules(session, enabled_only=True)]
        for schedule_id in schedule_ids:
            self._guard(f"schedule {schedule_id}", self._fire_due, schedule_id, now)
        self._guard("queued runs", self._start_waiting, now)
        self._guard("stuck runs", self._fail_stuck, now)
        self._guard("stale webhooks", self._resume_deliveries)

    def _guard(self, what: str, step: Callable[..., Any], *args: Any) -> None:
        try:
            step(*args)
        except Exception:  # noqa: BLE001 - one bad schedule or a database hiccup must not stop the scheduler
            log.exception("scheduler: %s failed; trying again next tick", what)

    def run_forever(self, poll_s: float | None = None) -> None:
        poll_s = self.settings.scheduler_poll_s if poll_s is None else poll_s
        log.info("scheduler started (every %g s)", poll_s)
        while not self._stop.is_set():
            self._guard("tick", self.tick)
            self._stop.wait(poll_s)
        log.info("scheduler stopped")

    def start_thread(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run_forever, name="converge-scheduler", daemon=True)
        self._thread.start()
        return self._thread

    def request_stop(self) -> None:
        """End `run_forever` after its current tick (safe from a signal handler)."""
        self._stop.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.notifier.close()

    # ------------------------------------------------------------ firing

    def _fire_due(self, schedule_id: int, now: datetime) -> None:
        launch: list[int] = []
        with session_scope(self.engine) as session:
            schedule = schedule_repo.get_schedule(session, schedule_id)
            after = schedule.fired_through or schedule.created_at
            due = rules.fire_times(schedule.cron, schedule.timezone, after, now)
            if not due:
                return
            for fire in rules.plan_fires(due, now, schedule.misfire_grace_s):
                if fire.action == "skip":
                    schedule_repo.claim_fire(session, schedule.id, fire.fire_time, "skipped", reason=fire.reason)
                    continue
                run = self._claim(session, schedule, fire.fire_time)
                if run is not None and run.state == "starting":
                    launch.append(run.id)
            schedule_repo.advance_fired_through(session, schedule.id, due[-1])
        for run_id in launch:  # after the commit: creating a study opens Optuna's own connections
            self._launch(run_id)

    def _claim(self, session: Any, schedule: Schedule, fire_time: datetime, *,
               manual: bool = False) -> ScheduleRun | None:
        """The run row of a fire time that is to run: starting, waiting or skipped by the overlap policy;
        None when another scheduler claimed it."""
        active = schedule_repo.has_active_run(session, schedule.id) or bool(
            schedule_repo.runs_in_state(session, ("waiting",), schedule.id))
        action = rules.overlap_action(schedule.overlap, active)
        state, reason = {"launch": ("starting", None), "queue": ("waiting", None),
                         "skip": ("skipped", "overlap: the previous run is still going")}[action]
        return schedule_repo.claim_fire(session, schedule.id, fire_time, state, reason=reason, manual=manual)

    def run_now(self, schedule_id: int) -> int:
        """Start a run of the schedule now (its overlap policy applies: with `skip` and a run going, a Conflict).
        The run's id; its study is created before this returns, unless it was queued."""
        now = self.clock()
        with session_scope(self.engine) as session:
            schedule = schedule_repo.get_schedule(session, schedule_id)
            busy = schedule_repo.has_active_run(session, schedule.id)
            if busy and schedule.overlap == "skip":
                raise Conflict(f"schedule {schedule_id}'s previous run is still going and its overlap policy is "
                               "skip; wait for it, or set overlap to queue")
            run = self._claim(session, schedule, now, manual=True)
            if run is None:
                raise Conflict(f"schedule {schedule_id} already has a run for {now.isoformat()}; try again")
            run_id, state = run.id, run.state
        if state == "starting":
            self._launch(run_id)
        return run_id

    def _start_waiting(self, now: datetime) -> None:
        with session_scope(self.engine) as session:
            waiting = schedule_repo.runs_in_state(session, ("waiting",))
            started: list[int] = []
            seen: set[int] = set()
            for run in waiting:  # oldest first, one per schedule
                if run.schedule_id in seen or schedule_repo.has_active_run(session, run.schedule_id):
                    seen.add(run.schedule_id)
                    continue
                seen.add(run.schedule_id)
                if schedule_repo.transition_run(session, run.id, ("waiting",), "starting"):
                    started.append(run.id)
        for run_id in started:
            self._launch(run_id)

    def _fail_stuck(self, now: datetime) -> None:
        with session_scope(self.engine) as session:
            for run in schedule_repo.runs_in_state(session, ("starting",)):
                if run.study_name is None and run.created_at < now - timedelta(seconds=STARTING_TIMEOUT_S):
                    self._fail(session, run, "the scheduler stopped while launching this run", now)

    # ------------------------------------------------------------ launching

    def _launch(self, run_id: int) -> None:
        """Create the run's study (warm-started as the schedule says), then mark the run running; a failure
        marks it failed and notifies."""
        now = self.clock()
        try:
            with session_scope(self.engine) as session:
                run = schedule_repo.get_run(session, run_id)
                schedule = schedule_repo.get_schedule(session, run.schedule_id)
                spec_data = dict(schedule.template)
                prefix = spec_data["name"]
                previous = schedule_repo.previous_finished_run(session, schedule.id, run)
                warm: dict[str, Any] = {"previous_study": previous.study_name if previous else None,
                                        "enqueued": 0, "search_space": False}
                if previous is not None and schedule.warm_start_search_space:
                    space = self._recommended_space(session, previous.study_name)
                    if space is not None:
                        spec_data["search_space"], warm["search_space"] = space, True
                base_name = rules.run_name(prefix, run.fire_time, schedule.timezone)
                top_k, fire_time = schedule.warm_start_top_k, run.fire_time
            enqueue: list[dict[str, Any]] = []
            if previous is not None and top_k > 0:
                spec = parse_spec({**spec_data, "name": base_name})
                enqueue = rules.top_k_params(self._completed_trials(previous.study_name), spec.objective.direction,
                                             top_k, spec.search_space)
                warm["enqueued"], warm["params"] = len(enqueue), enqueue
            name = self._submit(spec_data, base_name, enqueue)
        except Exception as exc:  # noqa: BLE001 - recorded on the run and notified, never raised into the loop
            log.exception("scheduler: run %d could not start", run_id)
            with session_scope(self.engine) as session:
                run = schedule_repo.get_run(session, run_id)
                self._fail(session, run, f"could not start: {_one_line(exc)}", now)
            return
        with session_scope(self.engine) as session:
            schedule_repo.transition_run(session, run_id, ("starting",), "running", study_name=name, started_at=now,
                                         warm_start=warm)
        log.info("scheduler: run %d (fire time %s) started study %r", run_id, fire_time.isoformat(), name)

    def _submit(self, spec_data: dict[str, Any], base_name: str, enqueue: list[dict[str, Any]]) -> str:
        """Submit the study under `base_name`, or `base_name-2`... when a run already took that name (two fire
        times in one local minute, around a daylight-saving change, or run-now twice in a minute)."""
        for n in range(1, 10):
            name = base_name if n == 1 else f"{base_name}-{n}"
            try:
                lifecycle.submit_study(self.settings, parse_spec({**spec_data, "name": name}), enqueue)
                return name
            except Conflict:
                continue
        raise Conflict(f"studies {base_name} to {base_name}-9 all exist")

    def _recommended_space(self, session: Any, study_name: str) -> dict[str, Any] | None:
        try:
            diagnosis = views.get_study_diagnosis(session, study_name)
        except (NotFound, SpecError):
            return None
        return diagnosis.recommendation.spec.get("search_space")

    def _completed_trials(self, study_name: str) -> list[tuple[float | None, dict[str, Any]]]:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage_for(self.settings, patient=False))
        except KeyError:
            return []
        return [(t.value, t.params) for t in study.get_trials(deepcopy=False,
                                                              states=(optuna.trial.TrialState.COMPLETE,))]

    # ------------------------------------------------------------ reporting

    def _finish_ended(self, now: datetime) -> None:
        with session_scope(self.engine) as session:
            running = [(r.id, r.study_name) for r in schedule_repo.runs_in_state(session, ("running",))]
        for run_id, study_name in running:
            self._guard(f"run {run_id}", self._finish, run_id, study_name, now)

    def _finish(self, run_id: int, study_name: str, now: datetime) -> None:
        storage = storage_for(self.settings, patient=False)
        with session_scope(self.engine) as session:
            try:
                study_state = repo.get_study(session, study_name).state
            except NotFound:
                study_state = "cancelled"  # deleted under us
            if study_state not in ENDED_STUDY_STATES:
                return
            run = schedule_repo.get_run(session, run_id)
            schedule = schedule_repo.get_schedule(session, run.schedule_id)
            current = self._summary(session, storage, study_name, study_state)
            previous_run = schedule_repo.previous_finished_run(session, schedule.id, run)
            previous = _summary_of_report(previous_run.report) if previous_run is not None else None
            direction = schedule.template.get("objective", {}).get("direction", "minimize")
            report = rules.run_report(current, previous, direction, schedule.regression_threshold)
            final = ENDED_STUDY_STATES[study_state]
            if not schedule_repo.transition_run(session, run_id, ("running",), final, report=report,
                                                regression=report["regression"], finished_at=now):
                return  # another scheduler finished it
            events = ["run.finished"] if final == "done" else ["run.failed"]
            if report["regression"]:
                events.append("run.regression")
            run = schedule_repo.get_run(session, run_id)
            session.refresh(run)
            deliveries = self._deliveries(session, schedule, run, events)
        self._post(deliveries)

    def _summary(self, session: Any, storage: Any, study_name: str, state: str) -> rules.RunSummary:
        best = views.get_study_out(session, storage, study_name).best
        try:
            verdicts = dict(views.get_study_diagnosis(session, study_name).verdicts)
        except (NotFound, SpecError):
            verdicts = {}
        return rules.RunSummary(study=study_name, state=state, best_value=best.value if best else None,
                                best_params=dict(best.params) if best else {}, verdicts=verdicts)

    # ------------------------------------------------------------ failing and notifying

    def _fail(self, session: Any, run: ScheduleRun, reason: str, now: datetime) -> None:
        if not schedule_repo.transition_run(session, run.id, ("starting", "waiting"), "failed", reason=reason,
                                            finished_at=now):
            return
        session.refresh(run)
        schedule = schedule_repo.get_schedule(session, run.schedule_id)
        deliveries = self._deliveries(session, schedule, run, ["run.failed"])
        session.commit()
        self._post(deliveries)

    def _deliveries(self, session: Any, schedule: Schedule, run: ScheduleRun,
                    events: list[str]) -> list[tuple[int, str, dict[str, Any]]]:
        if not schedule.webhook_url:
            return []
        out = []
        for event in events:
            payload = webhook_payload(event, schedule, run)
            delivery = schedule_repo.add_delivery(session, schedule.id, run.id, event, schedule.webhook_url, payload)
            out.append((delivery.id, schedule.webhook_url, payload))
        return out

    def _resume_deliveries(self) -> None:
        """Post again the deliveries a stopped process left pending (`service.webhooks`). On the
        wall clock, not `self.clock`: delivery times are the notifier's, which are real."""
        now = datetime.now(timezone.utc)
        stale_before = now - timedelta(seconds=self.notifier.stale_after_s)
        with session_scope(self.engine) as session:
            stale = [(d.id, d.url, d.payload, len(d.attempts))
                     for d in schedule_repo.stale_pending_deliveries(session, stale_before)]
        for delivery_id, url, payload, attempts_so_far in stale:
            with session_scope(self.engine) as session:
                mine = schedule_repo.claim_stale_delivery(session, delivery_id, stale_before, now)
            if mine:
                log.warning("webhook delivery %d was left pending by a stopped process: posting it again", delivery_id)
                self.notifier.submit(delivery_id, url, payload, attempts_so_far=attempts_so_far)

    def _post(self, deliveries: list[tuple[int, str, dict[str, Any]]]) -> None:
        for delivery_id, url, payload in deliveries:
            self.notifier.submit(delivery_id, url, payload)


def webhook_payload(event: str, schedule: Schedule, run: ScheduleRun) -> dict[str, Any]:
    """The JSON a schedule's webhook receives."""
    return {
        "event": event, "schedule_id": schedule.id, "run_id": run.id, "prefix": schedule.template.get("name"),
        "fire_time": rules.as_utc(run.fire_time).isoformat(), "state": run.state, "study": run.study_name,
        "reason": run.reason, "regression": run.regression, "report": run.report,
    }


def _summary_of_report(report: dict[str, Any] | None) -> rules.RunSummary | None:
    if not report:
        return None
    value = report.get("best_value")
    return rules.RunSummary(study=report["study"], state=report.get("state", "done"),
                            best_value=float(value) if value is not None else None,
                            best_params=report.get("best_params") or {}, verdicts=report.get("verdicts") or {})


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, (SpecError, ServiceError)):
        return str(exc).replace("\n", " ")
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")
