"""The convergence pruner: its rules on diagnoses, its spec, and a real sweep it prunes."""

from __future__ import annotations

from typing import Any

import optuna
import pytest

from conftest import tiny_spec
from converge.core.settings import Settings
from converge.studies.pruning import (
    PRUNED_BY_ATTR,
    STOPPED_EARLY_ATTR,
    behind_peers,
    best_until,
    came_back,
    diagnosis_rule,
    early_stop_rule,
    still_falling,
)
from converge.studies.registry import build_pruner
from converge.studies.spec import StudySpec, parse_spec
from converge.studies.storage import storage_for
from converge.studies.sweep import run_sweep


def _diagnosis(verdict: str, confidence: float = 0.9) -> dict[str, Any]:
    return {"verdict": verdict, "confidence": confidence, "summary": f"{verdict}, as told"}


def _rule(verdict: str, epochs_seen: int, confidence: float = 0.9, max_epochs: int = 10,
          behind: bool = True, falling: bool = False, back: bool = False) -> str | None:
    decision = diagnosis_rule(_diagnosis(verdict, confidence), epochs_seen - 1, epochs_seen, max_epochs,
                              min_fraction=0.5, min_confidence=0.8, behind_peers=lambda: behind,
                              still_falling=lambda: falling, came_back=lambda: back)
    return None if decision is None else decision.rule


@pytest.mark.parametrize("verdict", ["diverged", "exploding_gradients", "vanishing_gradients"])
def test_a_hopeless_trial_is_pruned_at_once_whatever_the_confidence(verdict: str) -> None:
    assert _rule(verdict, epochs_seen=1, confidence=0.3) == verdict


@pytest.mark.parametrize("verdict", ["slow_convergence", "underfitting", "oscillating"])
def test_a_poor_trial_is_pruned_only_when_confident_and_far_enough(verdict: str) -> None:
    assert _rule(verdict, epochs_seen=4) is None  # 4 of 10 < min_fraction 0.5
    assert _rule(verdict, epochs_seen=5, confidence=0.7) is None  # not confident enough
    assert _rule(verdict, epochs_seen=5) == verdict
    assert _rule(verdict, epochs_seen=5, behind=False) is None  # as good as its peers: the task, not the run


def test_a_diverged_trial_whose_loss_came_back_is_judged_as_a_poor_one() -> None:
    # The slow starter of benchmarks/sweep_efficiency.py: unscaled inputs blow the first epoch's training loss
    # up to 3-4x ln 4 at the learning rates that end best; it is back near ln 4 by epoch 2, and some such runs go
    # on to learn, others stay at chance. Diverged after 3 epochs of 40 is too early to say which.
    assert _rule("diverged", epochs_seen=3, back=True) is None  # before min_fraction
    assert _rule("diverged", epochs_seen=5, back=True, falling=True) is None
    assert _rule("diverged", epochs_seen=5, back=True, behind=False) is None
    assert _rule("diverged", epochs_seen=5, back=True, confidence=0.7) is None
    assert _rule("diverged", epochs_seen=5, back=True) == "diverged"
    assert _rule("exploding_gradients", epochs_seen=1, back=True) == "exploding_gradients"  # diverged only


def test_came_back_means_a_finite_latest_loss_under_the_first() -> None:
    assert came_back([4.7, 1.54, 1.41])  # the slow starter's training loss after a blown first epoch
    assert not came_back([1.383, 1.388, 1.39])  # creeping up
    assert not came_back([1.0, 3.0, 9.0]) and not came_back([1.0, 0.5, float("nan")])
    assert came_back([None, float("inf"), 2.0, 1.5])  # the first finite loss is the start
    assert not came_back([]) and not came_back([1.0])


@pytest.mark.parametrize("verdict", ["slow_convergence", "underfitting"])
def test_a_slow_trial_whose_loss_still_falls_fast_enough_goes_on(verdict: str) -> None:
    assert _rule(verdict, epochs_seen=5, falling=True) is None


def test_an_oscillating_trial_is_not_spared_by_its_slope() -> None:
    assert _rule("oscillating", epochs_seen=5, falling=True) == "oscillating"  # a swinging curve's slope is noise


