"""Named dependencies, so routes say what they need and tests can override it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import optuna
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.db.engine import get_engine, session_scope
from service.settings import Settings


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    with session_scope(get_engine(settings.database_url, settings.sqlite_busy_timeout_s)) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_storage(settings: SettingsDep) -> optuna.storages.RDBStorage:
    from studies.storage import storage_for

    return storage_for(settings, patient=False)  # a request answers 503 at once rather than wait


StorageDep = Annotated[optuna.storages.RDBStorage, Depends(get_storage)]
