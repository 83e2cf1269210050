"""Schedules as users see them: the input models (validated in full), and create / read / change / delete,
shared by the REST API and the CLI. The scheduler that fires them is `service.scheduler`."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from converge.core.db import schedule_repo
from converge.core.db.models import Schedule, ScheduleRun, WebhookDelivery, utcnow
from converge.core.settings import get_settings
from converge.service import outbound
from converge.service import schedule_rules as rules
from converge.studies import policy
from converge.studies.spec import SpecError, parse_spec

MAX_GRACE_S = 7 * 24 * 3600
MAX_TOP_K = 100

TEMPLATE_EXAMPLE: dict[str, Any] = {"name": "nightly-digits", "task": {"model": "mlp", "dataset": "sklearn:digits"},
                                    "search_space": {"epochs": {"low": 3, "high": 10}}, "n_trials": 12}
SCHEDULE_IN_EXAMPLE: dict[str, Any] = {
    "cron": "30 2 * * *", "timezone": "Europe/Berlin", "template": TEMPLATE_EXAMPLE, "enabled": True,
    "misfire_grace_s": 3600, "overlap": "skip", "warm_start_top_k": 3, "warm_start_search_space": True,
    "regression_threshold": 0.05, "webhook_url": "https://hooks.example.com/converge",
}


def _check_cron(value: str) -> str:
    return rules.check_cron(value)


def _check_zone(value: str) -> str:
    rules.check_timezone(value)
    return value


def _check_template(value: dict[str, Any]) -> dict[str, Any]:
    try:
        spec = parse_spec(value)
    except SpecError as exc:
        raise ValueError("invalid study template: " + "; ".join(exc.problems)) from None
    refused = policy.policy_problems(spec, get_settings())  # the operator's plug-in and data settings
    if refused:
        raise ValueError("invalid study template: " + "; ".join(refused))
    if len(spec.name) > rules.MAX_PREFIX_LEN:
        raise ValueError(f"the template's name is each run's prefix ({{name}}-YYYYMMDD-HHMM): at most "
                         f"{rules.MAX_PREFIX_LEN} characters, got {len(spec.name)}")
    return spec.model_dump(mode="json")


def _check_url(value: str | None) -> str | None:
    if value is None:
        return None
    if not value.startswith(("http://", "https://")) or len(value) < 8 or any(c.isspace() for c in value):
        raise ValueError(f"webhook_url {value!r} must be an http:// or https:// URL without spaces")
    return value


def _check_threshold(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("regression_threshold must be a finite number")
    return value


Cron = Annotated[str, AfterValidator(_check_cron), Field(
    max_length=120, description="a 5-field cron expression (minute hour day-of-month month day-of-week), evaluated "
    "in `timezone`")]
Zone = Annotated[str, AfterValidator(_check_zone), Field(
    max_length=64, description="an IANA time zone; fire times and run names are in it, across daylight-saving "
    "changes as cron does (a time skipped by the change fires just after it, a repeated one once)")]
Template = Annotated[dict[str, Any], AfterValidator(_check_template), Field(
    description="a study spec (as POST /v1/studies takes); its `name` is the prefix of each run's study, named "
    f"`{{name}}-YYYYMMDD-HHMM` in the schedule's zone (at most {rules.MAX_PREFIX_LEN} characters)")]
Grace = Annotated[int, Field(ge=0, le=MAX_GRACE_S, description="after downtime, a missed fire time at most this "
                             "many seconds late runs once (the latest only); an older one is recorded as skipped")]
Overlap = Annotated[Literal["skip", "queue"], Field(
    description="a fire while the previous run is still going: `skip` records it as skipped, `queue` starts it "
    "once the previous run has ended")]
TopK = Annotated[int, Field(ge=0, le=MAX_TOP_K, description="enqueue the previous run's best k parameter sets as the "
                            "first trials (0: off)")]
WarmSpace = Annotated[bool, Field(description="start from the previous run's recommended search space (its study "
                                  "diagnosis)")]
Threshold = Annotated[float, AfterValidator(_check_threshold), Field(
    ge=0, description="a run is a regression when its best objective is worse than the previous run's by more "
    "than this fraction of the previous best's magnitude (0.05: 5%)")]
Url = Annotated[str, AfterValidator(_check_url), Field(
    max_length=2000, description="receives a JSON POST on run.finished, run.regression and run.failed; a "
    "public address only (redirects are not followed), unless CONVERGE_WEBHOOK_ALLOW lists its host or a "
    "network holding its address")]


class ScheduleIn(BaseModel):
    """A new schedule. Every field but `cron` and `template` has a default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True,
                              json_schema_extra={"examples": [SCHEDULE_IN_EXAMPLE]})

    cron: Cron
    timezone: Zone = "UTC"
    template: Template
    enabled: bool = True
    misfire_grace_s: Grace = 3600
    overlap: Overlap = "skip"
    warm_start_top_k: TopK = 0
    warm_start_search_space: WarmSpace = False
    regression_threshold: Threshold = 0.05
    webhook_url: Url | None = None


