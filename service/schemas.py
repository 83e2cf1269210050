"""Response schemas (kept apart from the ORM models)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, SerializerFunctionWrapHandler, model_serializer

from converge.studies.diagnosis import MAX_EPOCHS, REMEDY_ACTIONS, REMEDY_PARAMS, VERDICTS
from converge.studies.spec import parse_spec


def _json_float(value: float | None) -> float | str | None:
    """JSON has no NaN or Infinity: send them as the strings the diagnosis contract accepts."""
    if value is None or math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


JsonFloat = Annotated[float | None, PlainSerializer(_json_float, return_type=float | str | None)]

StudyState = Literal["queued", "running", "done", "cancelled", "failed"]
TrialState = Literal["running", "waiting", "complete", "pruned", "failed"]
Verdict = Literal[VERDICTS]  # the diagnosis library's verdicts, one source of truth
RemedyParam = Literal[REMEDY_PARAMS]
RemedyAction = Literal[REMEDY_ACTIONS]


class TrialCounts(BaseModel):
    running: int = 0
    waiting: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = Field(default=0, description="failed attempts, the rerun ones included")
    rerun: int = Field(default=0, description="failed attempts whose process died and that were rerun as a new "
                       "trial: they do not count towards n_trials")


class BestTrial(BaseModel):
    number: int
    value: JsonFloat
    params: dict[str, Any]


STUDY_EXAMPLE: dict[str, Any] = {
    "name": "digits-mlp", "state": "done", "detail": None, "n_trials": 40,
    "trials": {"running": 0, "waiting": 0, "complete": 37, "pruned": 3, "failed": 0, "rerun": 0},
    "best": {"number": 7, "value": 0.0871,
             "params": {"lr": 0.0123, "batch_size": 64, "epochs": 20, "weight_decay": 0.0001, "dropout": 0.1}},
    "created_at": "2026-11-28T08:59:58.000001Z", "started_at": "2026-11-28T08:59:59.5Z",
    "finished_at": "2026-11-28T09:30:12.25Z",
    "spec": parse_spec({"name": "digits-mlp", "n_trials": 40}).model_dump(mode="json"),  # complete, as stored
}


class StudyOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [STUDY_EXAMPLE]})

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


TRIAL_EXAMPLE: dict[str, Any] = {
    "number": 7, "state": "complete",
    "params": {"lr": 0.0123, "batch_size": 64, "epochs": 20, "weight_decay": 0.0001, "dropout": 0.1},
    "value": 0.0871, "datetime_start": "2026-11-28T09:00:00.123456Z",
    "datetime_complete": "2026-11-28T09:00:41.654321Z", "duration_s": 41.530865, "epochs_recorded": 20,
    "error": None, "verdict": "converged", "confidence": 0.86, "retry_of": None, "repair_of": None,
    "repaired_as": None, "pruned_by": None, "rerun_as": None,
}


class TrialOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [TRIAL_EXAMPLE]})

    number: int
    state: TrialState
    params: dict[str, Any]
    value: JsonFloat
    datetime_start: datetime | None
    datetime_complete: datetime | None
    duration_s: float | None
    epochs_recorded: int
    error: str | None = Field(description="the exception of a failed trial")
    verdict: Verdict | None = Field(default=None, description="the latest diagnosis' verdict; null until the "
                                    "trial's first epoch is recorded")
    confidence: float | None = Field(default=None, description="the latest diagnosis' confidence, 0..1")
    retry_of: int | None = Field(default=None, description="the failed attempt this trial reruns")
    repair_of: int | None = Field(default=None, description="the unhealthy trial this trial repairs")
    repaired_as: int | None = Field(default=None, description="the trial that repairs this unhealthy one")
    pruned_by: dict[str, Any] | None = Field(
        default=None, description="a pruned trial's rule (a diagnosis verdict such as diverged, or the base pruner's "
        "name), the epoch it stopped at, and the reason")
    rerun_as: int | None = Field(default=None, description="the trial that reruns this failed attempt (its process "
                                 "died or its worker stopped)")


class FindingOut(BaseModel):
    kind: str = Field(description="what was observed")
    epoch: int | None = Field(description="the epoch it was observed at, when it has one")
    evidence: str = Field(description="the numbers behind it")


class RemedyOut(BaseModel):
    """A change to one hyperparameter: multiply it by `factor`, set it to `value`, or enable it."""

    param: RemedyParam
    action: RemedyAction
    factor: float | None = Field(default=None, description="multiply the current value by this (absent otherwise)")
    value: float | int | str | None = Field(default=None, description="set the parameter to this (absent otherwise)")
    reason: str

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler):
        """`factor` and `value` are left out when unset, as in the diagnosis contract.

        No return annotation: one would replace the model's documented schema with a bare object.
        """
        data = handler(self)
        for key in ("factor", "value"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


DIAGNOSIS_EXAMPLE: dict[str, Any] = {  # what the library said of HISTORY_EXAMPLES["diverged"] when written
    "verdict": "diverged", "healthy": False, "onset_epoch": 2, "confidence": 0.99,
    "findings": [{"kind": "diverged", "epoch": 2,
                  "evidence": "train_loss became NaN at epoch 2 (it was 2.3 at epoch 0)"}],
    "remedies": [{"param": "lr", "action": "decrease", "factor": 0.1,
                  "reason": "the loss blew up: steps are far too large"},
                 {"param": "gradient_clip", "action": "enable", "value": 1.0,
                  "reason": "caps the update a single bad batch can make"},
                 {"param": "batch_size", "action": "increase", "factor": 2,
                  "reason": "larger batches give less noisy, safer steps"}],
    "summary": "After 3 epochs the run diverged from epoch 2 (confidence 0.99): train_loss became NaN at epoch 2 "
               "(it was 2.3 at epoch 0).",
}


class DiagnosisOut(BaseModel):
    """A convergence diagnosis in the contract's format (`studies.diagnosis.Diagnosis.to_dict()`)."""

    model_config = ConfigDict(json_schema_extra={"examples": [DIAGNOSIS_EXAMPLE]})

    verdict: Verdict
    healthy: bool = Field(description="true for converged and still_improving")
    onset_epoch: int | None = Field(description="the epoch the problem began at, when there is one")
    confidence: float = Field(description="how sure the verdict is, 0..1")
    findings: list[FindingOut] = Field(description="the observations behind the verdict")
    remedies: list[RemedyOut] = Field(description="changes to try, first the most promising")
    summary: str


