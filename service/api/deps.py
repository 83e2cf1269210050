"""Named dependencies, so routes say what they need and tests can override it."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

import optuna
from fastapi import Depends, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.datastructures import DefaultPlaceholder
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from converge.core.db.engine import get_engine, session_scope
from converge.core.settings import Settings
from converge.service import auth
from converge.service.schemas import ErrorOut, ProblemsOut


async def get_app_settings(request: Request) -> Settings:
    """Async, as every dependency that does no I/O: FastAPI runs a sync one in its thread pool,
    and under load each such hop is a wait for a free thread."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_session(settings: SettingsDep) -> AsyncIterator[Session]:
    """The request's session, made on the event loop: a session connects only at its first query,
    which runs in the route's thread, and `SessionRoute` commits and closes it there, so what is
    left here does no I/O (it translates an error). A session still in a transaction (a route that
    is not a `SessionRoute`) is committed in the thread pool instead."""
    with session_scope(get_engine(settings.database_url, settings.sqlite_busy_timeout_s)) as session:
        yield session
        if session.in_transaction():
            await run_in_threadpool(session.commit)


# The request's session. Routes that take it are `SessionRoute`s, which commit and close it as
# the route function returns; this dependency's own exit then only translates an error.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


class SessionRoute(APIRoute):
    """A route that commits and closes its `SessionDep` in the route function's own thread, and
    there also turns the model it returns into the JSON answer.

    FastAPI exits a `scope="function"` dependency only after the response is serialised, and
    serialising a sync route's answer waits for one of the thread pool's 40 threads. With the
    session's pooled connection held until then, a burst of requests deadlocks: every connection
    held by requests waiting for a thread, every thread by requests waiting for a connection,
    until the pool's 30 s timeout (tests/test_api_concurrency.py).

    A returned model of exactly the route's `response_model` is written as JSON in the same
    thread, as FastAPI would write it (`model_dump_json`, by alias): FastAPI would wait for a
    second thread of the pool to re-validate it (a no-op for a model instance) and only then
    serialise it, and under load that second wait is most of a cheap request's time. Anything
    else the route returns (a subclass, a dict, a Response) is left to FastAPI.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any):
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _in_route_thread(endpoint, self)
        super().__init__(path, endpoint, **kwargs)

    def json_answer(self, result: Any) -> Any:
        """`result` as the JSON response FastAPI would send, or as it is where FastAPI must decide."""
        if (type(result) is not self.response_model or not isinstance(self.response_class, DefaultPlaceholder)
                or self.response_model_include or self.response_model_exclude or self.response_model_exclude_unset
                or self.response_model_exclude_defaults or self.response_model_exclude_none):
            return result
        return Response(result.model_dump_json(by_alias=self.response_model_by_alias),
                        status_code=self.status_code or 200, media_type="application/json")


def _in_route_thread(endpoint: Callable[..., Any], route: SessionRoute) -> Callable[..., Any]:
    @functools.wraps(endpoint)
    def call(*args: Any, **kwargs: Any) -> Any:
        sessions = [value for value in kwargs.values() if isinstance(value, Session)]
        try:
            result = endpoint(*args, **kwargs)
            for session in sessions:
                session.commit()
            return route.json_answer(result)
        finally:  # on an error too (rolled back): `session_scope` still translates it
            for session in sessions:
                session.close()

    call.__signature__ = inspect.signature(endpoint, eval_str=True)  # type: ignore[attr-defined]
    return call


def get_storage(settings: SettingsDep) -> optuna.storages.RDBStorage:
    from converge.studies.storage import storage_for

    return storage_for(settings, patient=False)  # a request answers 503 at once rather than wait


StorageDep = Annotated[optuna.storages.RDBStorage, Depends(get_storage)]

# ---------------------------------------------------------------- authentication

bearer = HTTPBearer(
    auto_error=False, scheme_name="bearer", bearerFormat="cvg_...",
    description="An API token from `converge token create --scope read|write|admin` (admin includes write, "
                "which includes read). Needed once any token exists; while none does, the API is open and "
                "`converge serve` listens on loopback only.")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


class RequireScope:
    """A route's scope, as a dependency: `dependencies=[Depends(require_scope("write"))]`.

    Every `/v1` route but health has one (tests/test_auth.py walks the routes to make sure).
    """

    def __init__(self, scope: str):
        if scope not in auth.SCOPES:
            raise ValueError(f"unknown scope {scope!r}")
        self.scope = scope

    def __call__(self, request: Request, settings: SettingsDep, credentials: BearerDep) -> auth.TokenInfo | None:
        engine = get_engine(settings.database_url, settings.sqlite_busy_timeout_s)
        try:
            return auth.authorize(engine, credentials.credentials if credentials else None, self.scope,
                                  required=request.app.state.require_token)
        except auth.AuthError as exc:
            raise HTTPException(exc.status, exc.detail, headers={"WWW-Authenticate": _challenge(exc)}) from None


def require_scope(scope: str) -> RequireScope:
    return RequireScope(scope)


def _challenge(exc: auth.AuthError) -> str:
    """RFC 6750's challenge: bare when no token was sent, else the error and, on a 403, the scope needed."""
    if exc.status == 403:
        return f'Bearer error="insufficient_scope", scope="{exc.needed}"'
    return 'Bearer error="invalid_token"' if exc.token_sent else "Bearer"


