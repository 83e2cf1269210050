"""The FastAPI application: routers, error handlers, and the dashboard on the same port."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException

from converge.core.db.engine import as_service_error, describe_cause, get_engine, is_transient, safe_url
from converge.core.errors import (
    Conflict,
    DatabaseUnavailable,
    Invalid,
    InvalidRequest,
    NotFound,
    SchemaNotReady,
    ServiceError,
)
from converge.core.settings import Settings, get_settings
from converge.core.version import VERSION
from converge.service import auth
from converge.service.api.dashboard import DashboardDispatch
from converge.service.api.hosts import ALWAYS_ALLOWED, HostCheck
from converge.service.api.limits import BodySizeLimit
from converge.service.api.openapi import keep_null_examples
from converge.service.api.routers import artifacts, diagnose, health, metrics, plots, schedules, studies, workers
from converge.service.json_input import number_too_long
from converge.studies.spec import describe_errors

_STATUS = {NotFound: 404, Conflict: 409, InvalidRequest: 422, DatabaseUnavailable: 503, SchemaNotReady: 503}
_WHAT = {("POST", "/v1/studies"): "study spec", ("POST", "/v1/diagnose"): "history",
         ("POST", "/v1/schedules"): "schedule"}  # what a 422 says was invalid
UNPARSABLE = "There was an error parsing the body"  # FastAPI's 400 for a body it could not decode

DESCRIPTION = """Hyperparameter sweeps over learning rate, batch size, epochs, weight decay and dropout,
with every trial's per-epoch metrics and its latest convergence diagnosis stored; `POST /v1/diagnose`
diagnoses any training history. Errors are JSON with a human-readable `detail`; a 422 (bad input) also lists
each problem in `problems`, and a request body over {max_body_bytes} bytes (`CONVERGE_MAX_BODY_BYTES`) is a 413.
The Optuna dashboard for the same database is served at `/dashboard`.

