"""Converge's own tables (prefix `converge_`); Optuna's tables are Optuna's business."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator, TypeEngine


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _UnconvertedFloat(Float):
    """Float without the driver-side float() on binding, so the "NaN" text reaches SQLite."""

    def bind_processor(self, dialect: Dialect) -> None:
        return None


class MetricFloat(TypeDecorator[float]):
    """A float column that keeps NaN on SQLite too (SQLite stores a NaN REAL as NULL).

    A diverged trial's NaN loss is evidence; losing it to NULL would hide the divergence.
    """

    impl = Float
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return dialect.type_descriptor(_UnconvertedFloat() if dialect.name == "sqlite" else Float())

    def process_bind_param(self, value: float | None, dialect: Dialect) -> float | str | None:
        if value is not None and dialect.name == "sqlite" and math.isnan(value):
            return "NaN"  # stored with TEXT storage class, read back below
        return value

    def process_result_value(self, value: float | str | None, dialect: Dialect) -> float | None:
        return float(value) if isinstance(value, str) else value


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every database (SQLite returns naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    pass


STUDY_STATES = ("queued", "running", "done", "cancelled", "failed")
ACTIVE_STATES = ("queued", "running")


class Study(Base):
    """A study as submitted, with the counter that hands out its trial slots."""

    __tablename__ = "converge_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    detail: Mapped[str | None] = mapped_column(Text, default=None)
    n_trials: Mapped[int] = mapped_column(Integer)
    # Trial slots handed to workers so far; a worker claims one by incrementing it.
    n_claimed: Mapped[int] = mapped_column(Integer, default=0)
    # Automatic repairs reserved so far (spec `auto_repair.max` caps it); one is reserved by incrementing it.
    auto_repairs: Mapped[int] = mapped_column(Integer, default=0, server_default="0",
                                              comment="automatic repairs reserved so far; one is reserved by "
                                                      "incrementing it")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class TrialMetric(Base):
    """One epoch of one trial, written as the epoch ends."""

    __tablename__ = "converge_trial_metrics"
    __table_args__ = (
        UniqueConstraint("study_id", "trial_number", "epoch", name="uq_converge_trial_metrics_epoch"),
        Index("ix_converge_trial_metrics_trial_id", "trial_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("converge_studies.id", ondelete="CASCADE"))
    trial_number: Mapped[int] = mapped_column(Integer)
    trial_id: Mapped[int] = mapped_column(Integer, comment="Optuna's trial_id")
    epoch: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(MetricFloat)
    val_loss: Mapped[float | None] = mapped_column(MetricFloat)
    val_acc: Mapped[float | None] = mapped_column(MetricFloat)
    grad_norm: Mapped[float | None] = mapped_column(MetricFloat)
    param_norm: Mapped[float | None] = mapped_column(MetricFloat)
    lr: Mapped[float | None] = mapped_column(MetricFloat)
    epoch_seconds: Mapped[float | None] = mapped_column(MetricFloat)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


METRIC_COLUMNS = ("train_loss", "val_loss", "val_acc", "grad_norm", "param_norm", "lr", "epoch_seconds")


class TrialDiagnosis(Base):
    """The latest convergence diagnosis of one trial, rewritten after every epoch.

    `final` is set once the trial has ended: the row then holds its last diagnosis.
    """

    __tablename__ = "converge_trial_diagnoses"
    __table_args__ = (
        UniqueConstraint("study_id", "trial_number", name="uq_converge_trial_diagnoses_trial"),
        # A trial list filtered by verdict (and its total) reads one study's trials of one verdict.
        Index("ix_converge_trial_diagnoses_study_verdict", "study_id", "verdict", "trial_number"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("converge_studies.id", ondelete="CASCADE"))
    trial_number: Mapped[int] = mapped_column(Integer)
    trial_id: Mapped[int] = mapped_column(Integer, comment="Optuna's trial_id")
    epoch: Mapped[int] = mapped_column(Integer, comment="the last epoch the diagnosis saw")
    verdict: Mapped[str] = mapped_column(String(32), index=True)
    healthy: Mapped[bool] = mapped_column(Boolean)
    confidence: Mapped[float] = mapped_column(Float)
    onset_epoch: Mapped[int | None] = mapped_column(Integer, default=None)
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    diagnosis: Mapped[dict[str, Any]] = mapped_column(JSON, comment="the diagnosis as the contract's JSON")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Worker(Base):
    """A running `converge worker`, kept alive by its heartbeat."""

    __tablename__ = "converge_workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    devices: Mapped[str] = mapped_column(String(255))
    slots: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="running")
    current_trials: Mapped[list[Any]] = mapped_column(JSON, default=list)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_heartbeat: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TrialRetry(Base):
    """A trial attempt that died with its process, or was interrupted by a worker's shutdown, and was rerun.

    The attempt stays a failed Optuna trial with its partial metrics; `retry_number` is the new
    trial that reruns its parameters. A failed attempt with a row here does not count towards the
    study's `n_trials`: its retry does. `failures` counts the crashes of this line of attempts
    (an interruption is not the trial's fault and counts none), against the spec's `retries`.
    """

    __tablename__ = "converge_trial_retries"
    __table_args__ = (
        UniqueConstraint("study_id", "trial_number", name="uq_converge_trial_retries_trial"),
        # A trial's attempts are walked back from a rerun to the attempt it reruns.
        Index("ix_converge_trial_retries_retry", "study_id", "retry_number"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("converge_studies.id", ondelete="CASCADE"))
    trial_number: Mapped[int] = mapped_column(Integer, comment="the failed attempt")
    trial_id: Mapped[int] = mapped_column(Integer, comment="Optuna's trial_id of the failed attempt")
    retry_number: Mapped[int] = mapped_column(Integer, comment="the trial that reruns it")
    reason: Mapped[str] = mapped_column(String(16), comment="crashed | stale | interrupted")
    failures: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TrialRepair(Base):
    """A trial whose diagnosis was unhealthy, queued again with its first remedy applied.

    `repair_number` is the new trial; the origin's diagnosis reports how that went.
    """

    __tablename__ = "converge_trial_repairs"
    __table_args__ = (
        UniqueConstraint("study_id", "trial_number", name="uq_converge_trial_repairs_trial"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("converge_studies.id", ondelete="CASCADE"))
    trial_number: Mapped[int] = mapped_column(Integer, comment="the trial repaired")
    repair_number: Mapped[int] = mapped_column(Integer, comment="the trial that runs the remedy")
    remedy: Mapped[dict[str, Any]] = mapped_column(JSON, comment="the remedy applied, as in the diagnosis")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, comment="the repair's parameters")
    automatic: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


API_SCOPES = ("read", "write", "admin")  # ordered: each includes the ones before it


class ApiToken(Base):
    """A bearer token for the REST API and the dashboard, stored as its SHA-256 only.

    The token itself is shown once, when it is created; `prefix` (its first characters)
    is what lists and logs show. A revoked token stays, with `revoked_at` set.
    """

    __tablename__ = "converge_api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str | None] = mapped_column(String(100), default=None, comment="a label, for people")
    scope: Mapped[str] = mapped_column(String(8), comment="read | write | admin")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True,
                                            comment="SHA-256 of the whole token, hex")
    prefix: Mapped[str] = mapped_column(String(12), comment="the token's first 12 characters, for listing")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None,
                                                          comment="updated at most once a minute")
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


SCHEDULE_RUN_STATES = ("waiting", "starting", "running", "done", "failed", "cancelled", "skipped")
ACTIVE_RUN_STATES = ("waiting", "starting", "running")


class Schedule(Base):
    """A nightly (cron) sweep: a study template fired on a cron expression in an IANA time zone.

    `fired_through` is the latest fire time the scheduler has handled (run, queued or skipped);
    the next fire time is computed from it, so a restarted scheduler sees what it missed.
    """

    __tablename__ = "converge_schedules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cron: Mapped[str] = mapped_column(String(120), comment="a 5-field cron expression")
    timezone: Mapped[str] = mapped_column(String(64), comment="an IANA time zone, e.g. Europe/Berlin")
    template: Mapped[dict[str, Any]] = mapped_column(JSON, comment="a study spec whose name is the runs' prefix")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    misfire_grace_s: Mapped[int] = mapped_column(Integer, comment="a fire time missed by more is skipped")
    overlap: Mapped[str] = mapped_column(String(8), comment="skip | queue: a fire while the last run is going")
    warm_start_top_k: Mapped[int] = mapped_column(Integer, comment="the previous run's best k params enqueued first")
    warm_start_search_space: Mapped[bool] = mapped_column(
        Boolean, comment="start from the previous run's recommended search space")
    regression_threshold: Mapped[float] = mapped_column(
        Float, comment="a run whose best worsens by more than this fraction is a regression")
    webhook_url: Mapped[str | None] = mapped_column(String(2000), default=None)
    fired_through: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None,
                                                           comment="the latest fire time handled")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class ScheduleRun(Base):
    """One fire time of a schedule: the row whose insert decides which scheduler launches it."""

    __tablename__ = "converge_schedule_runs"
    __table_args__ = (
        UniqueConstraint("schedule_id", "fire_time", name="uq_converge_schedule_runs_fire"),
        Index("ix_converge_schedule_runs_state", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    schedule_id: Mapped[int] = mapped_column(ForeignKey("converge_schedules.id", ondelete="CASCADE"))
    fire_time: Mapped[datetime] = mapped_column(UTCDateTime, comment="the cron time it is for")
    state: Mapped[str] = mapped_column(String(16), comment="waiting | starting | running | done | failed | "
                                                           "cancelled | skipped")
    reason: Mapped[str | None] = mapped_column(Text, default=None, comment="why skipped or failed")
    study_name: Mapped[str | None] = mapped_column(String(100), default=None)
    manual: Mapped[bool] = mapped_column(Boolean, default=False, comment="run-now, not the cron")
    warm_start: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None,
                                                              comment="what was carried over from the last run")
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None,
                                                          comment="the comparison with the previous run")
    regression: Mapped[bool | None] = mapped_column(Boolean, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class WebhookDelivery(Base):
    """One webhook notification of a schedule and every attempt to deliver it."""

    __tablename__ = "converge_webhook_deliveries"
    __table_args__ = (Index("ix_converge_webhook_deliveries_run", "run_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    schedule_id: Mapped[int] = mapped_column(ForeignKey("converge_schedules.id", ondelete="CASCADE"))
    run_id: Mapped[int] = mapped_column(ForeignKey("converge_schedule_runs.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(32), comment="run.finished | run.regression | run.failed")
    url: Mapped[str] = mapped_column(String(2000))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="pending", comment="pending | delivered | failed")
    attempts: Mapped[list[Any]] = mapped_column(JSON, default=list,
                                                comment="each attempt: at, status (HTTP) or error, seconds")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class HealthProbe(Base):
    """The one row `/v1/health` rewrites, committed, to learn whether the database takes a write (a read-only
    file or transaction, or a full disk, refuses it); at most every `CONVERGE_HEALTH_PROBE_EVERY_S` per server."""

    __tablename__ = "converge_health"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False, comment="always 1")
    probes: Mapped[int] = mapped_column(Integer, default=0, comment="write probes that went through")
    probed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, comment="the latest one")