def auth_responses(scope: str) -> dict[int | str, dict[str, Any]]:
    """The 401 and 403 of a route that needs `scope`, for its OpenAPI `responses`."""
    return {
        401: {"model": ErrorOut, "description": "no API token, or an unknown or revoked one (`Authorization: Bearer "
                                                "TOKEN`; only once a token exists)"},
        403: {"model": ErrorOut, "description": f"the token's scope is below `{scope}`"},
    }


INVALID = "a parameter is invalid; `detail` says what was wrong and `problems` lists each problem"
UNAVAILABLE = "the database is unreachable or its schemas are not current (`converge db upgrade`); `detail` says which"


def error_responses(scope: str, errors: dict[int, str] | None = None, *, invalid: str | None = INVALID,
                    body: bool = False) -> dict[int | str, dict[str, Any]]:
    """Every error an operation answers, each with its schema, for its OpenAPI `responses`.

    The scope's 401 and 403; the route's own `errors` (status: when), `detail` only; a 422 with
    `detail` and `problems` (`invalid`: when; None for an operation that takes neither parameters
    nor a body); a 413 when it takes a `body` (the app's body cap, `service.api.limits`); a 503 always.
    """
    responses: dict[int | str, dict[str, Any]] = dict(auth_responses(scope))
    for status, description in (errors or {}).items():
        responses[status] = {"model": ErrorOut, "description": description}
    if invalid is not None:
        responses[422] = {"model": ProblemsOut, "description": invalid}
    if body:
        responses[413] = {"model": ErrorOut, "description": "the body is larger than the server's limit "
                          "(`CONVERGE_MAX_BODY_BYTES`, 1 MiB by default); `detail` gives both sizes"}
    responses[503] = {"model": ErrorOut, "description": UNAVAILABLE}
    return responses


# ---------------------------------------------------------------- JSON or CSV

Format = Literal["json", "csv"]


def prefers_csv(accept: str | None) -> bool:
    """Whether an `Accept` header asks for CSV before JSON: `text/csv` listed, with a quality above zero and
    not below `application/json`'s (on a tie, the one listed first). Anything else, unsupported types
    included, gets JSON: lenient, never a 406."""
    best: dict[str, tuple[float, int]] = {}
    for position, item in enumerate((accept or "").split(",")):
        media, *params = (part.strip() for part in item.split(";"))
        media = media.lower()
        if media not in ("text/csv", "application/json"):
            continue
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        best.setdefault(media, (quality, -position))
    csv, json = best.get("text/csv"), best.get("application/json")
    return csv is not None and csv[0] > 0 and (json is None or csv >= json)


async def response_format(request: Request, fmt: Annotated[
        Format | None, Query(alias="format", description="`csv` or `json`; overrides the `Accept` header "
                             "(`Accept: text/csv` asks for CSV; any other type gets JSON)")] = None) -> Format:
    if fmt is not None:
        return fmt
    return "csv" if prefers_csv(request.headers.get("accept")) else "json"


FormatDep = Annotated[Format, Depends(response_format)]
