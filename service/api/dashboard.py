"""optuna-dashboard on the API's own port, behind Converge's tokens.

Its frontend uses absolute paths (`/dashboard`, `/api/...`, `/static/...`, `/artifacts`)
and cannot live under a sub-path, so requests under those roots are dispatched to the
dashboard's WSGI app before FastAPI routes them. Converge's own API lives under `/v1`.

optuna-dashboard has no authentication of its own, and its `/api` can create and delete
studies, tell trials and upload or delete artifacts. So, while authentication is on (see
`service.auth`), every dashboard request needs a token before it reaches optuna-dashboard:
reading (GET, HEAD) a `read` token, anything else an `admin` one. Browsers send it as HTTP
Basic auth (any user name, the token as the password): a 401 asks them for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from converge.core.errors import ServiceError
from converge.service import auth

DASHBOARD_ROOTS = ("/dashboard", "/api", "/static", "/artifacts", "/csv", "/favicon.ico")
READ_METHODS = ("GET", "HEAD")
CHALLENGE = 'Basic realm="Converge dashboard", charset="UTF-8"'
LOGIN = ("authentication required: log in with an API token as the password (any user name), or send "
         "`Authorization: Bearer TOKEN`; `converge token create --scope read` makes one")


class DashboardDispatch:
    """ASGI middleware: dashboard paths go to optuna-dashboard (once the token allows), the rest to the app."""

    def __init__(self, app: ASGIApp, storage_factory: Any, engine_factory: Callable[[], Engine],
                 require_token: bool = False):
        self.app = app
        self._storage_factory = storage_factory
        self._engine_factory = engine_factory
        self._require_token = require_token
        self._dashboard: ASGIApp | None = None
        self._lock = threading.Lock()

    def _dashboard_app(self) -> ASGIApp:
        # Built on first use: the API must start (and answer /v1/health) even before the
        # database is reachable.
        with self._lock:
            if self._dashboard is None:
                import optuna_dashboard
                from a2wsgi import WSGIMiddleware

                self._dashboard = WSGIMiddleware(_with_accept_encoding(optuna_dashboard.wsgi(self._storage_factory())))
        return self._dashboard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _is_dashboard_path(scope["path"]):
            refused = await self._refusal(scope)
            if refused is not None:
                await refused(scope, receive, send)
                return
            await self._dashboard_app()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _refusal(self, scope: Scope) -> JSONResponse | None:
        """None when the request may go on; else the 401, 403 or 503 to answer instead."""
        token = auth.bearer_or_basic_token(Headers(scope=scope).get("authorization"))
        needed = "read" if scope["method"] in READ_METHODS else "admin"
        try:
            # The lookup blocks on the database: in a worker thread, never on the event loop.
            await run_in_threadpool(auth.authorize, self._engine_factory(), token, needed,
                                    required=self._require_token)
        except auth.AuthError as exc:
            detail = LOGIN if exc.status == 401 and token is None else exc.detail
            if exc.status == 403:
                detail += " (the dashboard's reads need `read`; everything else it does, `admin`)"
            headers = {"WWW-Authenticate": CHALLENGE} if exc.status == 401 else None
            return JSONResponse({"detail": detail}, status_code=exc.status, headers=headers)
        except ServiceError as exc:  # the database is down or not upgraded
            return JSONResponse({"detail": str(exc)}, status_code=503)
        return None


def _with_accept_encoding(wsgi_app: Callable[..., Any]) -> Callable[..., Any]:
    """optuna-dashboard (0.21) serves /favicon.ico and /static/... after reading `request.headers["Accept-Encoding"]`
    to choose a gzipped file, and bottle's headers raise KeyError for a header the request lacks: a request
    without Accept-Encoding (curl, a probe) was a 500. Such a request reaches it with `identity`, the one
    coding every client takes, so it gets the plain file."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        environ.setdefault("HTTP_ACCEPT_ENCODING", "identity")
        return wsgi_app(environ, start_response)

    return app


def _is_dashboard_path(path: str) -> bool:
    return any(path == root or path.startswith(root + "/") for root in DASHBOARD_ROOTS)
