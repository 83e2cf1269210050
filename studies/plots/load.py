"""The figures' data, read from the database: Converge's tables and Optuna's storage.

Used by the API (`GET .../plot`), `converge report` and the workers (the dashboard's figures).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import optuna
from sqlalchemy.orm import Session

from converge.core.db import repo
from converge.core.errors import NotFound
from converge.studies.plots.data import (
    MAX_CURVES,
    StudyFigureData,
    StudyTrial,
    TrialFigureData,
    finite,
    spread,
    study_figure_data,
    trial_figure_data,
)


def trial_data(session: Session, name: str, number: int) -> TrialFigureData:
    """One trial's figure data: its epoch rows and its latest diagnosis (four small queries)."""
    study, optuna_id = repo.get_study_and_optuna_id(session, name)
    trial, rows = repo.trial_metrics_with_param(session, optuna_id, study.id, number, "epochs")
    if trial is None:
        raise NotFound(f"study {name!r} has no trial {number}")
    state = repo.optuna_trial_state(session, trial.trial_id)
    row = repo.get_diagnosis(session, study.id, number)
    epochs = [{"epoch": r.epoch, **{c: getattr(r, c) for c in ("train_loss", "val_loss", "val_acc", "grad_norm",
                                                                "lr")}} for r in rows]
    return trial_figure_data(name, number, epochs, row.diagnosis if row is not None else None,
                             state=state.lower() if state else None)


def study_data(session: Session, storage: optuna.storages.BaseStorage, name: str,
               max_curves: int = MAX_CURVES) -> StudyFigureData:
    """The study's figure data: every trial (failed attempts that were rerun left out) through Optuna's
    storage, their verdicts, and the loss curves of at most `max_curves` of them (evenly spread)."""
    study, optuna_id = repo.get_study_and_optuna_id(session, name)
    objective = study.spec.get("objective", {})
    rerun = repo.rerun_trial_numbers(session, study.id)
    verdicts = {n: d.verdict for n, d in repo.diagnoses_by_trial(session, study.id, with_diagnosis=False).items()}
    frozen = [t for t in storage.get_all_trials(optuna_id, deepcopy=False) if t.number not in rerun]
    with_epochs = sorted(n for n in repo.epochs_recorded(session, study.id) if n not in rerun)
    shown = spread(with_epochs, max_curves)
    by_trial: dict[int, list[Any]] = defaultdict(list)
    for row in repo.metric_rows_of_trials(session, study.id, shown):
        by_trial[row.trial_number].append(row)
    metric = "val_loss" if any(finite(r.val_loss) is not None for rs in by_trial.values() for r in rs) \
        else "train_loss"
    trials = [StudyTrial(number=t.number, state=t.state.name.lower(),
                         value=finite(t.values[0]) if t.values else None,
                         params=dict(t.params), verdict=verdicts.get(t.number),
                         curve=[(int(r.epoch), finite(getattr(r, metric))) for r in by_trial.get(t.number, [])])
              for t in frozen]
    return study_figure_data(name, objective.get("direction", "minimize"), objective.get("metric", "objective"),
                             trials, max_curves=max_curves, curves_metric=metric, curves_total=len(with_epochs))
