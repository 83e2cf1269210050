"""`converge report STUDY --out report.html`: one self-contained HTML file (plotly.js inlined, no network).

It holds the study summary (state, trials by state, best trial, the study diagnosis: verdict counts,
regions, importance, the next sweep's changes), the study's five figures, and the figure and
diagnosis of each unhealthy trial (ended or not; failed attempts that were rerun left out), by
number, at most `max_trials` of them (the report says how many it left out).
"""

from __future__ import annotations

import html
from typing import Any

import optuna
from sqlalchemy.orm import Session

from converge.core.db import repo
from converge.service import views
from converge.studies.diagnosis import HEALTHY_VERDICTS
from converge.studies.plots import draw, load

MAX_TRIAL_FIGURES = 200


def build_report(session: Session, storage: optuna.storages.BaseStorage, name: str,
                 max_trials: int = MAX_TRIAL_FIGURES) -> tuple[str, dict[str, Any]]:
    """The report's HTML and what it holds (`unhealthy`: trial numbers shown; `left_out`: how many were not)."""
    study = views.get_study_out(session, storage, name)
    diagnosis = views.get_study_diagnosis(session, name)
    study_id = repo.get_study(session, name).id
    rerun = repo.rerun_trial_numbers(session, study_id)
    unhealthy = sorted(n for n, d in repo.diagnoses_by_trial(session, study_id, with_diagnosis=False).items()
                       if d.verdict not in HEALTHY_VERDICTS and n not in rerun)
    shown = unhealthy[:max_trials]
    figures = draw.study_figures(load.study_data(session, storage, name))
    sections: list[tuple[str | None, str, list[Any]]] = [
        ("Summary", _summary_html(study, diagnosis), []),
        ("Figures", "", [figures[key] for key, _ in draw.STUDY_FIGURES]),
    ]
    left_out = len(unhealthy) - len(shown)
    intro = (f"<p>{len(unhealthy)} unhealthy trial(s)"
             + (f"; the first {len(shown)} are shown, {left_out} left out (`--max-trials`)" if left_out else "")
             + ".</p>")
    sections.append(("Unhealthy trials", intro, []))
    for number in shown:
        data = load.trial_data(session, name, number)
        sections.append((f"Trial {number}: {data.verdict}", draw.diagnosis_html(data), [draw.trial_figure(data)]))
    page = draw.page(f"Converge report: {name}", sections)
    return page, {"unhealthy": shown, "left_out": left_out}


def _row(label: str, value: Any) -> str:
    return f"<tr><th>{html.escape(label)}</th><td>{html.escape(str(value))}</td></tr>"


def _summary_html(study: Any, diagnosis: Any) -> str:
    spec = study.spec
    objective = spec.get("objective", {})
    counts = study.trials.model_dump()
    rows = [
        _row("state", study.state + (f" ({study.detail})" if study.detail else "")),
        _row("task", f"{spec['task'].get('model')} on {spec['task'].get('dataset') or spec['task'].get('data')}"),
        _row("objective", f"{objective.get('direction')} {objective.get('metric')}"),
        _row("trials", f"{study.n_trials} planned; " + ", ".join(f"{k} {v}" for k, v in counts.items() if v)),
        _row("best", f"trial {study.best.number} = {study.best.value:.6g}, {study.best.params}"
             if study.best is not None else "none yet"),
        _row("verdicts", ", ".join(f"{v} {n}" for v, n in diagnosis.verdicts.items()) or "none yet"),
        _row("healthy", f"{diagnosis.healthy} of {diagnosis.trials}; {diagnosis.undiagnosed} undiagnosed"),
    ]
    imp = diagnosis.importance
    rows.append(_row("importance", ", ".join(f"{k} {v:.2f}" for k, v in imp.importances.items())
                     if imp.importances else f"none ({imp.reason})"))
    parts = ["<table>" + "".join(rows) + "</table>"]
    if diagnosis.regions:
        parts.append("<p>Regions that explain unhealthy verdicts:</p><ul>"
                     + "".join(f"<li>{html.escape(r.text)}</li>" for r in diagnosis.regions) + "</ul>")
    if diagnosis.recommendation.changes:
        parts.append(f"<p>Next sweep (<code>{html.escape(diagnosis.recommendation.spec.get('name', ''))}</code>):"
                     "</p><ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in diagnosis.recommendation.changes)
                     + "</ul>")
    return "\n".join(parts)
