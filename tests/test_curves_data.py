"""The labelled curves in tests/data/curves.jsonl (made by benchmarks/make_curves.py) keep their promised shape.

Fast and training-free: it only reads the file. The generator's acceptance checks vouch for the
labels; this test guards the structure the diagnosis classifier and its evaluation rely on.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

PATH = Path(__file__).parent / "data" / "curves.jsonl"
VERDICTS = {"diverged", "exploding_gradients", "vanishing_gradients", "oscillating", "slow_convergence",
            "still_improving", "converged", "overfitting", "underfitting"}
NON_FINITE = {"NaN", "Infinity", "-Infinity"}
ONSET_REQUIRED = {"diverged", "exploding_gradients", "overfitting"}
METRICS = {"train_loss", "val_loss", "val_acc", "grad_norm", "param_norm", "lr"}


def _reject_constant(name: str) -> float:
    raise ValueError(f"bare {name} in the file: non-finite values must be the strings {sorted(NON_FINITE)}")


def _load() -> list[dict]:
    lines = PATH.read_text().splitlines()
    return [json.loads(line, parse_constant=_reject_constant) for line in lines if line.strip()]


RECORDS = _load()


def test_enough_records_per_label_dataset_and_optimizer():
    labels = Counter(r["label"] for r in RECORDS)
    assert len(RECORDS) >= 180
    assert set(labels) <= VERDICTS
    assert all(labels[v] >= 20 for v in VERDICTS), labels
    assert len({r["dataset"] for r in RECORDS}) >= 4
    assert len({r["optimizer"] for r in RECORDS}) >= 3


def test_ids_are_unique():
    ids = [r["id"] for r in RECORDS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r["id"])
def test_history_is_well_formed(record: dict):
    history = record["history"]
    epochs = history["epochs"]
    assert record["label"] in VERDICTS
    assert record["task"] in ("classification", "regression")
    assert history["objective"]["direction"] in ("minimize", "maximize")
    assert epochs and len(epochs) <= history["max_epochs"]
    assert [row["epoch"] for row in epochs] == list(range(len(epochs)))
    for row in epochs:
        assert "train_loss" in row
        assert set(row) - {"epoch"} <= METRICS
        for key in set(row) - {"epoch"}:
            value = row[key]
            assert value in NON_FINITE if isinstance(value, str) else math.isfinite(value), (key, value)
    if record["task"] == "regression":
        assert all("val_acc" not in row for row in epochs)


@pytest.mark.parametrize("record", [r for r in RECORDS if r["label"] in ONSET_REQUIRED], ids=lambda r: r["id"])
def test_onset_is_an_epoch_of_the_history(record: dict):
    onset = record["onset_epoch"]
    assert isinstance(onset, int) and not isinstance(onset, bool)
    assert 0 <= onset < len(record["history"]["epochs"])
