"""Turn a spec's search space into Optuna suggestions (and into a grid for the grid sampler)."""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna

from converge.studies.spec import PARAM_NAMES, FloatFixed, FloatRange, IntChoices, IntFixed, IntRange, SearchSpace


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """Ask the trial for each of the five hyperparameters.

    A fixed value is suggested as a one-choice categorical, so it is still recorded in the
    trial's params (Optuna's CLI and dashboard show it) without widening the search.
    """
    params: dict[str, Any] = {}
    for name in PARAM_NAMES:
        p = getattr(space, name)
        if isinstance(p, FloatRange):
            params[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
        elif isinstance(p, IntRange):
            params[name] = trial.suggest_int(name, p.low, p.high, log=p.log)
        elif isinstance(p, IntChoices):
            params[name] = trial.suggest_categorical(name, p.choices)
        elif isinstance(p, (FloatFixed, IntFixed)):
            params[name] = trial.suggest_categorical(name, [p.value])
        else:  # pragma: no cover - the spec's union is closed
            raise TypeError(f"unsupported parameter spec for {name}: {p!r}")
    return params


def grid(space: SearchSpace, points: int) -> dict[str, list[Any]]:
    """A grid for the grid sampler: continuous ranges cut into `points` values (log-spaced on a log scale)."""
    values: dict[str, list[Any]] = {}
    for name in PARAM_NAMES:
        p = getattr(space, name)
        if isinstance(p, FloatRange):
            axis = np.geomspace(p.low, p.high, points) if p.log else np.linspace(p.low, p.high, points)
            values[name] = [float(v) for v in axis]
        elif isinstance(p, IntRange):
            axis = np.geomspace(p.low, p.high, points) if p.log else np.linspace(p.low, p.high, points)
            values[name] = sorted({int(round(v)) for v in axis})
        else:
            values[name] = p.values()
    return values