class SchedulePatch(BaseModel):
    """A change to a schedule: only the fields given change (`webhook_url: null` removes the webhook)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True,
                              json_schema_extra={"examples": [{"enabled": False}, {"cron": "0 3 * * 1-5"}]})

    cron: Cron | None = None
    timezone: Zone | None = None
    template: Template | None = None
    enabled: bool | None = None
    misfire_grace_s: Grace | None = None
    overlap: Overlap | None = None
    warm_start_top_k: TopK | None = None
    warm_start_search_space: WarmSpace | None = None
    regression_threshold: Threshold | None = None
    webhook_url: Url | None = None


SCHEDULE_EXAMPLE: dict[str, Any] = {
    "id": 1, **SCHEDULE_IN_EXAMPLE, "template": parse_spec(TEMPLATE_EXAMPLE).model_dump(mode="json"),
    "next_fire_time": "2026-11-29T01:30:00Z", "fired_through": "2026-11-28T01:30:00Z",
    "created_at": "2026-11-20T10:00:00Z", "updated_at": "2026-11-20T10:00:00Z",
}


class ScheduleOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [SCHEDULE_EXAMPLE]})

    id: int
    cron: str
    timezone: str
    template: dict[str, Any] = Field(description="the study spec each run starts from (complete, as stored)")
    enabled: bool
    misfire_grace_s: int
    overlap: Literal["skip", "queue"]
    warm_start_top_k: int
    warm_start_search_space: bool
    regression_threshold: float
    webhook_url: str | None
    next_fire_time: datetime | None = Field(description="the next cron fire time (UTC); null while disabled")
    fired_through: datetime | None = Field(description="the latest fire time the scheduler has handled")
    created_at: datetime
    updated_at: datetime


class DeliveryOut(BaseModel):
    id: int
    event: Literal["run.finished", "run.regression", "run.failed"]
    url: str
    state: Literal["pending", "delivered", "failed"]
    attempts: list[dict[str, Any]] = Field(description="each attempt: `attempt`, `at`, `status` (HTTP) and/or "
                                           "`error`, `seconds`")


RUN_EXAMPLE: dict[str, Any] = {
    "id": 12, "schedule_id": 1, "fire_time": "2026-11-28T01:30:00Z", "state": "done", "reason": None,
    "study_name": "nightly-digits-20261128-0230", "manual": False,
    "warm_start": {"previous_study": "nightly-digits-20261127-0230", "enqueued": 3, "search_space": True},
    "regression": False,
    "report": {"study": "nightly-digits-20261128-0230", "state": "done", "direction": "minimize",
               "best_value": 0.081, "best_params": {"lr": 0.012, "batch_size": 64, "epochs": 9,
                                                    "weight_decay": 0.0001, "dropout": 0.1},
               "verdicts": {"converged": 9, "diverged": 1, "still_improving": 2},
               "previous_study": "nightly-digits-20261127-0230", "previous_best_value": 0.087,
               "best_delta": -0.006, "verdict_shift": {"converged": 2, "diverged": -2},
               "params_changed": {"lr": {"from": 0.009, "to": 0.012}}, "regression": False,
               "regression_threshold": 0.05},
    "deliveries": [{"id": 4, "event": "run.finished", "url": "https://hooks.example.com/converge",
                    "state": "delivered", "attempts": [{"attempt": 1, "at": "2026-11-28T02:41:07Z", "status": 200,
                                                        "seconds": 0.08}]}],
    "created_at": "2026-11-28T01:30:01Z", "started_at": "2026-11-28T01:30:02Z", "finished_at": "2026-11-28T02:41:06Z",
}


class RunOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [RUN_EXAMPLE]})

    id: int
    schedule_id: int
    fire_time: datetime = Field(description="the cron fire time it is for (for run-now, the moment it was asked)")
    state: Literal["waiting", "starting", "running", "done", "failed", "cancelled", "skipped"] = Field(
        description="waiting (queued behind a running run) → starting → running → done | failed | cancelled "
                    "(its study's end); skipped (missed, or an overlap)")
    reason: str | None = Field(description="why it was skipped or failed")
    study_name: str | None
    manual: bool = Field(description="started by run-now, not by the cron")
    warm_start: dict[str, Any] | None = Field(description="what was carried over from the previous run")
    regression: bool | None = Field(description="its best worsened by more than the schedule's threshold; null "
                                    "until it finished")
    report: dict[str, Any] | None = Field(description="the comparison with the previous finished run: best_value, "
                                          "previous_best_value, best_delta, verdicts, verdict_shift, best_params, "
                                          "params_changed, regression; null until it finished")
    deliveries: list[DeliveryOut] = Field(description="the webhook notifications of this run")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


# ---------------------------------------------------------------- operations


def schedule_out(schedule: Schedule, now: datetime | None = None) -> ScheduleOut:
    base = max(filter(None, [schedule.fired_through, now or utcnow()]))
    next_fire = rules.next_fire_time(schedule.cron, schedule.timezone, base) if schedule.enabled else None
    return ScheduleOut(next_fire_time=next_fire, **{f: getattr(schedule, f) for f in (
        "id", "cron", "timezone", "template", "enabled", "misfire_grace_s", "overlap", "warm_start_top_k",
        "warm_start_search_space", "regression_threshold", "webhook_url", "fired_through", "created_at",
        "updated_at")})


def webhook_problems(url: str | None, allow: outbound.Allow) -> list[str]:
    """The webhook URL's problem under the address rule (`service.outbound`: public addresses only, unless
    `CONVERGE_WEBHOOK_ALLOW` lists the host or a network holding its address), as a `webhook_url: ...` line."""
    problem = outbound.url_problem(url, allow) if url else None
    return [f"webhook_url: {problem}"] if problem else []


def _check_webhook(url: str | None, allow: outbound.Allow) -> None:
    if problems := webhook_problems(url, allow):
        raise SpecError(problems, "schedule")


def create_schedule(session: Session, data: ScheduleIn, now: datetime | None = None, *,
                    allow: outbound.Allow = outbound.PUBLIC_ONLY) -> ScheduleOut:
    """A new schedule; it fires from `now` on (fire times before it are not missed ones). `allow`: what
    `CONVERGE_WEBHOOK_ALLOW` lets a webhook reach besides public addresses (a SpecError otherwise)."""
    _check_webhook(data.webhook_url, allow)
    now = now or utcnow()
    schedule = schedule_repo.add_schedule(session, **data.model_dump(), fired_through=now, created_at=now)
    return schedule_out(schedule, now)


def get_schedule(session: Session, schedule_id: int) -> ScheduleOut:
    return schedule_out(schedule_repo.get_schedule(session, schedule_id))


def list_schedules(session: Session) -> list[ScheduleOut]:
    return [schedule_out(s) for s in schedule_repo.list_schedules(session)]


def update_schedule(session: Session, schedule_id: int, patch: SchedulePatch, *,
                    allow: outbound.Allow = outbound.PUBLIC_ONLY) -> ScheduleOut:
    """Change the fields given. A changed cron or zone, or a schedule enabled again, fires from now on: the
    fire times it had meanwhile are not missed ones. A new webhook URL is checked as `create_schedule` does."""
    changes = patch.model_dump(exclude_unset=True)
    _check_webhook(changes.get("webhook_url"), allow)  # first: its DNS lookup holds no database connection
    schedule = schedule_repo.get_schedule(session, schedule_id)
    for field in ("cron", "timezone", "template", "enabled", "misfire_grace_s", "overlap", "warm_start_top_k",
                  "warm_start_search_space", "regression_threshold"):
        if changes.get(field) is None and field in changes:
            del changes[field]  # null means "unchanged" for the fields that cannot be null
    restart = (changes.get("enabled") and not schedule.enabled) or any(
        field in changes and changes[field] != getattr(schedule, field) for field in ("cron", "timezone"))
    for field, value in changes.items():
        setattr(schedule, field, value)
    if restart:
        schedule.fired_through = utcnow()
    schedule.updated_at = utcnow()
    session.flush()
    return schedule_out(schedule)


def delete_schedule(session: Session, schedule_id: int) -> ScheduleOut:
    """Delete the schedule (its runs and deliveries with it); the schedule as it was."""
    out = get_schedule(session, schedule_id)
    schedule_repo.delete_schedule(session, schedule_id)
    return out


def run_out(run: ScheduleRun, deliveries: list[WebhookDelivery]) -> RunOut:
    return RunOut(deliveries=[DeliveryOut(id=d.id, event=d.event, url=d.url, state=d.state, attempts=d.attempts)
                              for d in deliveries if d.run_id == run.id],
                  **{f: getattr(run, f) for f in ("id", "schedule_id", "fire_time", "state", "reason", "study_name",
                                                  "manual", "warm_start", "regression", "report", "created_at",
                                                  "started_at", "finished_at")})


def list_runs(session: Session, schedule_id: int, limit: int = 100) -> list[RunOut]:
    schedule_repo.get_schedule(session, schedule_id)  # a 404 for an unknown schedule
    runs = schedule_repo.list_runs(session, schedule_id, limit)
    deliveries = schedule_repo.deliveries_of_runs(session, [r.id for r in runs])
    return [run_out(r, deliveries) for r in runs]


def get_run(session: Session, run_id: int) -> RunOut:
    run = schedule_repo.get_run(session, run_id)
    return run_out(run, schedule_repo.deliveries_of_runs(session, [run.id]))
