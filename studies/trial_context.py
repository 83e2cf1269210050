"""A trial's diagnosis context (`context` in the diagnosis input, `studies.diagnosis.context`):
what its curve alone cannot tell, built once at the trial's start.

The task and class count where they are known without loading the data (the built-in datasets;
a CSV that says `&task=...`; never the user's own data), the trial's five hyperparameters, the
study's search space in the spec's own form, and the summary of the study's ended trials
(`studies.peers`). Plain JSON values only.
"""

from __future__ import annotations

import numbers
from typing import Any

from converge.studies.spec import (
    PARAM_NAMES,
    FloatFixed,
    FloatRange,
    IntChoices,
    IntFixed,
    IntRange,
    SearchSpace,
    StudySpec,
    Task,
)

# The built-in datasets' task and class count (None: regression), as `trainers.data` loads them.
DATASET_TASKS: dict[str, tuple[str, int | None]] = {
    "sklearn:digits": ("classification", 10),
    "sklearn:wine": ("classification", 3),
    "sklearn:breast_cancer": ("classification", 2),
    "sklearn:iris": ("classification", 3),
    "sklearn:diabetes": ("regression", None),
    "sklearn:friedman1": ("regression", None),
}


def task_context(task: Task) -> dict[str, Any]:
    """`task` and `n_classes` where known without the data: nothing for the user's own data, nor for
    a CSV file that leaves its task to be inferred from its target column."""
    if task.is_plugin:  # `dataset` is unused (its default stays in the spec)
        return {}
    known = DATASET_TASKS.get(task.dataset)
    if known is not None:
        kind, n_classes = known
        return {"task": kind} if n_classes is None else {"task": kind, "n_classes": n_classes}
    for kind in ("regression", "classification"):
        if task.dataset.startswith("csv:") and task.dataset.endswith(f"&task={kind}"):
            return {"task": kind}
    return {}


def bounds_context(space: SearchSpace) -> dict[str, dict[str, Any]]:
    """The search space, one entry per hyperparameter in the spec's own form: {low, high, log},
    {choices} or {value}."""
    bounds: dict[str, dict[str, Any]] = {}
    for name in PARAM_NAMES:
        p = getattr(space, name)
        if isinstance(p, IntRange):
            bounds[name] = {"low": int(p.low), "high": int(p.high), "log": bool(p.log)}
        elif isinstance(p, FloatRange):
            bounds[name] = {"low": float(p.low), "high": float(p.high), "log": bool(p.log)}
        elif isinstance(p, IntChoices):
            bounds[name] = {"choices": [int(c) for c in p.choices]}
        elif isinstance(p, IntFixed):
            bounds[name] = {"value": int(p.value)}
        elif isinstance(p, FloatFixed):
            bounds[name] = {"value": float(p.value)}
    return bounds


def params_context(params: dict[str, Any]) -> dict[str, int | float]:
    """The trial's five hyperparameters as suggested (`studies.search_space.suggest`), as plain numbers."""
    out: dict[str, int | float] = {}
    for name in PARAM_NAMES:
        value = params.get(name)
        if isinstance(value, bool) or value is None:
            continue
        out[name] = int(value) if isinstance(value, numbers.Integral) else float(value)
    return out


def trial_context(spec: StudySpec, params: dict[str, Any], peers: dict[str, Any] | None) -> dict[str, Any]:
    """The context of one trial; `peers` (`studies.peers.PeerSummary.to_dict`) left out when None."""
    context: dict[str, Any] = task_context(spec.task)
    context["params"] = params_context(params)
    context["bounds"] = bounds_context(spec.search_space)
    if peers is not None:
        context["peers"] = peers
    return context
