"""The FastAPI application: routers, error handlers, and the dashboard on the same port."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse

from service.api.dashboard import DashboardDispatch
from service.api.routers import health, studies
from service.db.errors import Conflict, DatabaseUnavailable, NotFound, SchemaNotReady, ServiceError
from service.settings import Settings, get_settings
from service.version import VERSION
from studies.spec import SpecError, describe_errors

_STATUS = {NotFound: 404, Conflict: 409, DatabaseUnavailable: 503, SchemaNotReady: 503}

DESCRIPTION = """Hyperparameter sweeps over learning rate, batch size, epochs, weight decay and dropout,
with every trial's per-epoch metrics stored. Errors are JSON with a human-readable `detail`.
The Optuna dashboard for the same database is served at `/dashboard`."""


def create_app(settings: Settings | None = None, *, dashboard: bool = True) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="Converge", version=VERSION, description=DESCRIPTION)
    app.state.settings = settings
    app.include_router(studies.router)
    app.include_router(health.router)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard" if dashboard else "/docs")

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=_STATUS.get(type(exc), 500))

    @app.exception_handler(SpecError)
    async def spec_error(_: Request, exc: SpecError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "problems": exc.problems}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = describe_errors(exc.errors(), skip_prefix="body")
        what = "study spec" if request.url.path == "/v1/studies" else "request"
        return JSONResponse({"detail": str(SpecError(problems, what)), "problems": problems}, status_code=422)

    if dashboard:
        from studies.storage import storage_for

        app.add_middleware(DashboardDispatch, storage_factory=lambda: storage_for(settings))
    return app