REPAIR_EXAMPLE: dict[str, Any] = {
    "trial": 3, "repair_trial": 41, "remedy": DIAGNOSIS_EXAMPLE["remedies"][0],
    "params": {"lr": 0.00123, "batch_size": 64, "epochs": 20, "weight_decay": 0.0001, "dropout": 0.1},
    "automatic": False,
}


class RepairOut(BaseModel):
    """An unhealthy trial queued again as a new trial with its diagnosis' first applicable remedy."""

    model_config = ConfigDict(json_schema_extra={"examples": [REPAIR_EXAMPLE]})

    trial: int = Field(description="the trial repaired")
    repair_trial: int = Field(description="the new trial, waiting for a worker")
    remedy: dict[str, Any] = Field(description="the remedy applied, as in the diagnosis")
    params: dict[str, Any] = Field(description="the repair's parameters")
    automatic: bool = Field(description="made by the spec's auto_repair rather than by a user")


REPAIR_OUTCOME_EXAMPLE: dict[str, Any] = {**REPAIR_EXAMPLE, "state": "complete", "verdict": "converged",
                                          "healthy": True}


class RepairOutcome(RepairOut):
    """A repair and how it went: the repair trial's state and latest diagnosis."""

    model_config = ConfigDict(json_schema_extra={"examples": [REPAIR_OUTCOME_EXAMPLE]})

    state: TrialState
    verdict: Verdict | None = Field(description="the repair trial's latest verdict; null before its first epoch")
    healthy: bool | None


