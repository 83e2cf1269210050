"""`/v1/health`: is the service up and its database usable."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import SettingsDep
from service.api.schemas import HealthOut
from service.db.errors import ServiceError
from service.db.migrate import check_schema
from service.version import VERSION

router = APIRouter(prefix="/v1", tags=["health"])


@router.get("/health", response_model=HealthOut,
            responses={503: {"model": HealthOut, "description": "the database is unreachable or not upgraded"}})
def health(settings: SettingsDep) -> HealthOut | JSONResponse:
    """200 when the database answers and both schemas are current, else 503 saying why."""
    try:
        check_schema(settings.database_url)
    except ServiceError as exc:
        body = HealthOut(status="unavailable", database=str(exc), version=VERSION)
        return JSONResponse(body.model_dump(), status_code=503)
    return HealthOut(status="ok", database="ok", version=VERSION)
