"""`/v1/workers`: the workers sharing this database, as their heartbeats report them."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from converge.service import views
from converge.service.api.deps import SessionDep, SessionRoute, SettingsDep, error_responses, require_scope
from converge.service.schemas import WORKER_EXAMPLE, WorkerOut

router = APIRouter(prefix="/v1/workers", tags=["workers"], route_class=SessionRoute)


@router.get("", response_model=list[WorkerOut], dependencies=[Depends(require_scope("read"))],
            responses={**error_responses("read", invalid=None),
                       200: {"content": {"application/json": {"example": [WORKER_EXAMPLE]}}}})
def list_workers(settings: SettingsDep, session: SessionDep) -> list[WorkerOut]:
    """Every worker seen in the last day: host, pid, devices, slots, state, the trials it runs now
    and its last heartbeat; `alive` is false once its heartbeat is older than the grace period."""
    return views.list_worker_outs(session, settings.grace_period_s)
