"""The Optuna objective: suggest the five hyperparameters, train, record every epoch.

Each epoch's metrics go to Converge's table as the epoch ends (visible through the API
while the trial runs); only the objective metric goes to Optuna, for pruning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optuna
from sqlalchemy.engine import Engine

from service.db import repo
from service.db.engine import session_scope
from studies.search_space import suggest
from studies.spec import StudySpec

EpochListener = Callable[[optuna.Trial, dict[str, Any]], None]


class ObjectiveNotFinite(RuntimeError):
    """The objective metric became NaN or infinite: the trial diverged."""


class Objective:
    def __init__(self, spec: StudySpec, study_id: int, engine: Engine, *, device: str = "auto",
                 on_trial_start: Callable[[optuna.Trial], None] | None = None,
                 on_epoch: EpochListener | None = None):
        self.spec = spec
        self.study_id = study_id
        self.engine = engine
        self.device = device
        self.on_trial_start = on_trial_start
        self.on_epoch = on_epoch

    def __call__(self, trial: optuna.Trial) -> float:
        if self.on_trial_start is not None:
            self.on_trial_start(trial)
        try:
            return self._train(trial, suggest(trial, self.spec.search_space))
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            # Optuna keeps no failure reason of its own; the API and CLI show this one.
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
            raise

    def _train(self, trial: optuna.Trial, params: dict[str, Any]) -> float:
        from trainers import TrainConfig, fit  # torch is imported in the trial's process only

        metric = self.spec.objective.metric
        pruned_at: list[int] = []

        def on_epoch_end(metrics: dict[str, Any]) -> bool:
            with session_scope(self.engine) as session:
                repo.record_epoch(session, self.study_id, trial._trial_id, trial.number, metrics)
            if self.on_epoch is not None:
                self.on_epoch(trial, metrics)
            value = metrics.get(metric)
            if value is None or not math.isfinite(value):
                return True  # nothing to learn from further epochs; the objective check below fails it
            trial.report(value, step=int(metrics["epoch"]))
            if trial.should_prune():
                pruned_at.append(int(metrics["epoch"]))
                return True
            return False

        config = TrainConfig(
            model=self.spec.task.model,
            dataset=self.spec.task.dataset,
            val_fraction=self.spec.task.val_fraction,
            seed=self.spec.sampler.seed or 0,  # one split and one init for every trial: comparable values
            params=dict(self.spec.task.params),
            device=self.device,
            **params,
        )
        result = fit(config, on_epoch_end=on_epoch_end)
        last = result.epochs[-1]
        value = last.get(metric)
        if value is None or not math.isfinite(value):
            raise ObjectiveNotFinite(f"{metric} became {value} at epoch {last['epoch']}: the trial diverged")
        if pruned_at:
            raise optuna.TrialPruned(f"pruned by the {self.spec.pruner.name} pruner at epoch {pruned_at[0]}")
        return float(value)
