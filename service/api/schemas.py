"""Response schemas (kept apart from the ORM models)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, PlainSerializer


def _json_float(value: float | None) -> float | str | None:
    """JSON has no NaN or Infinity: send them as the strings the diagnosis contract accepts."""
    if value is None or math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


JsonFloat = Annotated[float | None, PlainSerializer(_json_float, return_type=float | str | None)]

StudyState = Literal["queued", "running", "done", "cancelled", "failed"]
TrialState = Literal["running", "waiting", "complete", "pruned", "failed"]


class TrialCounts(BaseModel):
    running: int = 0
    waiting: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0


class BestTrial(BaseModel):
    number: int
    value: JsonFloat
    params: dict[str, Any]


class StudyOut(BaseModel):
    name: str
    state: StudyState = Field(description="queued → running → done | failed; cancelled when stopped by a user")
    detail: str | None = Field(description="why the study failed, when it did")
    n_trials: int
    trials: TrialCounts
    best: BestTrial | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict[str, Any]


class TrialOut(BaseModel):
    number: int
    state: TrialState
    params: dict[str, Any]
    value: JsonFloat
    datetime_start: datetime | None
    datetime_complete: datetime | None
    duration_s: float | None
    epochs_recorded: int
    error: str | None = Field(description="the exception of a failed trial")


class TrialDetail(TrialOut):
    intermediate_values: dict[int, JsonFloat] = Field(description="objective reported to Optuna, by epoch")
    user_attrs: dict[str, Any]


class EpochOut(BaseModel):
    epoch: int
    train_loss: JsonFloat
    val_loss: JsonFloat
    val_acc: JsonFloat
    grad_norm: JsonFloat
    param_norm: JsonFloat
    lr: JsonFloat
    epoch_seconds: JsonFloat


class ObjectiveOut(BaseModel):
    metric: str
    direction: Literal["minimize", "maximize"]


class MetricsOut(BaseModel):
    """A trial's history in the diagnosis contract's input format."""

    study: str
    trial: int
    objective: ObjectiveOut
    max_epochs: int = Field(description="the epochs this trial was given")
    epochs: list[EpochOut]


class HealthOut(BaseModel):
    status: Literal["ok", "unavailable"]
    database: str
    version: str