TRIAL_DIAGNOSIS_EXAMPLE: dict[str, Any] = {
    **DIAGNOSIS_EXAMPLE, "study": "digits-mlp", "trial": 3, "epoch": 2, "final": True,
    "updated_at": "2026-11-28T09:02:10.5Z", "repair": REPAIR_OUTCOME_EXAMPLE,
}


class TrialDiagnosisOut(DiagnosisOut):
    """A trial's latest diagnosis, rewritten after each of its epochs."""

    model_config = ConfigDict(json_schema_extra={"examples": [TRIAL_DIAGNOSIS_EXAMPLE]})

    study: str
    trial: int
    epoch: int = Field(description="the last epoch the diagnosis saw")
    final: bool = Field(description="the trial has ended: this is its last diagnosis")
    updated_at: datetime
    repair: RepairOutcome | None = Field(default=None, description="the trial's repair and its outcome, once "
                                         "it was repaired (POST .../repair)")


class VerdictRegionOut(BaseModel):
    """A hyperparameter region where ended trials were mostly unhealthy, whatever their unhealthy verdicts."""

    verdict: Verdict = Field(description="the most frequent unhealthy verdict inside")
    param: str = Field(description="the hyperparameter")
    op: Literal[">", "<", ">=", "<="] = Field(description="> and < for floats (a round number between two "
                                              "observed values), >= and <= for integers (an observed value)")
    threshold: float | int
    matching: int = Field(description="ended, diagnosed trials inside the region")
    with_verdict: int = Field(description="of those, the trials with an unhealthy verdict")
    precision: float = Field(description="with_verdict / matching")
    text: str = Field(description='the region in words, e.g. "lr > 0.3: 6 of 6 trials unhealthy: diverged 3, '
                                  'oscillating 2, underfitting 1"')
    verdicts: dict[Verdict, int] = Field(default_factory=dict, description="the unhealthy trials inside, per "
                                         "verdict, most frequent first")


class ParamImportanceOut(BaseModel):
    importances: dict[str, float] | None = Field(description="each swept hyperparameter's share of the importance "
                                                 "(summing to 1), largest first; null with `reason` when it "
                                                 "cannot be told")
    reason: str | None = Field(description="why `importances` is null")
    evaluator: str = Field(description="Optuna's importance evaluator")
    trials_used: int = Field(description="completed trials with a finite value it was computed on")


class RecommendationOut(BaseModel):
    spec: dict[str, Any] = Field(description="a complete study spec, named NAME-next, that POST /v1/studies "
                                 "accepts as it is")
    changes: list[str] = Field(description="what changed in the search space, in words")


STUDY_DIAGNOSIS_EXAMPLE: dict[str, Any] = {
    "study": "digits-mlp", "trials": 40, "verdicts": {"converged": 21, "diverged": 10, "still_improving": 7,
                                                      "underfitting": 2},
    "healthy": 28, "undiagnosed": 0, "provisional": 0, "rerun_attempts": 0,
    "regions": [{"verdict": "diverged", "param": "lr", "op": ">", "threshold": 0.21, "matching": 10,
                 "with_verdict": 9, "precision": 0.9, "text": "lr > 0.21: 9 of 10 trials unhealthy: diverged 9",
                 "verdicts": {"diverged": 9}}],
    "importance": {"importances": {"lr": 0.81, "dropout": 0.1, "batch_size": 0.05, "epochs": 0.03,
                                   "weight_decay": 0.01},
                   "reason": None, "evaluator": "PedAnovaImportanceEvaluator", "trials_used": 28},
    "recommendation": {
        "spec": parse_spec({"name": "digits-mlp-next", "n_trials": 40, "search_space": {
            "lr": {"low": 0.00031, "high": 0.026, "log": True}, "batch_size": {"choices": [16, 32, 64, 128]},
            "epochs": {"low": 3, "high": 10}, "weight_decay": 0.0001, "dropout": {"low": 0.0, "high": 0.32}},
        }).model_dump(mode="json"),  # complete, as the endpoint returns it
        "changes": ["lr: 1e-05..1 → 0.00031..0.026, avoiding lr > 0.21 (diverged)",
                    "batch_size: [16, 32, 64, 128, 256] → [16, 32, 64, 128]", "dropout: 0..0.7 → 0..0.32"],
    },
}


