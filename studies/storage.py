"""Optuna's RDB storage over Converge's database, opened the way every process must open it.

Tables are never created here (`converge db upgrade` does that), heartbeats are on so a
trial whose process died is failed after the grace period.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import optuna
from sqlalchemy.exc import OperationalError

from service.db.engine import engine_kwargs, translate_db_error
from service.db.migrate import check_schema
from service.settings import Settings


@lru_cache(maxsize=8)
def open_storage(url: str, heartbeat_interval_s: int, grace_period_s: int,
                 busy_timeout_s: float = 30.0) -> optuna.storages.RDBStorage:
    """Open once per process; raises DatabaseUnavailable or SchemaNotReady in one line."""
    check_schema(url)  # Optuna's own errors here would be a StorageInternalError traceback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs(url, busy_timeout_s),
                skip_table_creation=True,
                heartbeat_interval=heartbeat_interval_s,
                grace_period=grace_period_s,
            )
        except OperationalError as exc:
            raise translate_db_error(exc, url) from None


def storage_for(settings: Settings) -> optuna.storages.RDBStorage:
    return open_storage(settings.database_url, settings.heartbeat_interval_s, settings.grace_period_s,
                        settings.sqlite_busy_timeout_s)
