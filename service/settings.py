"""One Settings object, read from `CONVERGE_*` environment variables once per process."""

from __future__ import annotations

from functools import lru_cache

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
    max_body_bytes: int = Field(
        default=1_048_576, gt=0,
        description="the largest request body the API and the dashboard take, in bytes (1 MiB); a larger one is "
                    "refused with 413, before it is read when its Content-Length says so, else as soon as the "
                    "bytes read pass the limit",
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
