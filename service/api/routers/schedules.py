"""`/v1/schedules`: nightly (cron) sweeps, their runs with reports, and run-now."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, status

from converge.service import outbound, schedules
from converge.service.api.deps import SessionDep, SessionRoute, SettingsDep, error_responses, require_scope
from converge.service.schedules import RUN_EXAMPLE, SCHEDULE_EXAMPLE, RunOut, ScheduleIn, ScheduleOut, SchedulePatch

router = APIRouter(prefix="/v1/schedules", tags=["schedules"], route_class=SessionRoute)

MAX_ID = 2_147_483_647  # a 32-bit integer column
ScheduleId = Annotated[int, Path(ge=1, le=MAX_ID, description="the schedule's id",
                                 openapi_examples={"a schedule": {"value": 1}})]
NewSchedule = Annotated[ScheduleIn, Body(description="the schedule; every field but `cron` and `template` has a "
                                         "default",
                                         openapi_examples={"nightly": {"value": schedules.SCHEDULE_IN_EXAMPLE}})]
Changes = Annotated[SchedulePatch, Body(description="the fields to change; the others stay as they are",
                                        openapi_examples={"disable": {"value": {"enabled": False}},
                                                          "new time": {"value": {"cron": "0 3 * * 1-5",
                                                                                 "timezone": "America/New_York"}}})]

# Every schedule operation needs `admin`: schedules launch studies unattended, and read back their webhook URLs.
ADMIN = [Depends(require_scope("admin"))]
NO_SCHEDULE = {404: "no schedule with that id"}
BAD_ID = f"the schedule id is not an integer in 1..{MAX_ID}"
BAD_SCHEDULE = ("the body is not JSON or not a valid schedule: a bad cron expression or time zone (named), a template "
                "that is not a valid study spec or whose name is too long for a prefix, a policy out of range, a "
                "webhook URL that is not http(s) or whose host is not public (loopback, private, link-local...: "
                "allowed only if CONVERGE_WEBHOOK_ALLOW lists it), an unknown field; `problems` lists every problem")


def _list_example(example: list[Any]) -> dict[int | str, dict[str, Any]]:
    return {200: {"content": {"application/json": {"example": example}}}}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ScheduleOut, dependencies=ADMIN,
             responses=error_responses("admin", body=True, invalid=BAD_SCHEDULE))
def create_schedule(data: NewSchedule, settings: SettingsDep, session: SessionDep) -> ScheduleOut:
    """Create a schedule: a study template launched at each fire time of a cron expression in a time zone.

    Each run's study is named `{template name}-{YYYYMMDD-HHMM}` (the fire time in the schedule's zone).
    The scheduler (in `converge serve`, or `converge scheduler`) fires each fire time once, even with
    several replicas on one database. Fire times before the schedule was created are not missed ones.
    A webhook URL must reach a public address (its host name resolved), unless `CONVERGE_WEBHOOK_ALLOW`
    lists its host or a network holding its address; each delivery checks it again, and never follows
    a redirect.
    """
    return schedules.create_schedule(session, data, allow=outbound.Allow.from_setting(settings.webhook_allow))


@router.get("", response_model=list[ScheduleOut], dependencies=ADMIN,
            responses={**error_responses("admin", invalid=None), **_list_example([SCHEDULE_EXAMPLE])})
def list_schedules(session: SessionDep) -> list[ScheduleOut]:
    """Every schedule, by id, with its next fire time."""
    return schedules.list_schedules(session)


@router.get("/{schedule_id}", response_model=ScheduleOut, dependencies=ADMIN,
            responses=error_responses("admin", NO_SCHEDULE, invalid=BAD_ID))
def get_schedule(schedule_id: ScheduleId, session: SessionDep) -> ScheduleOut:
    """One schedule, with its next fire time (null while disabled)."""
    return schedules.get_schedule(session, schedule_id)


@router.patch("/{schedule_id}", response_model=ScheduleOut, dependencies=ADMIN,
              responses=error_responses("admin", NO_SCHEDULE, body=True, invalid=f"{BAD_ID}, or {BAD_SCHEDULE}"))
def update_schedule(schedule_id: ScheduleId, changes: Changes, settings: SettingsDep,
                    session: SessionDep) -> ScheduleOut:
    """Change a schedule. A new cron or time zone, or enabling a disabled schedule, counts fire times from now
    on (the ones in between are not missed ones); `webhook_url: null` removes the webhook, and a new one is
    checked as at creation."""
    return schedules.update_schedule(session, schedule_id, changes,
                                     allow=outbound.Allow.from_setting(settings.webhook_allow))


@router.delete("/{schedule_id}", response_model=ScheduleOut, dependencies=ADMIN,
               responses=error_responses("admin", NO_SCHEDULE, invalid=BAD_ID))
def delete_schedule(schedule_id: ScheduleId, session: SessionDep) -> ScheduleOut:
    """Delete a schedule and its run records (the studies its runs created stay). Returns the schedule as it
    was."""
    return schedules.delete_schedule(session, schedule_id)


@router.get("/{schedule_id}/runs", response_model=list[RunOut], dependencies=ADMIN,
            responses={**error_responses("admin", NO_SCHEDULE, invalid=f"{BAD_ID}, or a `limit` outside 1..1000"),
                       **_list_example([RUN_EXAMPLE])})
def list_runs(schedule_id: ScheduleId, session: SessionDep,
              limit: Annotated[int, Query(ge=1, le=1000, description="runs to return, newest first",
                                          openapi_examples={"last 30": {"value": 30}})] = 100) -> list[RunOut]:
    """The schedule's runs, newest fire time first: started, queued and skipped ones (with the reason), each
    finished one with its report (compared with the previous finished run: best value and its delta, verdict
    counts and their shift, changed best parameters, the regression flag) and its webhook deliveries."""
    return schedules.list_runs(session, schedule_id, limit)


@router.post("/{schedule_id}/run-now", status_code=status.HTTP_201_CREATED, response_model=RunOut,
             dependencies=ADMIN,
             responses=error_responses("admin", {**NO_SCHEDULE, 409: "the previous run is still going and the "
                                                 "schedule's overlap policy is skip"}, invalid=BAD_ID))
def run_now(schedule_id: ScheduleId, settings: SettingsDep, session: SessionDep) -> RunOut:
    """Start a run now, as the cron would (warm start included). With overlap `queue` and a run going it is
    queued (`waiting`); a study that cannot be created makes the run `failed`, with the reason."""
    from converge.service.scheduler import Scheduler

    run_id = Scheduler(settings).run_now(schedule_id)
    session.expire_all()
    return schedules.get_run(session, run_id)
