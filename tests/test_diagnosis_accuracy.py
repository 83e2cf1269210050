"""The diagnosis against the labelled runs in tests/data/curves.jsonl (made by benchmarks/make_curves.py).

Floors, not exact figures: the benchmark (`benchmarks/diagnosis_accuracy.py`) prints the
figures themselves. Diagnosing every run and every prefix of the latency runs takes seconds.
"""

from __future__ import annotations

import pytest

from benchmarks.diagnosis_accuracy import HOLDOUT, latencies, load_records, ms_per_diagnosis, predictions, scores
from converge.studies.diagnosis import VERDICTS


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return load_records()


@pytest.fixture(scope="module")
def result(records) -> dict:
    return scores(predictions(records))


def test_accuracy_on_the_labelled_runs(result) -> None:
    assert result["accuracy"] >= 0.95


def test_healthy_runs_are_rarely_called_unhealthy(result) -> None:
    assert result["healthy_called_unhealthy"] <= 0.05


def test_accuracy_on_held_out_runs_never_used_for_tuning() -> None:
    """Runs from other seeds (make_curves.py --first-seed 1000): the rules were not fitted to these."""
    held_out = scores(predictions(load_records(HOLDOUT)))
    assert held_out["n"] >= 100
    assert held_out["accuracy"] >= 0.95
    assert held_out["healthy_called_unhealthy"] <= 0.05


@pytest.mark.parametrize("verdict", VERDICTS)
def test_every_verdict_is_recognised_and_precise(result, verdict: str) -> None:
    row = result["per_verdict"][verdict]
    assert row["recall"] >= 0.8, row
    assert row["precision"] >= 0.8, row


def test_divergence_and_exploding_gradients_are_caught_within_two_epochs(records) -> None:
    found = latencies(records)
    for verdict in ("diverged", "exploding_gradients"):
        assert found[verdict]["detected"] >= 0.9 * found[verdict]["runs"], found[verdict]
        assert found[verdict]["median"] <= 2, found[verdict]


def test_a_200_epoch_history_takes_under_5_ms() -> None:
    assert max(ms_per_diagnosis(reps=30).values()) <= 5.0