class StudyDiagnosisOut(BaseModel):
    """A whole study's diagnosis: its trials' verdicts, the regions that explain the unhealthy ones,
    parameter importance, and a narrower search space for the next sweep."""

    model_config = ConfigDict(json_schema_extra={"examples": [STUDY_DIAGNOSIS_EXAMPLE]})

    study: str
    trials: int = Field(description="the trials counted: every trial but the failed attempts that were rerun")
    verdicts: dict[Verdict, int] = Field(description="trials per verdict of their latest diagnosis (final once "
                                         "the trial ended), most frequent first")
    healthy: int = Field(description="trials with a healthy verdict (converged, still_improving)")
    undiagnosed: int = Field(description="trials without a diagnosis yet (waiting, or no epoch recorded)")
    provisional: int = Field(description="diagnosed trials still running: their verdict may change, and they "
                             "are left out of `regions`")
    rerun_attempts: int = Field(description="failed attempts rerun as another trial (their process died or "
                                "their worker stopped): left out of everything")
    regions: list[VerdictRegionOut] = Field(description="the hyperparameter regions that explain the unhealthy "
                                            "trials, all unhealthy verdicts together, best first (at most three per "
                                            "search), then a verdict's own where the group shows none")
    importance: ParamImportanceOut
    recommendation: RecommendationOut


TRIAL_PAGE_CURSOR_EXAMPLE = ("eyJzdHVkeSI6ImRpZ2l0cy1tbHAiLCJzb3J0IjoibnVtYmVyIiwic3RhdGUiOm51bGwsInZlcmRpY3Qi"
                             "Om51bGwsImFmdGVyIjpbNyw4XX0")


class TrialPage(BaseModel):
    """One page of a study's trials, in the order asked for."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"trials": [TRIAL_EXAMPLE], "next_cursor": TRIAL_PAGE_CURSOR_EXAMPLE, "total": 40}]})

    trials: list[TrialOut]
    next_cursor: str | None = Field(description="pass it as `cursor` (with the same `sort` and filters) for the "
                                    "next page; null on the last page")
    total: int = Field(description="the trials matching the filters now, on every page")


class AttemptOut(BaseModel):
    """One attempt of a trial's line of attempts (a failed attempt and its reruns)."""

    number: int
    state: TrialState
    datetime_start: datetime | None
    datetime_complete: datetime | None
    duration_s: float | None
    epochs_recorded: int
    error: str | None = Field(description="why the attempt failed, when it did")


TRIAL_DETAIL_EXAMPLE: dict[str, Any] = {
    **TRIAL_EXAMPLE, "number": 8, "retry_of": 7, "epochs_recorded": 3, "duration_s": 6.25,
    "datetime_start": "2026-11-28T09:01:00Z", "datetime_complete": "2026-11-28T09:01:06.250000Z",
    "params": {**TRIAL_EXAMPLE["params"], "epochs": 3}, "value": 0.31, "verdict": "still_improving",
    "intermediate_values": {"0": 0.92, "1": 0.48, "2": 0.31},
    "user_attrs": {"converge_retry_of": 7, "converge_failures": 1},
    "diagnosis": {"verdict": "still_improving", "healthy": True, "onset_epoch": None, "confidence": 0.86,
                  "findings": [{"kind": "still_improving", "epoch": 2,
                                "evidence": "val_loss fell 35% over the last 3 epochs"}],
                  "remedies": [{"param": "epochs", "action": "increase", "factor": 2.0,
                                "reason": "the loss was still falling when training stopped"}],
                  "summary": "still improving: train longer"},
    "attempts": [
        {"number": 7, "state": "failed", "datetime_start": "2026-11-28T09:00:00Z",
         "datetime_complete": "2026-11-28T09:00:03Z", "duration_s": 3.0, "epochs_recorded": 1,
         "error": "trial process died (exit code -9); rerun as trial 8"},
        {"number": 8, "state": "complete", "datetime_start": "2026-11-28T09:01:00Z",
         "datetime_complete": "2026-11-28T09:01:06.250000Z", "duration_s": 6.25, "epochs_recorded": 3,
         "error": None}],
    "train_seconds": 5.9,
}