Authentication: once an API token exists (`converge token create --scope read|write|admin`), every
operation but `GET /v1/health` needs one, as `Authorization: Bearer TOKEN`: reads (and `POST /v1/diagnose`)
need `read`; creating, cancelling and repairing need `write`; `admin` includes both. No token, or an unknown
or revoked one, is a 401; a token of too low a scope a 403 naming the scope needed. The dashboard takes the
token as the HTTP Basic password (its reads need `read`, its changes `admin`). While no token exists the API
is open, and `converge serve` listens on loopback only."""


def create_app(settings: Settings | None = None, *, dashboard: bool = True, require_token: bool = False,
               bound_host: str | None = None, bound_port: int | None = None) -> FastAPI:
    """The API (and the dashboard). `require_token`: refuse requests without a valid token even while no
    token exists (a server listening beyond loopback must not open up when its last token is revoked).
    `bound_host`/`bound_port`: the address `converge serve` listens on; with it (or CONVERGE_ALLOWED_HOSTS
    set) a request for another `Host` is refused while the server is open (`service.api.hosts`)."""
    settings = settings or get_settings()
    app = FastAPI(title="Converge", version=VERSION,
                  description=DESCRIPTION.replace("{max_body_bytes}", f"{settings.max_body_bytes:,}"))
    app.state.settings = settings
    app.state.require_token = require_token
    app.include_router(studies.router)
    app.include_router(artifacts.router)
    app.include_router(plots.router)
    app.include_router(metrics.router)
    app.include_router(diagnose.router)
    app.include_router(workers.router)
    app.include_router(schedules.router)
    app.include_router(health.router)
    app.state.health_probe = health.WriteProbe(settings.health_probe_every_s)  # /v1/health's write, cached
    keep_null_examples(app)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard" if dashboard else "/docs")

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        status = _status(exc)
        body: dict[str, Any] = {"detail": str(exc)}
        if status == 422:  # every 422 has the same shape: `detail`, and `problems` one per line
            body["problems"] = [str(exc)]
        return JSONResponse(body, status_code=status)

    @app.exception_handler(optuna.exceptions.StorageInternalError)
    async def storage_error(_: Request, exc: optuna.exceptions.StorageInternalError) -> JSONResponse:
        """Optuna wraps every driver error in this one: a database that is down, read-only or full is a 503
        here too, said as Converge's own errors say it."""
        found = as_service_error(exc, settings.database_url)
        if found is not None:
            return JSONResponse({"detail": str(found)}, status_code=_status(found))
        detail = f"cannot use database {safe_url(settings.database_url)}: {describe_cause(exc)}"
        return JSONResponse({"detail": detail}, status_code=503 if is_transient(exc) else 500)

    @app.exception_handler(sqlalchemy.exc.TimeoutError)
    async def pool_exhausted(_: Request, exc: sqlalchemy.exc.TimeoutError) -> JSONResponse:
        """Every pooled connection stayed busy for the pool's timeout: the server is overloaded, a 503."""
        return JSONResponse({"detail": "the server is busy: no database connection came free in time; try again"},
                            status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(Invalid)
    async def invalid(_: Request, exc: Invalid) -> JSONResponse:
        """A spec, history or schedule with problems (each listed): a 422."""
        return JSONResponse({"detail": exc.listing(), "problems": exc.problems}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        what = _WHAT.get((request.method, request.url.path), "request")
        return _invalid(_problems(exc.errors(), what), what)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        """FastAPI's own HTTP errors as they are, but for a body it could not decode (bytes that are not UTF-8
        text, JSON nested beyond Python's recursion limit): a 422 saying so, like any other body that is not JSON."""
        if exc.status_code == 400 and exc.detail == UNPARSABLE and exc.__cause__ is not None:
            what = _WHAT.get((request.method, request.url.path), "request")
            return _invalid([await _unreadable(request, exc.__cause__)], what)
        return await http_exception_handler(request, exc)

    if dashboard:
        from converge.studies.storage import storage_for

        # Not patient: during an outage the dashboard fails at once instead of waiting it out.
        app.add_middleware(DashboardDispatch, storage_factory=lambda: storage_for(settings, patient=False),
                           engine_factory=lambda: get_engine(settings.database_url, settings.sqlite_busy_timeout_s),
                           require_token=require_token)
    extra_hosts = settings.split(settings.allowed_hosts)
    if bound_host is not None or extra_hosts:
        def tokens_exist() -> bool:
            return require_token or auth.auth_enabled(get_engine(settings.database_url))

        app.add_middleware(HostCheck, names=[*ALWAYS_ALLOWED, *([bound_host] if bound_host else []), *extra_hosts],
                           port=bound_port, always=bool(extra_hosts), tokens_exist=tokens_exist)
    # Added last, so it runs first: the cap holds for every path, the dashboard's included.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app


def _status(exc: ServiceError) -> int:
    """A service error's HTTP status, by its kind (a `DatabaseNotWritable` is a `DatabaseUnavailable`: 503)."""
    return next((status for kind, status in _STATUS.items() if isinstance(exc, kind)), 500)


def _invalid(problems: list[str], what: str) -> JSONResponse:
    return JSONResponse({"detail": Invalid(problems, what).listing(), "problems": problems}, status_code=422)


async def _unreadable(request: Request, cause: BaseException) -> str:
    """Why FastAPI could not decode a body, in words."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid JSON: it is not UTF-8 text ({cause.reason} at byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "the body is not valid JSON this server reads: it is nested too deeply"
    if isinstance(cause, ValueError):  # json.loads' only other ValueError: an integer literal over the digit limit
        try:
            body = await request.body()  # the route's own Request, whose body is kept once read
        except Exception:  # noqa: BLE001 - not kept after all: say what is known without it
            return "the body is not valid JSON this server reads: a number in it is too long"
        return number_too_long(body)
    return f"the body could not be read: {type(cause).__name__}"


def _problems(errors: Sequence[Any], what: str) -> list[str]:
    """One line per problem; a body that is not JSON, or is missing, said in words rather than by location."""
    problems: list[str] = []
    rest = []
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if error.get("type") == "json_invalid":
            reason = error.get("ctx", {}).get("error", "decode error")
            problems.append(f"the body is not valid JSON: {reason} (at character {loc[-1]})")
        elif loc == ("body",) and error.get("type") == "missing":
            problems.append(f"the body is empty: send the {what} as JSON")
        else:
            rest.append(error)
    return problems + describe_errors(rest, skip_prefix="body")
