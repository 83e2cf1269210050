"""The diagnosis on hand-made curves: the contract's edge cases, its output format, its refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from converge.studies.diagnosis import (
    MAX_EPOCHS,
    REMEDY_ACTIONS,
    REMEDY_PARAMS,
    VERDICTS,
    HistoryError,
    Remedy,
    diagnose,
    parse_history,
)
from converge.studies.diagnosis.remedies import apply_remedy

X = np.arange(40)


def history(train, val=None, *, objective=None, max_epochs=None, **columns) -> dict:
    epochs = []
    for i, t in enumerate(train):
        row = {"epoch": i, "train_loss": t}
        if val is not None:
            row["val_loss"] = val[i]
        for name, values in columns.items():
            row[name] = values[i]
        epochs.append(row)
    out = {"epochs": epochs, "max_epochs": max_epochs or len(epochs)}
    if objective:
        out["objective"] = objective
    return out


def check_contract(result: dict) -> None:
    """Every diagnosis has the contract's fields, vocabulary and strict-JSON values."""
    assert set(result) == {"verdict", "healthy", "onset_epoch", "confidence", "findings", "remedies", "summary"}
    assert result["verdict"] in VERDICTS
    assert result["healthy"] == (result["verdict"] in ("converged", "still_improving"))
    assert 0.0 <= result["confidence"] <= 1.0
    assert result["summary"]
    for finding in result["findings"]:
        assert set(finding) == {"kind", "epoch", "evidence"} and finding["evidence"]
    for remedy in result["remedies"]:
        assert remedy["param"] in REMEDY_PARAMS and remedy["action"] in REMEDY_ACTIONS and remedy["reason"]
        assert ("factor" in remedy) or ("value" in remedy) or remedy["action"] == "enable"
    if not result["healthy"]:
        assert result["findings"] and result["remedies"]
        assert result["findings"][0]["kind"] == result["verdict"]
    json.dumps(result, allow_nan=False)


def verdict(h: dict) -> str:
    result = diagnose(h).to_dict()
    check_contract(result)
    return result["verdict"]


CONVERGED = 2.0 * np.exp(-X / 4) + 0.1
IMPROVING = 2.0 * np.exp(-X / 40) + 0.1


@pytest.mark.parametrize("name, h, expected", [
    ("one epoch", history([2.3], [2.2]), {"still_improving"}),
    ("every value NaN", history([math.nan] * 6, [math.nan] * 6, grad_norm=[math.nan] * 6), {"diverged"}),
    ("NaN as strings", history([2.3, 1.9, "NaN"], [2.2, 1.8, "NaN"]), {"diverged"}),
    ("Infinity string", history([2.3, "Infinity"]), {"diverged"}),
    ("NaN only in val, from some epoch on", history(CONVERGED[:10], [*CONVERGED[:6], *[math.nan] * 4]), {"diverged"}),
    ("val entirely NaN reads the train curve", history(CONVERGED, [math.nan] * 40), {"converged"}),
    ("constant loss", history([1.5] * 20, [1.5] * 20), {"underfitting", "vanishing_gradients"}),
    ("missing val metrics", history(CONVERGED), {"converged"}),
    ("still falling, no val", history(IMPROVING), {"still_improving"}),
    ("regression losses in the thousands", history(25000 * np.exp(-X / 4) + 3000, 25000 * np.exp(-X / 4) + 3300),
     {"converged"}),
    ("negative losses", history(-2 * (1 - np.exp(-X / 4)), -2 * (1 - np.exp(-X / 4)) + 0.1), {"converged"}),
    ("loss climbing past 3x its start", history([2.3, 2.0, 4.0, 9.0, 30.0, 80.0]), {"diverged"}),
    ("val rising while train falls", history(2 * np.exp(-X / 5), np.r_[2 * np.exp(-X[:12] / 5) + 0.3,
                                                                      0.48 + 0.04 * (X[12:] - 11)]), {"overfitting"}),
    ("large alternating swings", history(1 + 0.3 * (-1.0) ** X, 1.1 + 0.3 * (-1.0) ** X), {"oscillating"}),
])
def test_edge_cases_give_a_sensible_verdict(name: str, h: dict, expected: set[str]) -> None:
    assert verdict(h) in expected, name


def test_maximised_objective_with_only_accuracy() -> None:
    acc = 0.95 - 0.85 * np.exp(-X / 4)
    h = history(CONVERGED, objective={"metric": "val_acc", "direction": "maximize"}, val_acc=acc)
    assert verdict(h) == "converged"


def test_exploding_gradients_with_a_finite_spiky_loss() -> None:
    grad = np.r_[[1.0, 1.2, 0.9, 1.1, 1.0], [300.0, 5.0, 800.0, 2.0, 1500.0, 900.0]]
    train = np.r_[[2.3, 1.5, 1.2, 1.1, 1.0], [1.6, 1.1, 1.9, 1.2, 2.1, 1.8]]
    result = diagnose(history(train, grad_norm=grad)).to_dict()
    check_contract(result)
    assert result["verdict"] == "exploding_gradients" and result["onset_epoch"] == 5
    assert result["remedies"][0]["param"] == "lr"


