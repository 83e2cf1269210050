"""The issue's trials with a learning rate far too high, rebuilt from real fits: diagnosed with the
context a worker gives them (class count, params, bounds), the first remedy applied and the trial
trained again. Each is called unhealthy with an lr decrease, and the remedy makes it better."""

from __future__ import annotations

from typing import Any

import pytest

from converge.studies.diagnosis import diagnose
from converge.studies.diagnosis.remedies import apply_remedy
from converge.studies.objective import HISTORY_KEYS
from converge.studies.trial_context import DATASET_TASKS

pytestmark = pytest.mark.slow

BOUNDS = {"lr": {"low": 1e-5, "high": 2.0, "log": True}, "weight_decay": {"low": 1e-6, "high": 0.3, "log": True},
          "dropout": {"low": 0.0, "high": 0.8}, "batch_size": {"choices": [16, 32, 64, 128, 256]},
          "epochs": {"low": 5, "high": 40}}


def fit_history(dataset: str, params: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Train the built-in MLP (as a trial would) and return the history with its context, and the trial's value
    (its val_loss at the last epoch, as a sweep's objective)."""
    from converge.trainers import TrainConfig, fit

    result = fit(TrainConfig(dataset=dataset, device="cpu", seed=0, params={"width": 64, "depth": 2}, **params))
    epochs = [{key: row.get(key) for key in HISTORY_KEYS} for row in result.epochs]
    task, n_classes = DATASET_TASKS[dataset]
    context = {"task": task, "n_classes": n_classes, "params": params, "bounds": BOUNDS}
    return {"objective": {"metric": "val_loss", "direction": "minimize"}, "max_epochs": params["epochs"],
            "epochs": epochs, "context": context}, epochs[-1]["val_loss"]


@pytest.mark.parametrize(("dataset", "lr", "epochs"), [
    ("sklearn:digits", 0.37, 6), ("sklearn:digits", 0.16, 6), ("sklearn:iris", 1.36, 8), ("sklearn:iris", 1.5, 8),
    ("sklearn:iris", 1.02, 8),
])
def test_a_far_too_high_lr_is_lowered_and_the_remedy_helps(dataset: str, lr: float, epochs: int) -> None:
    params = {"lr": lr, "batch_size": 32, "epochs": epochs, "weight_decay": 1e-4, "dropout": 0.1}
    history, before = fit_history(dataset, params)
    d = diagnose(history).to_dict()
    assert not d["healthy"], d["summary"]
    first = d["remedies"][0]
    assert first["param"] == "lr" and first["action"] == "decrease", d["remedies"]
    repaired = apply_remedy(params, _as_remedy(first))
    assert BOUNDS["lr"]["low"] <= repaired["lr"] < lr
    _, after = fit_history(dataset, repaired)
    assert after < before * 0.98, (before, after, d["summary"])


def test_iris_chance_level_is_a_third() -> None:
    params = {"lr": 1.36, "batch_size": 32, "epochs": 8, "weight_decay": 1e-4, "dropout": 0.1}
    history, _ = fit_history("sklearn:iris", params)
    text = str(diagnose(history).to_dict())
    assert "chance level near 0.10" not in text
    assert "0.33" in text or "ln 3" in text


def _as_remedy(data: dict[str, Any]) -> Any:
    from converge.studies.diagnosis import Remedy

    return Remedy(data["param"], data["action"], data["reason"], factor=data.get("factor"), value=data.get("value"))


@pytest.mark.parametrize("dataset", ["sklearn:digits", "sklearn:iris", "sklearn:wine", "sklearn:breast_cancer"])
@pytest.mark.parametrize("lr", [0.001, 0.01])
def test_the_context_flags_no_learning_rate_of_the_usual_range(dataset: str, lr: float) -> None:
    """Paired: the same fit diagnosed with and without its context. At ordinary learning rates the
    context's lr rules stay silent: the verdict is the curve's own."""
    import copy

    history, _ = fit_history(dataset, {"lr": lr, "batch_size": 32, "epochs": 12, "weight_decay": 1e-4,
                                       "dropout": 0.1})
    alone = copy.deepcopy(history)
    del alone["context"]
    assert diagnose(history).verdict == diagnose(alone).verdict