class TrialDetail(TrialOut):
    model_config = ConfigDict(json_schema_extra={"examples": [TRIAL_DETAIL_EXAMPLE]})

    intermediate_values: dict[int, JsonFloat] = Field(description="objective reported to Optuna, by epoch")
    user_attrs: dict[str, Any]
    diagnosis: DiagnosisOut | None = Field(default=None, description="the latest diagnosis; null until the "
                                           "trial's first epoch is recorded")
    attempts: list[AttemptOut] = Field(description="the trial's line of attempts, first to latest: the failed "
                                       "attempts its parameters ran in before (`retry_of`), the trial, and its "
                                       "reruns (`rerun_as`); just the trial when it was never rerun")
    train_seconds: float | None = Field(description="the sum of its epochs' `epoch_seconds` (training and "
                                        "validation, without start-up); null before its first epoch")


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


METRICS_HISTORY_EXAMPLE: dict[str, Any] = {
    "study": "digits-mlp", "trial": 7, "objective": {"metric": "val_loss", "direction": "minimize"}, "max_epochs": 20,
    "epochs": [
        {"epoch": 0, "train_loss": 2.1, "val_loss": 2.0, "val_acc": 0.31, "grad_norm": 1.2, "param_norm": 3.1,
         "lr": 0.001, "epoch_seconds": 0.41},
        {"epoch": 1, "train_loss": 1.4, "val_loss": "NaN", "val_acc": None, "grad_norm": "Infinity",
         "param_norm": 3.3, "lr": 0.001, "epoch_seconds": 0.39},
    ],
}


class MetricsOut(BaseModel):
    """A trial's history in the diagnosis contract's input format (`?layout=history`)."""

    model_config = ConfigDict(json_schema_extra={"examples": [METRICS_HISTORY_EXAMPLE]})

    study: str
    trial: int
    objective: ObjectiveOut
    max_epochs: int = Field(description="the epochs this trial was given")
    epochs: list[EpochOut]


class MetricColumns(BaseModel):
    """One list per metric, all as long as `epoch`; null where a metric was not recorded."""

    epoch: list[int]
    train_loss: list[JsonFloat]
    val_loss: list[JsonFloat]
    val_acc: list[JsonFloat]
    grad_norm: list[JsonFloat]
    param_norm: list[JsonFloat]
    lr: list[JsonFloat]
    epoch_seconds: list[JsonFloat]


METRICS_COLUMNS_EXAMPLE: dict[str, Any] = {
    **{k: METRICS_HISTORY_EXAMPLE[k] for k in ("study", "trial", "objective", "max_epochs")},
    "columns": {"epoch": [0, 1], "train_loss": [2.1, 1.4], "val_loss": [2.0, "NaN"], "val_acc": [0.31, None],
                "grad_norm": [1.2, "Infinity"], "param_norm": [3.1, 3.3], "lr": [0.001, 0.001],
                "epoch_seconds": [0.41, 0.39]},
}
METRICS_CSV_EXAMPLE = ("epoch,train_loss,val_loss,val_acc,grad_norm,param_norm,lr,epoch_seconds\r\n"
                       "0,2.1,2.0,0.31,1.2,3.1,0.001,0.41\r\n1,1.4,NaN,,Infinity,3.3,0.001,0.39\r\n")


class MetricsColumnsOut(BaseModel):
    """A trial's per-epoch metrics as columns (the default layout)."""

    model_config = ConfigDict(json_schema_extra={"examples": [METRICS_COLUMNS_EXAMPLE]})

    study: str
    trial: int
    objective: ObjectiveOut
    max_epochs: int = Field(description="the epochs this trial was given")
    columns: MetricColumns