def test_still_falling_rescales_the_early_rate_to_the_full_runs_last_fifth() -> None:
    steady = [1.0 - 0.012 * e for e in range(8)]  # 1.2% an epoch: 2.4% over the 2 epochs the diagnosis reads now
    assert still_falling(steady, max_epochs=30)  # ~6% over the 5 epochs of a 30-epoch run's last fifth
    assert not still_falling(steady, max_epochs=8)  # this is the whole run: 2.4%, below the 3% mark
    assert not still_falling([1.0, 0.999, 0.998, 0.998, 0.997, 0.997, 0.997, 0.996], max_epochs=30)  # flat
    assert not still_falling([0.5, 0.6, 0.7, 0.8], max_epochs=30)  # rising
    assert still_falling([1.0], max_epochs=30)  # one epoch: no rate yet, so no verdict either
    assert still_falling([1.0, None, 0.9, 0.85, 0.8], max_epochs=30)  # a missing epoch is skipped


def test_a_peers_value_by_an_epoch_is_its_best_so_far_in_the_studys_direction() -> None:
    values = {1: 0.9, 2: 0.5, 3: 0.7, 5: float("nan")}
    assert best_until(values, 3, "minimize") == 0.5 and best_until(values, 1, "minimize") == 0.9
    assert best_until(values, 10, "minimize") == 0.5  # stopped at epoch 3: counts with its best by then
    assert best_until(values, 3, "maximize") == 0.9
    assert best_until(values, 0, "minimize") is None and best_until({}, 3, "minimize") is None


def test_a_hopeless_trial_needs_no_peers() -> None:
    assert _rule("diverged", epochs_seen=1, behind=False) == "diverged"


def test_behind_peers_compares_with_the_median_at_the_same_epoch_in_the_studys_direction() -> None:
    peers = [0.5, 0.6, 0.7, 0.8]
    assert behind_peers(0.9, peers, "minimize") and not behind_peers(0.6, peers, "minimize")
    assert behind_peers(0.6, peers, "maximize") and not behind_peers(0.9, peers, "maximize")
    assert behind_peers(0.9, peers[:2], "minimize")  # two are enough: each is a peer's best by then
    assert not behind_peers(0.9, peers[:1], "minimize")  # too few peers to call anyone slow
    assert not behind_peers(0.9, [peers[0], float("nan")], "minimize")
    assert not behind_peers(None, peers, "minimize") and not behind_peers(float("nan"), peers, "minimize")


@pytest.mark.parametrize("verdict", ["converged", "still_improving", "overfitting"])
def test_other_verdicts_never_prune(verdict: str) -> None:
    assert _rule(verdict, epochs_seen=10, confidence=1.0) is None


def test_the_decision_says_what_and_when() -> None:
    decision = diagnosis_rule(_diagnosis("diverged"), 3, 4, 10, min_fraction=0.5, min_confidence=0.8)
    assert decision is not None and decision.as_attr() == {
        "rule": "diverged", "epoch": 3, "reason": "diverged (confidence 0.90): diverged, as told"}


def test_convergence_is_the_default_pruner_over_hyperband() -> None:
    pruner = StudySpec.model_validate({"name": "x"}).pruner
    assert (pruner.name, pruner.base) == ("convergence", "hyperband")
    assert (pruner.min_fraction, pruner.min_confidence, pruner.early_stop, pruner.early_stop_fraction) == (
        0.25, 0.9, True, 0.5)
    assert isinstance(build_pruner("convergence", 20), optuna.pruners.HyperbandPruner)
    assert isinstance(build_pruner("convergence", 20, "median"), optuna.pruners.MedianPruner)


