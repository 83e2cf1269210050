"""`/v1/health`: is the service up and its database usable, for reads and for writes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from converge.core.db import repo
from converge.core.db.engine import as_service_error, get_engine, session_scope
from converge.core.db.migrate import check_schema
from converge.core.errors import ServiceError
from converge.core.version import VERSION
from converge.service.api.deps import SettingsDep
from converge.service.schemas import HealthOut

router = APIRouter(prefix="/v1", tags=["health"])


class WriteProbe:
    """Whether the database takes a write: `repo.probe_write` committed (a read-only SQLite file or
    mount, a read-only PostgreSQL transaction or a full disk refuses it), at most every `every_s`
    seconds per server; in between, the last answer. Concurrent requests wait for the one probe
    under way rather than make their own."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic):
        self.every_s = every_s
        self.clock = clock
        self._lock = threading.Lock()
        self._probed_at: float | None = None
        self._problem: str | None = None

    def problem(self, engine: Engine) -> str | None:
        """None when the database took the latest probe's write, else why not, in one line."""
        with self._lock:
            if self._probed_at is not None and self.clock() - self._probed_at < self.every_s:
                return self._problem
            self._problem = _probe(engine)
            self._probed_at = self.clock()
            return self._problem


def _probe(engine: Engine) -> str | None:
    try:
        with session_scope(engine) as session:
            repo.probe_write(session)
    except (ServiceError, DBAPIError) as exc:
        found = as_service_error(exc, engine.url)
        return " ".join(str(found if found is not None else exc).split())
    return None


@router.get("/health", response_model=HealthOut, response_model_exclude_none=True,
            responses={503: {"model": HealthOut,
                             "description": "the database is unreachable, not upgraded (`converge db upgrade`), or "
                                            "cannot take a write (a read-only database, a full disk); `detail` "
                                            "says which"}})
def health(request: Request, settings: SettingsDep) -> HealthOut | JSONResponse:
    """200 when the database answers, both schemas are current and it takes a write, else 503 saying why
    in `detail`. The write (one row of `converge_health` rewritten and committed) is made at most every
    `CONVERGE_HEALTH_PROBE_EVERY_S` seconds (5) per server; a request in between gets the last answer."""
    try:
        check_schema(settings.database_url)
        problem = request.app.state.health_probe.problem(
            get_engine(settings.database_url, settings.sqlite_busy_timeout_s))
    except ServiceError as exc:
        problem = str(exc)
    if problem is not None:
        body = HealthOut(status="unavailable", database=problem, detail=problem, version=VERSION)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
    return HealthOut(status="ok", database="ok", version=VERSION)
