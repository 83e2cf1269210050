"""Plotly figures drawn from `studies.plots.data`, and standalone HTML pages holding them.

Every page bundles plotly.js itself (no CDN: the service may run offline). Drawing does no
computation of its own beyond turning the data's series into traces.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from converge.studies.plots.data import VERDICT_ORDER, StudyFigureData, TrialFigureData

VERDICT_COLORS = {
    "converged": "#2ca02c",
    "still_improving": "#17becf",
    "diverged": "#d62728",
    "exploding_gradients": "#8c1c13",
    "vanishing_gradients": "#9467bd",
    "oscillating": "#ff7f0e",
    "slow_convergence": "#bcbd22",
    "overfitting": "#e377c2",
    "underfitting": "#8c564b",
    "undiagnosed": "#7f7f7f",
}
TEMPLATE = "plotly_white"
# The study's figures, in the order pages show them: (key, title).
STUDY_FIGURES = (
    ("objective_history", "Objective history"),
    ("parallel_coordinates", "Hyperparameters (parallel coordinates)"),
    ("lr_vs_objective", "Learning rate against objective"),
    ("verdict_counts", "Verdicts"),
    ("loss_curves", "Loss curves"),
)
assert set(VERDICT_COLORS) == set(VERDICT_ORDER)


def color(verdict: str | None) -> str:
    return VERDICT_COLORS.get(verdict or "undiagnosed", VERDICT_COLORS["undiagnosed"])


# ---------------------------------------------------------------- one trial


def trial_figure(data: TrialFigureData) -> go.Figure:
    """Losses, validation accuracy, gradient norm (log axis) and learning rate by epoch; each finding
    a dashed line at its epoch (and a marker on the loss, its evidence on hover); the verdict in the title."""
    fig = make_subplots(rows=2, cols=2, shared_xaxes=True, vertical_spacing=0.12, horizontal_spacing=0.1,
                        subplot_titles=("loss", "validation accuracy", "gradient norm", "learning rate"))
    panels = {"train_loss": (1, 1), "val_loss": (1, 1), "val_acc": (1, 2), "grad_norm": (2, 1), "lr": (2, 2)}
    styles = {"train_loss": "#1f77b4", "val_loss": "#ff7f0e", "val_acc": "#2ca02c", "grad_norm": "#9467bd",
              "lr": "#8c564b"}
    for metric, (row, col) in panels.items():
        if not data.has(metric):
            continue
        fig.add_trace(go.Scatter(x=data.epochs, y=data.series[metric], mode="lines+markers", name=metric,
                                 line={"color": styles[metric]}, marker={"size": 4}, connectgaps=False),
                      row=row, col=col)
    loss_values = [v for m in ("train_loss", "val_loss") for v in data.series[m] if v is not None]
    top = max(loss_values) if loss_values else 1.0
    bad = sorted({e for m in ("train_loss", "val_loss") for e in data.non_finite[m]})
    if bad:
        fig.add_trace(go.Scatter(x=bad, y=[top] * len(bad), mode="markers", name="loss not finite",
                                 marker={"symbol": "x", "size": 10, "color": "#d62728"},
                                 hovertext=[f"epoch {e}: loss NaN or infinite" for e in bad], hoverinfo="text"),
                      row=1, col=1)
    for finding in data.findings:
        fig.add_vline(x=finding.epoch, line_dash="dash" if finding.primary else "dot",
                      line_color=color(finding.kind), opacity=0.7, row="all", col="all")
    if data.findings:
        fig.add_trace(go.Scatter(
            x=[f.epoch for f in data.findings], y=[f.y if f.y is not None else top for f in data.findings],
            mode="markers+text", name="findings", text=[f.kind for f in data.findings], textposition="top center",
            marker={"size": 12, "symbol": "diamond", "color": [color(f.kind) for f in data.findings],
                    "line": {"width": 1, "color": "black"}},
            hovertext=[f"{f.kind} at epoch {f.epoch}: {f.evidence}" for f in data.findings], hoverinfo="text"),
            row=1, col=1)
    if data.has("grad_norm"):
        fig.update_yaxes(type="log", row=2, col=1)
    if data.has("lr") and _spans_decades(data.series["lr"]):
        fig.update_yaxes(type="log", row=2, col=2)
    fig.update_xaxes(title_text="epoch", row=2)
    fig.update_layout(title={"text": html.escape(data.title), "font": {"color": color(data.verdict)}},
                      template=TEMPLATE, height=620, legend={"orientation": "h", "y": -0.12},
                      meta={"converge": "trial", "study": data.study, "trial": data.trial, "verdict": data.verdict})
    return fig


def _spans_decades(values: Sequence[float | None]) -> bool:
    finite = [v for v in values if v is not None and v > 0]
    return bool(finite) and max(finite) / min(finite) >= 100


# ---------------------------------------------------------------- a study


def study_figures(data: StudyFigureData) -> dict[str, go.Figure]:
    """The study's five figures, by key (STUDY_FIGURES), each coloured by verdict."""
    figures = {
        "objective_history": _history(data),
        "parallel_coordinates": _parallel(data),
        "lr_vs_objective": _lr_objective(data),
        "verdict_counts": _counts(data),
        "loss_curves": _curves(data),
    }
    titles = dict(STUDY_FIGURES)
    if data.curves_shown < data.curves_total:
        titles["loss_curves"] += f" ({data.curves_shown} of {data.curves_total} trials, evenly spread)"
    for key, fig in figures.items():
        fig.update_layout(template=TEMPLATE, meta={"converge": key, "study": data.study},
                          title=html.escape(f"{data.study}: {titles[key]}"))
    return figures


