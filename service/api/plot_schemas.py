"""Response schemas of the figure endpoints (`GET .../plot`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from converge.service.schemas import Verdict

FIGURE_EXAMPLE: dict[str, Any] = {
    "data": [{"type": "scatter", "mode": "lines+markers", "name": "val_loss", "x": [0, 1, 2],
              "y": [2.1, 1.4, 1.6]}],
    "layout": {"title": {"text": "digits-mlp · trial 7 (complete): overfitting, confidence 0.90"},
               "meta": {"converge": "trial", "study": "digits-mlp", "trial": 7, "verdict": "overfitting"}},
}
TRIAL_PLOT_EXAMPLE: dict[str, Any] = {"study": "digits-mlp", "trial": 7, "state": "complete",
                                      "verdict": "overfitting", "title": FIGURE_EXAMPLE["layout"]["title"]["text"],
                                      "figure": FIGURE_EXAMPLE}
STUDY_FIGURE_KEYS = ("objective_history", "parallel_coordinates", "lr_vs_objective", "verdict_counts", "loss_curves")
STUDY_PLOT_EXAMPLE: dict[str, Any] = {
    "study": "digits-mlp", "trials": 40, "curves_shown": 40, "curves_total": 40,
    "verdict_counts": {"converged": 22, "overfitting": 9, "diverged": 6, "undiagnosed": 3},
    "figures": {key: {"data": [{"type": "bar" if key == "verdict_counts" else "scatter", "x": [0], "y": [0.4]}],
                      "layout": {"meta": {"converge": key, "study": "digits-mlp"}}} for key in STUDY_FIGURE_KEYS},
}
HTML_EXAMPLE = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>digits-mlp: figures</title>'
                '<script type="text/javascript">/* plotly.js, bundled */</script></head><body>...</body></html>')


class PlotlyFigure(BaseModel):
    """A plotly figure as JSON (`Plotly.newPlot(div, figure.data, figure.layout)` draws it)."""

    model_config = ConfigDict(extra="allow")
    data: list[dict[str, Any]] = Field(description="the traces")
    layout: dict[str, Any] = Field(description="the layout; `layout.meta.converge` names the figure")


class TrialPlotOut(BaseModel):
    """One trial's convergence figure."""

    study: str
    trial: int
    state: str | None = Field(description="Optuna's state, lower case (complete, pruned, fail, running, waiting)")
    verdict: Verdict | None = Field(description="the latest diagnosis' verdict; null before the first epoch")
    title: str = Field(description="the figure's title: the trial, its state and its verdict")
    figure: PlotlyFigure

    model_config = ConfigDict(json_schema_extra={"examples": [TRIAL_PLOT_EXAMPLE]})


class StudyPlotOut(BaseModel):
    """The study's figures, by key."""

    study: str
    trials: int = Field(description="trials plotted (failed attempts that were rerun left out)")
    curves_shown: int = Field(description="trials overlaid in `loss_curves` (at most 200, evenly spread)")
    curves_total: int = Field(description="trials with at least one epoch recorded")
    verdict_counts: dict[str, int] = Field(description="trials per verdict; `undiagnosed` for those without one")
    figures: dict[str, PlotlyFigure] = Field(description="`objective_history`, `parallel_coordinates`, "
                                             "`lr_vs_objective`, `verdict_counts`, `loss_curves`")

    model_config = ConfigDict(json_schema_extra={"examples": [STUDY_PLOT_EXAMPLE]})
