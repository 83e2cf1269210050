"""`GET /v1/studies/{name}/plot` and `GET /v1/studies/{name}/trials/{number}/plot`: figures as plotly JSON or HTML."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response

from converge.service.api.deps import SessionDep, SessionRoute, StorageDep, error_responses
from converge.service.api.plot_schemas import (
    HTML_EXAMPLE,
    STUDY_PLOT_EXAMPLE,
    TRIAL_PLOT_EXAMPLE,
    StudyPlotOut,
    TrialPlotOut,
)
from converge.service.api.routers.studies import BAD_NAME, BAD_PATH, NO_STUDY, NO_TRIAL, READ, StudyName, TrialNumber
from converge.studies.plots import draw, load

router = APIRouter(prefix="/v1/studies", tags=["plots"], route_class=SessionRoute)

PlotFormat = Annotated[Literal["json", "html"], Query(
    alias="format", description="`json` (default): plotly figure JSON; `html`: a standalone page with plotly.js "
                                "bundled (no CDN), to open in a browser or save",
    openapi_examples={"html": {"value": "html"}})]


def _responses(model: type, example: dict[str, Any], errors: dict[int, str], invalid: str) -> dict[int | str, Any]:
    return {**error_responses("read", errors, invalid=f"{invalid}, or a `format` other than json or html"),
            200: {"description": "the figures as plotly JSON (default) or as a standalone HTML page",
                  "content": {"application/json": {"example": example},
                              "text/html": {"schema": {"type": "string", "description": "with `?format=html`: "
                                                       "a standalone HTML page, plotly.js bundled"},
                                            "example": HTML_EXAMPLE}}}}


def _json(body: dict[str, Any]) -> Response:
    return Response(json.dumps(body, allow_nan=False, separators=(",", ":")), media_type="application/json")


@router.get("/{name}/plot", response_model=StudyPlotOut, dependencies=READ,
            responses=_responses(StudyPlotOut, STUDY_PLOT_EXAMPLE, NO_STUDY, BAD_NAME))
def get_study_plot(name: StudyName, session: SessionDep, storage: StorageDep, fmt: PlotFormat = "json") -> Response:
    """The study's figures, each coloured by the trials' verdicts:

    - `objective_history`: the objective of each trial by number, and the best so far;
    - `parallel_coordinates`: the five hyperparameters and the objective (lr and weight decay as log10);
    - `lr_vs_objective`: learning rate (log axis) against objective;
    - `verdict_counts`: trials per verdict;
    - `loss_curves`: every trial's validation loss (training loss where none has one) by epoch, overlaid; at
      most 200 trials, evenly spread over the study.

    Failed attempts that were rerun are left out. `format=html` answers one standalone page with all five.
    """
    data = load.study_data(session, storage, name)
    if fmt == "html":
        return HTMLResponse(draw.study_page(data))
    figures = draw.study_figures(data)
    return _json({"study": name, "trials": data.trials, "curves_shown": data.curves_shown,
                  "curves_total": data.curves_total, "verdict_counts": data.verdict_counts,
                  "figures": {key: draw.figure_json(fig) for key, fig in figures.items()}})


@router.get("/{name}/trials/{number}/plot", response_model=TrialPlotOut, dependencies=READ,
            responses=_responses(TrialPlotOut, TRIAL_PLOT_EXAMPLE, NO_TRIAL, BAD_PATH))
def get_trial_plot(name: StudyName, number: TrialNumber, session: SessionDep, fmt: PlotFormat = "json") -> Response:
    """The trial's convergence figure: train and validation loss, validation accuracy, gradient norm (log axis)
    and learning rate by epoch, each finding of its latest diagnosis marked at its epoch (its evidence on
    hover), the verdict in the title. A trial without epochs gets empty panels. `format=html` adds the
    diagnosis (verdict, evidence, remedies) above the figure."""
    data = load.trial_data(session, name, number)
    if fmt == "html":
        return HTMLResponse(draw.trial_page(data))
    return _json({"study": name, "trial": number, "state": data.state, "verdict": data.verdict, "title": data.title,
                  "figure": draw.figure_json(draw.trial_figure(data))})