STUDY_EXPORT_EXAMPLE: dict[str, Any] = {"study": STUDY_EXAMPLE, "trials": [TRIAL_EXAMPLE]}
STUDY_EXPORT_CSV_EXAMPLE = (
    "number,state,value,params_batch_size,params_dropout,params_epochs,params_lr,params_weight_decay,datetime_start,"
    "datetime_complete,duration_s,epochs_recorded,verdict,confidence,retry_of,rerun_as,repair_of,repaired_as,"
    "pruned_by,error\r\n"
    "7,complete,0.0871,64,0.1,20,0.0123,0.0001,2026-11-28T09:00:00.123456Z,2026-11-28T09:00:41.654321Z,41.530865,20,"
    "converged,0.86,,,,,,\r\n")


class StudyExport(BaseModel):
    """A whole study: the study and every trial of it, in order of number."""

    model_config = ConfigDict(json_schema_extra={"examples": [STUDY_EXPORT_EXAMPLE]})

    study: StudyOut
    trials: list[TrialOut]


NonFinite = Literal["NaN", "Infinity", "-Infinity"]
HistoryFloat = float | NonFinite


class HistoryObjectiveIn(BaseModel):
    metric: str = Field(default="val_loss", description="the metric the run optimises")
    direction: Literal["minimize", "maximize"] = "minimize"


class HistoryEpochIn(BaseModel):
    """One epoch. Only `epoch` and `train_loss` are required; other metrics may be absent or null, and the
    objective may be given under its own name when it is none of these (a plug-in's `val_mae`)."""

    model_config = ConfigDict(extra="allow")

    epoch: int = Field(ge=0, description="epoch numbers must strictly increase")
    train_loss: HistoryFloat
    val_loss: HistoryFloat | None = None
    val_acc: HistoryFloat | None = None
    grad_norm: HistoryFloat | None = None
    param_norm: HistoryFloat | None = None
    lr: HistoryFloat | None = None


class HistoryIn(BaseModel):
    """A training history in the diagnosis contract's format (the body of `.../metrics?layout=history` is one).

    Non-finite values may be the strings "NaN", "Infinity", "-Infinity" or bare NaN/Infinity
    tokens. Other keys are ignored. This model documents the body; the diagnosis library
    validates it (`studies.diagnosis.parse_history`) and lists every problem.
    """

    model_config = ConfigDict(extra="allow")

    objective: HistoryObjectiveIn | None = Field(default=None, description="default: minimize val_loss")
    max_epochs: int | None = Field(default=None, ge=1, description="the epochs the run was given")
    epochs: list[HistoryEpochIn] = Field(min_length=1, max_length=MAX_EPOCHS)


HISTORY_EXAMPLES: dict[str, dict[str, Any]] = {
    "improving": {
        "summary": "a run still improving at its last epoch",
        "value": {
            "objective": {"metric": "val_loss", "direction": "minimize"},
            "max_epochs": 50,
            "epochs": [
                {"epoch": 0, "train_loss": 2.1, "val_loss": 2.0, "val_acc": 0.31, "grad_norm": 1.2,
                 "param_norm": 3.1, "lr": 0.001},
                {"epoch": 1, "train_loss": 1.4, "val_loss": 1.3, "val_acc": 0.55, "grad_norm": 1.0,
                 "param_norm": 3.3, "lr": 0.001},
                {"epoch": 2, "train_loss": 0.9, "val_loss": 0.95, "val_acc": 0.7, "grad_norm": 0.8,
                 "param_norm": 3.5, "lr": 0.001},
            ],
        },
    },
    "diverged": {
        "summary": "a run whose loss became NaN (non-finite values as strings)",
        "value": {
            "max_epochs": 20,
            "epochs": [
                {"epoch": 0, "train_loss": 2.3, "val_loss": 2.2, "grad_norm": 40.0, "lr": 5.0},
                {"epoch": 1, "train_loss": 310.0, "val_loss": "Infinity", "grad_norm": 9000.0, "lr": 5.0},
                {"epoch": 2, "train_loss": "NaN", "val_loss": "NaN", "grad_norm": "NaN", "lr": 5.0},
            ],
        },
    },
}