def test_vanishing_gradients_with_tiny_norms_and_a_still_loss() -> None:
    train = 2.3026 - 0.0001 * X[:20]
    grad = np.full(20, 3e-6)
    h = history(train, train + 0.001, grad_norm=grad, param_norm=np.full(20, 12.0), lr=np.full(20, 0.01))
    assert verdict(h) == "vanishing_gradients"


def test_overfitting_onset_and_remedy_stop_at_the_minimum() -> None:
    val = np.r_[2 * np.exp(-X[:18] / 5) + 0.3, 0.3 + 2 * np.exp(-17 / 5) + 0.05 * (X[18:] - 17)]
    result = diagnose(history(2 * np.exp(-X / 5), val)).to_dict()
    assert result["verdict"] == "overfitting" and result["onset_epoch"] == 17
    assert result["remedies"][0] == {"param": "epochs", "action": "set", "value": 18,
                                     "reason": result["remedies"][0]["reason"]}


def test_every_prefix_gives_a_valid_diagnosis() -> None:
    val = np.r_[2 * np.exp(-X[:18] / 5) + 0.3, 0.3 + 2 * np.exp(-17 / 5) + 0.05 * (X[18:] - 17)]
    full = history(2 * np.exp(-X / 5), val, grad_norm=np.linspace(1, 0.2, 40), lr=np.full(40, 1e-3))
    for n in range(1, 41):
        check_contract(diagnose({**full, "epochs": full["epochs"][:n]}).to_dict())


def test_random_histories_never_raise() -> None:
    """Noise, NaN, infinities, negative and huge values in any column: a verdict, never an exception."""
    rng = np.random.default_rng(0)
    specials = np.array([math.nan, math.inf, -math.inf, 0.0, -1e30, 1e30])
    for _ in range(500):
        n = int(rng.integers(1, 60))
        columns = {}
        for name in ("train_loss", "val_loss", "val_acc", "grad_norm", "param_norm", "lr"):
            values = rng.normal(0, 10 ** rng.uniform(-6, 6), n) + rng.choice([0, 1, 1e3])
            mask = rng.random(n) < rng.choice([0.0, 0.1, 0.5])
            values[mask] = rng.choice(specials, mask.sum())
            columns[name] = list(values)
        h = history(columns.pop("train_loss"), columns.pop("val_loss"), **columns)
        check_contract(diagnose(h).to_dict())


@pytest.mark.parametrize("bad, reason", [
    ({"epochs": []}, "non-empty"),
    ([1, 2], "JSON object"),
    ({"epochs": [{"epoch": 0, "train_loss": 1.0}, {"epoch": 0, "train_loss": 0.9}]}, "repeated"),
    ({"epochs": [{"epoch": 1, "train_loss": 1.0}, {"epoch": 0, "train_loss": 0.9}]}, "out of order"),
    ({"epochs": [{"epoch": 0}]}, "train_loss is required"),
    ({"epochs": [{"epoch": 0, "train_loss": "lots"}]}, "must be a number"),
    ({"epochs": [{"epoch": -1, "train_loss": 1.0}]}, "non-negative integer"),
    ({"epochs": [{"epoch": 10**30, "train_loss": 1.0}]}, "up to 2147483647"),  # would overflow int64
    ({"epochs": [{"epoch": 1e30, "train_loss": 1.0}]}, "up to 2147483647"),
    ({"objective": {"direction": "up"}, "epochs": [{"epoch": 0, "train_loss": 1.0}]}, "direction"),
    ({"epochs": [{"epoch": i, "train_loss": 1.0} for i in range(MAX_EPOCHS + 1)]}, f"at most {MAX_EPOCHS}"),
])
def test_invalid_histories_are_refused_with_the_reason(bad, reason: str) -> None:
    with pytest.raises(HistoryError) as error:
        diagnose(bad)
    assert reason in str(error.value)


def test_all_problems_are_listed_at_once() -> None:
    with pytest.raises(HistoryError) as error:
        parse_history({"max_epochs": 0, "epochs": [{"epoch": 0}, {"epoch": 0, "train_loss": True}]})
    assert len(error.value.problems) == 4


def test_a_history_at_the_limit_is_diagnosed() -> None:
    h = history(2.0 * np.exp(-np.arange(MAX_EPOCHS) / 500) + 0.1)
    assert verdict(h) in VERDICTS


def test_apply_remedy() -> None:
    params = {"lr": 0.1, "batch_size": 32, "epochs": 40, "weight_decay": 0.0, "dropout": 0.8}
    assert apply_remedy(params, Remedy("lr", "decrease", "r", factor=0.1))["lr"] == pytest.approx(0.01)
    assert apply_remedy(params, Remedy("batch_size", "increase", "r", factor=2))["batch_size"] == 64
    assert apply_remedy(params, Remedy("epochs", "set", "r", value=18))["epochs"] == 18
    assert apply_remedy(params, Remedy("weight_decay", "increase", "r", factor=10))["weight_decay"] > 0
    assert apply_remedy(params, Remedy("dropout", "decrease", "r", factor=0.3))["dropout"] == pytest.approx(0.24)
    assert apply_remedy(params, Remedy("gradient_clip", "enable", "r", value=1.0))["gradient_clip"] == 1.0
    with pytest.raises(ValueError):
        apply_remedy(params, Remedy("model", "set", "r", value="deeper"))
    with pytest.raises(ValueError):
        Remedy("momentum", "increase", "r", factor=2)