def _history(data: StudyFigureData) -> go.Figure:
    fig = go.Figure()
    for group in data.history:
        fig.add_trace(go.Scatter(x=group.numbers, y=group.values, mode="markers", name=group.verdict,
                                 marker={"color": color(group.verdict), "size": 8}))
    numbers, values = data.best
    if numbers:
        fig.add_trace(go.Scatter(x=numbers, y=values, mode="lines", name="best so far",
                                 line={"color": "black", "shape": "hv", "width": 1.5}))
    fig.update_layout(xaxis_title="trial", yaxis_title=f"{data.metric} ({data.direction})")
    return fig


def _parallel(data: StudyFigureData) -> go.Figure:
    verdicts = data.parallel["verdicts"]
    present = [v for v in VERDICT_ORDER if v in set(verdicts)] or ["undiagnosed"]
    index = {v: i for i, v in enumerate(present)}
    n = len(present)
    scale: list[list[Any]] = []  # a step colour scale: one band per verdict present
    for i, verdict in enumerate(present):
        scale += [[i / n, color(verdict)], [(i + 1) / n, color(verdict)]]
    dimensions = []
    for dim in data.parallel["dimensions"]:
        values = dim["values"]
        if dim["log"]:
            values = [math.log10(v) if v > 0 else None for v in values]
        dimensions.append({"label": f"log10({dim['label']})" if dim["log"] else dim["label"], "values": values})
    fig = go.Figure(go.Parcoords(
        line={"color": [index[v] + 0.5 for v in verdicts], "colorscale": scale, "cmin": 0, "cmax": n,
              "showscale": True, "colorbar": {"tickvals": [i + 0.5 for i in range(n)], "ticktext": present}},
        dimensions=dimensions))
    fig.update_layout(margin={"l": 80, "r": 120})
    return fig


def _lr_objective(data: StudyFigureData) -> go.Figure:
    fig = go.Figure()
    for group in data.lr_objective:
        fig.add_trace(go.Scatter(x=[lr for lr, _ in group.values], y=[v for _, v in group.values], mode="markers",
                                 name=group.verdict, text=[f"trial {n}" for n in group.numbers],
                                 marker={"color": color(group.verdict), "size": 8}))
    fig.update_layout(xaxis={"type": "log", "title": "learning rate"}, yaxis_title=data.metric)
    return fig


