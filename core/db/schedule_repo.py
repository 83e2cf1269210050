"""Repository functions for schedules, their runs and webhook deliveries. They never commit:
`session_scope()` does."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from converge.core.db.models import Schedule, ScheduleRun, WebhookDelivery, utcnow
from converge.core.errors import NotFound


def add_schedule(session: Session, **fields: Any) -> Schedule:
    schedule = Schedule(**fields)
    session.add(schedule)
    session.flush()
    return schedule


def get_schedule(session: Session, schedule_id: int) -> Schedule:
    schedule = session.get(Schedule, schedule_id)
    if schedule is None:
        raise NotFound(f"no schedule with id {schedule_id}")
    return schedule


def list_schedules(session: Session, *, enabled_only: bool = False) -> list[Schedule]:
    query = select(Schedule).order_by(Schedule.id)
    if enabled_only:
        query = query.where(Schedule.enabled.is_(True))
    return list(session.scalars(query))


def delete_schedule(session: Session, schedule_id: int) -> None:
    session.delete(get_schedule(session, schedule_id))  # runs and deliveries go with it (ON DELETE CASCADE)
    session.flush()


def advance_fired_through(session: Session, schedule_id: int, fire_time: datetime) -> None:
    """Move the schedule's cursor forward to `fire_time` (never back: two schedulers may both move it)."""
    session.execute(update(Schedule).where(Schedule.id == schedule_id)
                    .where((Schedule.fired_through.is_(None)) | (Schedule.fired_through < fire_time))
                    .values(fired_through=fire_time))


def claim_fire(session: Session, schedule_id: int, fire_time: datetime, state: str, *, reason: str | None = None,
               manual: bool = False) -> ScheduleRun | None:
    """Insert the run row of one fire time: the row, or None when another scheduler inserted it first
    (UNIQUE (schedule_id, fire_time)). Flushed inside a savepoint, so the caller's session stays usable."""
    run = ScheduleRun(schedule_id=schedule_id, fire_time=fire_time, state=state, reason=reason, manual=manual)
    try:
        with session.begin_nested():
            session.add(run)
            session.flush()
    except IntegrityError:
        return None
    return run


def get_run(session: Session, run_id: int) -> ScheduleRun:
    run = session.get(ScheduleRun, run_id)
    if run is None:
        raise NotFound(f"no schedule run with id {run_id}")
    return run


def list_runs(session: Session, schedule_id: int, limit: int = 100) -> list[ScheduleRun]:
    """The schedule's runs, newest fire time first."""
    return list(session.scalars(select(ScheduleRun).where(ScheduleRun.schedule_id == schedule_id)
                                .order_by(ScheduleRun.fire_time.desc(), ScheduleRun.id.desc()).limit(limit)))


def runs_in_state(session: Session, states: tuple[str, ...], schedule_id: int | None = None) -> list[ScheduleRun]:
    query = select(ScheduleRun).where(ScheduleRun.state.in_(states)).order_by(ScheduleRun.fire_time, ScheduleRun.id)
    if schedule_id is not None:
        query = query.where(ScheduleRun.schedule_id == schedule_id)
    return list(session.scalars(query))


def has_active_run(session: Session, schedule_id: int) -> bool:
    """Whether a run of the schedule has started and not ended (`starting` or `running`)."""
    return bool(session.scalar(select(func.count()).select_from(ScheduleRun)
                               .where(ScheduleRun.schedule_id == schedule_id,
                                      ScheduleRun.state.in_(("starting", "running")))))


def previous_finished_run(session: Session, schedule_id: int, before: ScheduleRun) -> ScheduleRun | None:
    """The schedule's latest run that finished with a study (done, failed or cancelled) before `before`."""
    return session.scalar(select(ScheduleRun)
                          .where(ScheduleRun.schedule_id == schedule_id, ScheduleRun.id != before.id,
                                 ScheduleRun.study_name.is_not(None),
                                 ScheduleRun.state.in_(("done", "failed", "cancelled")),
                                 ScheduleRun.fire_time <= before.fire_time)
                          .order_by(ScheduleRun.fire_time.desc(), ScheduleRun.id.desc()).limit(1))


def transition_run(session: Session, run_id: int, from_states: tuple[str, ...], to_state: str,
                   **values: Any) -> bool:
    """Move a run from one of `from_states` to `to_state` in one UPDATE: True for the one caller that did it
    (two schedulers finishing the same run: only one reports it and notifies)."""
    result = session.execute(update(ScheduleRun).where(ScheduleRun.id == run_id, ScheduleRun.state.in_(from_states))
                             .values(state=to_state, **values).execution_options(synchronize_session=False))
    return result.rowcount == 1


# ---------------------------------------------------------------- webhook deliveries


def add_delivery(session: Session, schedule_id: int, run_id: int, event: str, url: str,
                 payload: dict[str, Any]) -> WebhookDelivery:
    delivery = WebhookDelivery(schedule_id=schedule_id, run_id=run_id, event=event, url=url, payload=payload,
                               state="pending", attempts=[])
    session.add(delivery)
    session.flush()
    return delivery


def record_attempt(session: Session, delivery_id: int, attempt: dict[str, Any], state: str) -> None:
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None:  # the schedule was deleted meanwhile
        return
    delivery.attempts = [*delivery.attempts, attempt]
    delivery.state = state
    delivery.updated_at = utcnow()


def deliveries_of_runs(session: Session, run_ids: list[int]) -> list[WebhookDelivery]:
    if not run_ids:
        return []
    return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.run_id.in_(run_ids))
                                .order_by(WebhookDelivery.id)))


def stale_pending_deliveries(session: Session, stale_before: datetime) -> list[WebhookDelivery]:
    """Deliveries still pending that nobody has touched since `stale_before`: their process stopped."""
    return list(session.scalars(select(WebhookDelivery)
                                .where(WebhookDelivery.state == "pending", WebhookDelivery.updated_at < stale_before)
                                .order_by(WebhookDelivery.id)))


def claim_stale_delivery(session: Session, delivery_id: int, stale_before: datetime, now: datetime) -> bool:
    """Take a stale pending delivery over: one conditional UPDATE, so of two schedulers one wins."""
    result = session.execute(update(WebhookDelivery)
                             .where(WebhookDelivery.id == delivery_id, WebhookDelivery.state == "pending",
                                    WebhookDelivery.updated_at < stale_before)
                             .values(updated_at=now).execution_options(synchronize_session=False))
    return result.rowcount == 1
