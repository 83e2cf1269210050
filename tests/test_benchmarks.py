"""The sweep-efficiency benchmark runs end to end on a tiny budget (its figures are not checked here)."""

from __future__ import annotations

import math
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import sweep_efficiency  # noqa: E402


@pytest.mark.slow
def test_sweep_efficiency_runs_every_configuration_and_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    figures = sweep_efficiency.main(["--seeds", "1", "--trials", "2", "--tasks", "friedman1"])
    table = capsys.readouterr().out
    assert "friedman1: target val_loss" in table
    for config in sweep_efficiency.CONFIGS:
        assert config in table and config in figures["friedman1"]
    tpe = figures["friedman1"]["tpe"]
    assert tpe["ratio_budget"] <= 1 and tpe["ratio_to_target"] == 1  # the reference reaches its own target
    assert figures["friedman1"]["budget"] == 2 * sweep_efficiency.TASKS["friedman1"]["epochs"]
    assert math.isfinite(figures["friedman1"]["target"])


def test_the_runs_compare_on_epochs_to_target_and_best_within_a_budget() -> None:
    spec = sweep_efficiency.study_spec("digits", "tpe", 0, 3)
    run = sweep_efficiency.Run("digits", "tpe", 0, spec, trials=[
        sweep_efficiency.TrialOutcome(0, "complete", 0.5, 10, 1.0, {}, None),
        sweep_efficiency.TrialOutcome(1, "pruned", None, 2, 1.5, {}, {"rule": "diverged"}),
        sweep_efficiency.TrialOutcome(2, "complete", 0.2, 10, 3.0, {}, None),
    ])
    assert run.epochs == 22
    assert run.to_target(0.3) == (22, 3.0) and run.to_target(0.1) is None
    assert run.best_within(12) == 0.5 and run.best_within(22) == 0.2