@pytest.mark.parametrize(("pruner", "problem"), [
    ({"name": "median", "base": "sha"}, "only the convergence pruner takes these"),
    ({"name": "convergence", "base": "convergence"}, "unknown base pruner 'convergence'"),
    ({"name": "convergence", "min_fraction": 0}, "min_fraction"),
    ({"name": "convergence", "min_confidence": 1.5}, "min_confidence"),
    ({"name": "hyperband", "early_stop": False}, "only the convergence pruner takes these"),
    ({"name": "median", "early_stop_fraction": 0.3}, "only the convergence pruner takes these"),
    ({"name": "convergence", "early_stop_fraction": 1.5}, "early_stop_fraction"),
])
def test_bad_pruner_options_are_refused(pruner: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        StudySpec.model_validate({"name": "x", "pruner": pruner})


@pytest.mark.slow
def test_a_diverging_trial_is_pruned_by_its_diagnosis_at_its_first_epochs(settings: Settings) -> None:
    spec = tiny_spec("hopeless", n_trials=1, pruner={"name": "convergence"})
    spec["search_space"].update(lr=1e6, epochs=8)
    assert run_sweep(settings, parse_spec(spec), progress=False) == "done"
    (trial,) = optuna.load_study(study_name="hopeless", storage=storage_for(settings)).get_trials()
    assert trial.state.name == "PRUNED"
    pruned_by = trial.user_attrs[PRUNED_BY_ATTR]
    assert pruned_by["rule"] in ("diverged", "exploding_gradients") and pruned_by["epoch"] < 7
    assert "error" not in trial.user_attrs


@pytest.mark.slow
def test_a_healthy_trial_runs_to_its_end_under_the_convergence_pruner(settings: Settings) -> None:
    spec = tiny_spec("healthy", n_trials=1, pruner={"name": "convergence"})
    spec["search_space"].update(lr=1e-2, epochs=6)
    assert run_sweep(settings, parse_spec(spec), progress=False) == "done"
    (trial,) = optuna.load_study(study_name="healthy", storage=storage_for(settings)).get_trials()
    assert trial.state.name == "COMPLETE" and PRUNED_BY_ATTR not in trial.user_attrs


def test_the_objective_reads_its_peers_best_by_the_same_epoch_from_the_study() -> None:
    from converge.studies.objective import Objective

    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=0.5, intermediate_values={3: 0.5, 4: 0.5}))
    objective = Objective(parse_spec(tiny_spec("peers")), study_id=1, engine=None)  # type: ignore[arg-type]
    trial = study.ask()
    assert not objective._behind_peers(trial, 3, 0.9)  # one peer: too few
    study.add_trial(optuna.trial.create_trial(value=0.8, intermediate_values={1: 0.95, 2: 0.8}))  # stopped at 2
    assert objective._behind_peers(trial, 3, 0.9) and not objective._behind_peers(trial, 3, 0.6)  # median 0.65
    assert not objective._behind_peers(trial, 1, 0.99)  # by epoch 1 only one peer had a value


def _stop(verdict: str, epochs_seen: int, confidence: float = 0.9) -> str | None:
    decision = early_stop_rule(_diagnosis(verdict, confidence), epochs_seen - 1, epochs_seen, 10,
                               min_fraction=0.5, min_confidence=0.8)
    return None if decision is None else decision.rule


@pytest.mark.parametrize("verdict", ["converged", "overfitting"])
def test_a_trial_that_is_done_stops_early_when_confident_and_far_enough(verdict: str) -> None:
    assert _stop(verdict, epochs_seen=4) is None  # 4 of 10 < min_fraction 0.5: a plateau may be a pause
    assert _stop(verdict, epochs_seen=5, confidence=0.7) is None
    assert _stop(verdict, epochs_seen=5) == verdict


@pytest.mark.parametrize("verdict", ["still_improving", "oscillating", "slow_convergence", "diverged"])
def test_a_trial_that_is_not_done_never_stops_early(verdict: str) -> None:
    assert _stop(verdict, epochs_seen=10, confidence=1.0) is None


def _one_trial(settings: Settings, name: str, **pruner: Any) -> optuna.trial.FrozenTrial:
    """lr 0.02 for 40 epochs on the tiny MLP: best val_loss by epoch ~5, overfitting clearly after ~25."""
    spec = tiny_spec(name, n_trials=1, pruner={"name": "convergence", **pruner})
    spec["search_space"].update(lr=0.02, epochs=40, batch_size=64)
    assert run_sweep(settings, parse_spec(spec), progress=False) == "done"
    (trial,) = optuna.load_study(study_name=name, storage=storage_for(settings)).get_trials()
    return trial


@pytest.mark.slow
def test_an_overfitting_trial_completes_early_with_its_objective_at_that_epoch(settings: Settings) -> None:
    trial = _one_trial(settings, "done-early")
    stopped = trial.user_attrs[STOPPED_EARLY_ATTR]
    assert trial.state.name == "COMPLETE" and PRUNED_BY_ATTR not in trial.user_attrs
    assert stopped["rule"] in ("overfitting", "converged") and 20 <= stopped["epoch"] < 39
    assert max(trial.intermediate_values) == stopped["epoch"]
    assert trial.value == trial.intermediate_values[stopped["epoch"]]

    unstopped = _one_trial(settings, "all-epochs", early_stop=False)
    assert STOPPED_EARLY_ATTR not in unstopped.user_attrs and len(unstopped.intermediate_values) == 40