SPEC_EXAMPLES: dict[str, dict[str, Any]] = {
    "small": {
        "summary": "12 trials of the digits MLP, epochs narrowed; every other field at its default",
        "value": {"name": "digits-mlp-small", "task": {"model": "mlp", "dataset": "sklearn:digits"},
                  "search_space": {"epochs": {"low": 3, "high": 10}}, "n_trials": 12},
    },
    "every field": {
        "summary": "every field given: a fixed weight decay, val_acc maximised, automatic repairs",
        "value": {
            "name": "wine-mlp",
            "task": {"model": "mlp", "dataset": "sklearn:wine", "val_fraction": 0.25,
                     "params": {"width": 64, "depth": 2}, "seed": 7},
            "objective": {"metric": "val_acc", "direction": "maximize"},
            "search_space": {"lr": {"low": 0.0001, "high": 0.1, "log": True},
                             "batch_size": {"choices": [16, 32, 64]}, "epochs": {"low": 5, "high": 30},
                             "weight_decay": {"value": 0.0001}, "dropout": {"low": 0.0, "high": 0.5}},
            "n_trials": 40,
            "sampler": {"name": "tpe", "seed": 0},
            "pruner": {"name": "convergence", "base": "hyperband", "min_fraction": 0.25, "min_confidence": 0.9,
                       "early_stop": True, "early_stop_fraction": 0.5},
            "retries": 2,
            "auto_repair": {"max": 3},
        },
    },
}


class ErrorOut(BaseModel):
    """An error: what went wrong, in words."""

    detail: str


class ProblemsOut(BaseModel):
    """A 422: a readable `detail` and one line per problem."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "detail": "invalid study spec (1 problem):\n  - n_trials: n_trials must be between 1 and 10000, got 0",
        "problems": ["n_trials: n_trials must be between 1 and 10000, got 0"]}]})

    detail: str
    problems: list[str] = Field(description="one line per problem, each naming where it is")


class WorkerTrialOut(BaseModel):
    study: str
    trial: int | None = Field(description="the trial's number; null while its slot process is starting it")
    device: str
    slot: int = Field(description="the trial slot of the study this child claimed")


WORKER_EXAMPLE: dict[str, Any] = {
    "id": "gpu-box-1-4242-3f9a1c", "host": "gpu-box-1", "pid": 4242, "devices": "cuda:0,cuda:1", "slots": 2,
    "state": "running", "alive": True,
    "current_trials": [{"study": "digits-mlp", "trial": 12, "device": "cuda:0", "slot": 12},
                       {"study": "digits-mlp", "trial": None, "device": "cuda:1", "slot": 13}],
    "started_at": "2026-11-28T08:59:50Z", "last_heartbeat": "2026-11-28T09:10:02.25Z",
}


class WorkerOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [WORKER_EXAMPLE]})

    id: str
    host: str
    pid: int
    devices: str = Field(description="the devices its trial slots run on, e.g. `cpu` or `cuda:0,cuda:1`")
    slots: int = Field(description="trials it runs at once")
    state: Literal["running", "stopping", "stopped"]
    alive: bool = Field(description="running or stopping, with a heartbeat within the grace period")
    current_trials: list[WorkerTrialOut]
    started_at: datetime
    last_heartbeat: datetime


class HealthOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"status": "ok", "database": "ok", "version": "0.1.0"},
        {"status": "unavailable",
         "database": "database sqlite:///./converge.db is not initialised: run `converge db upgrade`",
         "detail": "database sqlite:///./converge.db is not initialised: run `converge db upgrade`",
         "version": "0.1.0"},
        {"status": "unavailable",
         "database": "the database at sqlite:///./converge.db cannot be written: database or disk is full",
         "detail": "the database at sqlite:///./converge.db cannot be written: database or disk is full",
         "version": "0.1.0"}]})

    status: Literal["ok", "unavailable"]
    database: str
    detail: str | None = Field(default=None, description="why the service is unavailable (a 503 only)")
    version: str
