"""Converge's verdicts and figures inside optuna-dashboard (`/dashboard`), stored in Optuna's storage.

- Each trial's final diagnosis becomes its dashboard note (Markdown: verdict, evidence, remedies),
  written by the slot process when the trial ends, in the transaction of its final diagnosis
  (`write_trial_note`), in `optuna_dashboard.save_note`'s format but reading and writing only that
  trial's keys.
- The study's five figures (`studies.plots.draw.study_figures`, the loss overlay cut to
  `DASHBOARD_CURVES` trials) are saved with `save_plotly_graph_object` under fixed ids
  (`converge-objective_history`, ...), so each save replaces the last. A worker refreshes them after
  a trial ends, at most every `dashboard_figures_every_s` (60 s) per study, and always when the
  study ends (`StudyFigures.after_trial`).

Both write study system attributes in chunks of about 2 KB (optuna-dashboard's format), and both
are best effort: a failure is logged and never fails the trial or stops the worker.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import optuna
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.settings import Settings
from converge.studies.plots.data import diagnosis_note

log = logging.getLogger("converge.dashboard")
DASHBOARD_CURVES = 50  # the dashboard's loss overlay: each figure is stored in 2 KB chunks, one row each
FIGURE_ID = "converge-{key}"


MAX_NOTE_CHUNKS = 64  # chunks of an earlier note (a user's, written in the dashboard) that a new one blanks


def save_trial_note(trial: optuna.Trial, last: tuple[int, dict[str, Any]] | None, engine: Engine) -> None:
    """The trial's dashboard note from its last diagnosis (`(epoch, diagnosis)`, None when it had
    none), in a transaction of its own; best effort, never raises. (A trial's slot writes it with
    its final diagnosis instead: `studies.objective.TrialDiagnoser.save_final`.)"""
    try:
        with session_scope(engine) as session:
            write_trial_note(session, trial, last)
    except Exception:
        log.exception("trial %d: could not save its dashboard note", trial.number)


def write_trial_note(session: Session, trial: optuna.Trial, last: tuple[int, dict[str, Any]] | None) -> None:
    """Write the trial's dashboard note in `session`'s transaction.

    optuna-dashboard's format (its `save_note_with_version`: a version key, the body in ~2 KB
    chunks, an earlier note's extra chunks blanked), in two statements that read and write only
    this trial's keys: `save_note` reads every system attribute of the study twice (they grow
    with every note) and writes each key in a transaction of its own.
    """
    from optuna_dashboard._note import note_str_key_prefix, note_ver_key, split_body

    epoch, diagnosis = last if last is not None else (None, None)
    study_id, trial_id = trial.study._study_id, trial._trial_id
    version_key, prefix = note_ver_key(trial_id), note_str_key_prefix(trial_id)
    chunks = split_body(diagnosis_note(trial.number, diagnosis, epoch), trial_id)
    keys = [version_key, *(f"{prefix}{i}" for i in range(MAX_NOTE_CHUNKS))]
    current = repo.study_system_attrs(session, study_id, keys)
    stale = {f"{prefix}{i}": "" for i in range(len(chunks), MAX_NOTE_CHUNKS) if current.get(f"{prefix}{i}")}
    repo.set_study_system_attrs(session, study_id, {version_key: current.get(version_key, 0) + 1, **chunks, **stale})


def save_study_figures(settings: Settings, study_name: str) -> list[str]:
    """Draw the study's figures and store them for the dashboard; the graph object ids written."""
    from optuna_dashboard import save_plotly_graph_object

    from converge.studies.plots import draw, load
    from converge.studies.storage import storage_for

    storage = storage_for(settings)
    with session_scope(get_engine(settings.database_url)) as session:
        data = load.study_data(session, storage, study_name, max_curves=DASHBOARD_CURVES)
    study = optuna.load_study(study_name=study_name, storage=storage)
    ids = []
    for key, figure in draw.study_figures(data).items():
        ids.append(save_plotly_graph_object(study, figure, graph_object_id=FIGURE_ID.format(key=key)))
    return ids


class StudyFigures:
    """A worker's refreshes of its studies' dashboard figures: throttled per study, forced at the study's end."""

    def __init__(self, settings: Settings, clock: Any = time.monotonic):
        self.settings = settings
        self.clock = clock
        self.saved_at: dict[str, float] = {}

    def after_trial(self, study_name: str, study_ended: bool) -> bool:
        """Refresh the study's figures if due; whether it did. Never raises."""
        now = self.clock()
        last = self.saved_at.get(study_name)
        if not study_ended and last is not None and now - last < self.settings.dashboard_figures_every_s:
            return False
        self.saved_at[study_name] = now
        try:
            save_study_figures(self.settings, study_name)
        except Exception:
            log.exception("study %s: could not save its dashboard figures", study_name)
            return False
        return True
