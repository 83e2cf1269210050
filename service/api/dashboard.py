"""optuna-dashboard on the API's own port.

Its frontend uses absolute paths (`/dashboard`, `/api/...`, `/static/...`, `/artifacts`)
and cannot live under a sub-path, so requests under those roots are dispatched to the
dashboard's WSGI app before FastAPI routes them. Converge's own API lives under `/v1`.
"""

from __future__ import annotations

import threading
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

DASHBOARD_ROOTS = ("/dashboard", "/api", "/static", "/artifacts", "/csv", "/favicon.ico")


class DashboardDispatch:
    """ASGI middleware: dashboard paths go to optuna-dashboard, everything else to the app."""

    def __init__(self, app: ASGIApp, storage_factory: Any):
        self.app = app
        self._storage_factory = storage_factory
        self._dashboard: ASGIApp | None = None
        self._lock = threading.Lock()

    def _dashboard_app(self) -> ASGIApp:
        # Built on first use: the API must start (and answer /v1/health) even before the
        # database is reachable.
        with self._lock:
            if self._dashboard is None:
                import optuna_dashboard
                from a2wsgi import WSGIMiddleware

                self._dashboard = WSGIMiddleware(optuna_dashboard.wsgi(self._storage_factory()))
        return self._dashboard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _is_dashboard_path(scope["path"]):
            await self._dashboard_app()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _is_dashboard_path(path: str) -> bool:
    return any(path == root or path.startswith(root + "/") for root in DASHBOARD_ROOTS)