def _counts(data: StudyFigureData) -> go.Figure:
    verdicts = list(data.verdict_counts)
    fig = go.Figure(go.Bar(x=verdicts, y=[data.verdict_counts[v] for v in verdicts],
                           marker={"color": [color(v) for v in verdicts]}, text=[data.verdict_counts[v]
                                                                                 for v in verdicts]))
    fig.update_layout(xaxis_title="verdict", yaxis_title="trials", showlegend=False)
    return fig


def _curves(data: StudyFigureData) -> go.Figure:
    fig = go.Figure()
    shown: set[str] = set()
    for curve in data.curves:
        verdict = curve["verdict"]
        fig.add_trace(go.Scatter(x=curve["epochs"], y=curve["loss"], mode="lines", name=verdict,
                                 legendgroup=verdict, showlegend=verdict not in shown, opacity=0.6,
                                 line={"color": color(verdict), "width": 1.2},
                                 hovertext=f"trial {curve['number']} ({verdict})", hoverinfo="text+x+y"))
        shown.add(verdict)
    fig.update_layout(xaxis_title="epoch", yaxis_title=data.curves_metric)
    return fig


# ---------------------------------------------------------------- JSON and HTML


def figure_json(fig: go.Figure) -> dict[str, Any]:
    """The figure as plain JSON (plotly's encoder: NaN as null, numpy arrays as lists)."""
    return json.loads(fig.to_json())


@lru_cache(maxsize=1)
def plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def page(title: str, sections: Sequence[tuple[str | None, str, Sequence[go.Figure]]]) -> str:
    """A standalone HTML page, plotly.js inlined once: each section a heading, HTML text and figures."""
    body = []
    for i, (heading, text, figures) in enumerate(sections):
        body.append('<section class="converge-section">')
        if heading:
            body.append(f"<h2>{html.escape(heading)}</h2>")
        body.append(text)
        for j, fig in enumerate(figures):
            body.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"converge-plot-{i}-{j}",
                                    config={"displaylogo": False}))
        body.append("</section>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f"<style>{_CSS}</style>\n"
            f'<script type="text/javascript">{plotly_js()}</script></head>\n'
            f"<body><h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


_CSS = ("body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
        ".converge-section{margin-bottom:2em}.unhealthy{color:#d62728}.healthy{color:#2ca02c}")


def trial_page(data: TrialFigureData) -> str:
    return page(data.title, [(None, diagnosis_html(data), [trial_figure(data)])])


def study_page(data: StudyFigureData) -> str:
    figures = study_figures(data)
    return page(f"{data.study}: figures", [(None, "", [figures[key] for key, _ in STUDY_FIGURES])])


def diagnosis_html(data: TrialFigureData) -> str:
    if data.verdict is None:
        return "<p>Not diagnosed yet: no epoch recorded.</p>"
    css = "healthy" if data.healthy else "unhealthy"
    parts = [f'<p>Verdict: <strong class="{css}">{html.escape(data.verdict)}</strong>'
             + (f" (confidence {data.confidence:.2f})" if data.confidence is not None else "") + "</p>"]
    if data.summary:
        parts.append(f"<p>{html.escape(data.summary)}</p>")
    if data.findings:
        parts.append("<ul>" + "".join(f"<li><strong>{html.escape(f.kind)}</strong> at epoch {f.epoch}: "
                                      f"{html.escape(f.evidence)}</li>" for f in data.findings) + "</ul>")
    if data.remedies:
        parts.append("<p>Remedies:</p><ol>" + "".join(
            f"<li>{html.escape(str(r.get('action')))} <code>{html.escape(str(r.get('param')))}</code>"
            + (f" ×{html.escape(str(r['factor']))}" if r.get("factor") is not None else "")
            + (f" to {html.escape(str(r['value']))}" if r.get("value") is not None else "")
            + (f": {html.escape(str(r['reason']))}" if r.get("reason") else "") + "</li>"
            for r in data.remedies) + "</ol>")
    return "\n".join(parts)
