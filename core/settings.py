"""One Settings object, read from `CONVERGE_*` environment variables once per process."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVERGE_", extra="ignore")

    database_url: str = Field(
        default="sqlite:///./converge.db",
        description="SQLAlchemy URL shared by the API, the workers and Optuna.",
    )
    sqlite_busy_timeout_s: float = Field(default=30.0, gt=0, description="how long SQLite waits on a lock")
    heartbeat_interval_s: int = Field(default=10, gt=0, description="Optuna trial heartbeat period")
    grace_period_s: int = Field(default=60, gt=0, description="a RUNNING trial silent this long is failed")
    stop_timeout_s: float = Field(
        default=20.0, gt=0,
        description="after SIGTERM, how long a running trial may take to reach its epoch's end before it is "
                    "killed and rerun",
    )
    trial_reads_max_age_s: float = Field(
        default=1.0, ge=0,
        description="a trial re-reads its study's trials (for sampling and pruning) at most this often; "
                    "0 reads at every call",
    )
    worker_poll_s: float = Field(default=1.0, gt=0, description="how often an idle worker looks for work")
    slot_nice: int = Field(
        default=10, ge=0, le=19,
        description="how much lower a worker's training slot processes run in CPU priority than the worker (nice "
                    "increment): the API, the database and the worker's heartbeats on the same machine answer "
                    "first, and training takes every CPU cycle they leave; 0 runs slots at the worker's priority",
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="`json`: every process logs one JSON object per line (time, level, logger, "
                                    "message, process; exception text when there is one)")
    dashboard_figures_every_s: float = Field(
        default=60.0, ge=0, description="a worker refreshes a study's figures in the dashboard at most this "
                                        "often (and always when the study ends); 0 after every trial")
    scheduler_poll_s: float = Field(default=5.0, gt=0, description="how often the scheduler looks for due "
                                    "schedules and ended runs")
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="a schedule's webhook POST gives up after "
                                     "this long (connect and each read)")
    webhook_retries: int = Field(default=3, ge=0, le=10, description="webhook attempts after the first, waiting "
                                 "1, 2, 4, ... s (`webhook_backoff_s` doubled) between them")
    webhook_backoff_s: float = Field(default=1.0, ge=0, description="the wait before the first webhook retry")
    max_body_bytes: int = Field(
        default=1_048_576, gt=0,
        description="the largest request body the API and the dashboard take, in bytes (1 MiB); a larger one is "
                    "refused with 413, before it is read when its Content-Length says so, else as soon as the "
                    "bytes read pass the limit",
    )
    artifact_dir: str | None = Field(
        default=None,
        description="where trial checkpoints are kept (Optuna's filesystem artifact store); by default "
                    "`artifacts/` next to a SQLite database file, else `./artifacts` in the working directory",
    )
    artifact_s3_bucket: str | None = Field(
        default=None,
        description="keep trial checkpoints in this S3-compatible bucket instead (Optuna's Boto3ArtifactStore; "
                    "needs boto3 installed and AWS_* credentials in the environment)",
    )
    artifact_s3_endpoint_url: str | None = Field(
        default=None, description="the S3-compatible service's endpoint (e.g. MinIO); AWS when unset")

    # Security (docs/security.md): what a token holder may make a worker or the server do.
    plugin_modules: str = Field(
        default="",
        description="comma-separated module prefixes (e.g. `mypkg,lab.models`) whose factories a spec may name as "
                    "task.model / task.data; empty (the default) allows no plug-in at all. The standard library and "
                    "Converge's own packages are never allowed",
    )
    data_dir: str = Field(
        default="./data",
        description="the folder `csv:` dataset paths resolve in (relative to the working directory); a path that "
                    "leaves it (absolute, `..`, a symlink out) is refused",
    )
    max_data_bytes: int = Field(default=256 * 1024 * 1024, gt=0, description="the largest CSV dataset a worker "
                                "reads, in bytes (256 MiB)")
    webhook_allow: str = Field(
        default="",
        description="comma-separated hosts and networks (e.g. `127.0.0.1,10.0.0.0/8,hooks.lan`) webhooks may reach "
                    "although they are loopback, private, link-local or otherwise not public; empty: public "
                    "addresses only",
    )
    allowed_hosts: str = Field(
        default="",
        description="comma-separated extra `Host` names the API answers (besides the bound address, localhost and "
                    "127.0.0.1) while no token exists; once set, also checked when tokens exist",
    )
    health_probe_every_s: float = Field(default=5.0, ge=0, description="/v1/health probes the database with a "
                                        "write at most this often (cached in between)")

    @staticmethod
    def split(value: str) -> list[str]:
        """A comma-separated setting as its list of non-empty, stripped items."""
        return [item.strip() for item in value.split(",") if item.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
