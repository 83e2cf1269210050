"""The sweep-efficiency benchmark runs end to end on a tiny budget (its figures are not checked here)."""

from __future__ import annotations

import math
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import sweep_efficiency  # noqa: E402


@pytest.mark.slow
def test_sweep_efficiency_runs_every_arm_and_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    figures = sweep_efficiency.main(["--seeds", "1", "--trials", "2", "--tasks", "friedman1"])
    table = capsys.readouterr().out
    assert "friedman1: target val_loss" in table and "panel (friedman1), tpe+convergence:" in table
    summary = table.split("\nsummary: ")[1].splitlines()
    assert summary[1].split() == ["arm", "friedman1"] and summary[2].startswith("tpe ") and "1/1 · " in summary[2]
    for arm in sweep_efficiency.ARMS:
        assert arm in table and arm in figures["friedman1"]["arms"]
    tpe = figures["friedman1"]["arms"]["tpe"]
    assert tpe["reached"] == 1 and tpe["epochs_to_target"] <= figures["friedman1"]["budget"]  # its own target
    assert figures["friedman1"]["budget"] == 2 * sweep_efficiency.TASKS["friedman1"]["epochs"]
    assert math.isfinite(figures["friedman1"]["target"])
    assert set(figures["panel"]["met"]) == {"epochs", "trial_budget", "wrong_prunes", "seeds"}


def test_the_runs_compare_on_epochs_to_target_and_best_within_a_budget() -> None:
    spec = sweep_efficiency.study_spec("digits", "tpe", 0, 3)
    run = sweep_efficiency.Run("digits", "tpe", 0, spec, trials=[
        sweep_efficiency.TrialOutcome(0, "complete", 0.5, 10, {}, None),
        sweep_efficiency.TrialOutcome(1, "pruned", None, 2, {}, {"rule": "diverged"}),
        sweep_efficiency.TrialOutcome(2, "complete", 0.2, 10, {}, None),
    ])
    assert run.epochs == 22
    assert run.to_target(0.3) == 22 and run.to_target(0.1) is None
    assert run.best_of_first(2) == 0.5 and run.best_of_first(3) == 0.2
    assert run.best_within(12) == 0.5 and run.best_within(22) == 0.2


def test_an_extrapolation_prune_is_judged_against_the_kth_best_before_it() -> None:
    spec = sweep_efficiency.study_spec("digits", "tpe+convergence", 0, 6)  # extrapolation_top_k 3
    outcome = sweep_efficiency.TrialOutcome
    run = sweep_efficiency.Run("digits", "tpe+convergence", 0, spec, trials=[
        outcome(0, "complete", 0.5, 10, {}, None), outcome(1, "complete", 0.3, 10, {}, None),
        outcome(2, "pruned", None, 6, {}, {"rule": "extrapolation"}), outcome(3, "complete", 0.4, 10, {}, None),
        outcome(4, "complete", 0.1, 10, {}, None), outcome(5, "pruned", None, 6, {}, {"rule": "extrapolation"}),
    ])
    assert sweep_efficiency.kth_best_before(run, run.trials[2]) is None  # two completed before it: no 3rd best
    assert sweep_efficiency.kth_best_before(run, run.trials[5]) == 0.4  # 0.1, 0.3, 0.4


def test_epochs_to_target_compare_to_hyperband_even_where_it_never_gets_there() -> None:
    assert sweep_efficiency._ratio(60, 120) == 0.5
    assert sweep_efficiency._ratio(60, math.inf) == 0.0  # only the reference never reached the target
    assert sweep_efficiency._ratio(math.inf, 120) is None and sweep_efficiency._ratio(math.inf, math.inf) is None


def test_an_ablation_arm_is_the_default_pruner_less_one_part() -> None:
    default = sweep_efficiency.study_spec("digits", "tpe+convergence", 0, 3).pruner
    no_early = sweep_efficiency.study_spec("digits", "tpe+convergence-no-early-stop", 0, 3).pruner
    no_curve = sweep_efficiency.study_spec("digits", "tpe+convergence-no-extrapolation", 0, 3).pruner
    assert default.early_stop and default.extrapolation
    assert no_early == default.model_copy(update={"early_stop": False})
    assert no_curve == default.model_copy(update={"extrapolation": False})
    with pytest.raises(SystemExit):  # an unknown arm is refused before anything runs
        sweep_efficiency.main(["--arms", "tpe,tpe+nothing"])
