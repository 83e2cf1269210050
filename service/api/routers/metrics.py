"""`GET /metrics`: Prometheus' text format, at the root as Prometheus expects (not under /v1).

It needs a `read` token once any token exists, like every other read (a scrape config sends it with
`authorization: {credentials: TOKEN}` or `bearer_token`). Not in the OpenAPI document: it is not JSON.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from converge.service import prometheus
from converge.service.api.deps import SessionDep, SessionRoute, SettingsDep, require_scope

router = APIRouter(tags=["operations"], route_class=SessionRoute)


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(require_scope("read"))])
def metrics(session: SessionDep, settings: SettingsDep) -> Response:
    """Studies by state, trials by state, workers and their heartbeats, trial and epoch durations."""
    return Response(prometheus.render(session, settings.grace_period_s), media_type=prometheus.CONTENT_TYPE)
