"""Learning-curve extrapolation (`studies.extrapolation`) and the pruning rule built on it: synthetic
curves whose end is known, the abstentions, the decision and its cost."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import tiny_spec
from converge.core.settings import Settings
from converge.service.api.app import create_app
from converge.studies.extrapolation import Abstain, Prediction, predict
from converge.studies.pruning import EXTRAPOLATION, extrapolation_rule, kth_best


def curve(f, epochs: int, noise: float = 0.0, seed: int = 0) -> dict[int, float]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    return {e: float(f(e + 1) + noise * rng.standard_normal()) for e in range(epochs)}


def power(x: float) -> float:
    return 0.3 + 2.0 * x ** -0.7


def test_a_power_law_is_predicted_near_its_end_with_a_tight_band() -> None:
    forecast = predict(curve(power, 10), 49)
    assert isinstance(forecast, Prediction) and forecast.epoch == 49
    assert abs(forecast.mean - power(50)) < 0.02 and forecast.std < 0.1


def test_a_drop_then_a_plateau_is_predicted_at_the_plateau() -> None:
    values = {0: 1.5, 1: 1.0, **{e: 0.8 for e in range(2, 12)}}
    forecast = predict(values, 49)
    assert isinstance(forecast, Prediction)
    assert abs(forecast.mean - 0.8) < 0.05


def test_noisy_curves_end_inside_their_band() -> None:
    """A power law with noise, twenty draws: the truth lies within two standard deviations nearly always."""
    inside = 0
    for seed in range(20):
        forecast = predict(curve(power, 12, noise=0.02, seed=seed), 59)
        assert isinstance(forecast, Prediction)
        inside += abs(power(60) - forecast.mean) <= 2 * forecast.std
    assert inside >= 18


def test_an_accuracy_curve_rising_to_its_limit() -> None:
    forecast = predict(curve(lambda x: 0.95 - 0.5 * x ** -0.8, 10), 39)
    assert isinstance(forecast, Prediction) and abs(forecast.mean - (0.95 - 0.5 * 40 ** -0.8)) < 0.03


@pytest.mark.parametrize(("values", "last", "why"), [
    ({e: 1.0 / (e + 1) for e in range(5)}, 40, "5 epochs so far"),  # too few points
    ({**{e: 1.0 / (e + 1) for e in range(8)}, 3: math.nan}, 40, "not finite"),
    ({**{e: 1.0 / (e + 1) for e in range(8)}, 5: math.inf}, 40, "not finite"),
    ({e: 2.0 - 0.001 * e for e in range(12)}, 49, "flat start"),  # a late drop's start: nothing to go on yet
    ({e: 0.7 for e in range(12)}, 49, "flat start"),
    # The panel's slow starter (seed 2, trial 17) after 10 of 40 epochs, 6% down from ln 4: it ended at 0.968.
    (dict(enumerate([1.396, 1.374, 1.371, 1.371, 1.327, 1.336, 1.319, 1.321, 1.306, 1.311])), 39, "flat start"),
    ({e: 1.0 / (e + 1) for e in range(10)}, 9, "last epoch"),
])
def test_the_extrapolation_abstains_and_says_why(values: dict[int, float], last: int, why: str) -> None:
    forecast = predict(values, last)
    assert isinstance(forecast, Abstain) and why in forecast.reason


def test_a_late_drop_once_under_way_is_not_called_hopeless() -> None:
    """A slow starter (flat, then a drop around epoch 20): once it has moved, the band still reaches its end."""
    def late(x: float) -> float:
        return 2.0 - 1.5 / (1.0 + math.exp(-(x - 20.0) / 2.0))

    forecast = predict(curve(late, 19), 49)
    assert isinstance(forecast, Prediction)
    assert forecast.probability_better_than(late(50) + 0.1, "minimize") > 0.05  # not pruned against a peer near it


# ---------------------------------------------------------------- the rule


def decide(values: dict[int, float], completed: list[float], direction: str = "minimize",
           **options: float) -> object:
    settings = {"top_k": 3, "probability": 0.95, "min_fraction": 0.25, **options}
    return extrapolation_rule(values, max(values), 50, lambda: completed, direction=direction, trial_number=7,
                              **settings)  # type: ignore[arg-type]


def test_a_trial_heading_well_above_the_third_best_is_pruned_and_says_where_it_was_heading() -> None:
    rule = decide(curve(lambda x: 1.0 + 2.0 * x ** -0.7, 15), [0.40, 0.45, 0.50, 0.9])
    assert rule is not None and rule.rule == EXTRAPOLATION and rule.epoch == 14
    assert rule.reason.startswith("predicted 1.") and "at epoch 49; 3rd best is 0.5" in rule.reason


def test_a_trial_that_may_still_beat_the_kth_best_goes_on() -> None:
    assert decide(curve(power, 15), [0.40, 0.45, 0.50]) is None  # heading to about 0.42
    assert decide(curve(lambda x: 1.0 + 2.0 * x ** -0.7, 15), [0.4, 0.5]) is None  # fewer than k completed
    assert decide(curve(lambda x: 1.0 + 2.0 * x ** -0.7, 10), [0.4, 0.45, 0.5], min_fraction=0.5) is None  # early


def test_the_kth_best_skips_non_finite_values_and_reads_the_direction() -> None:
    values = [0.5, math.nan, 0.2, math.inf, 0.9, 0.4]
    assert kth_best(values, 1, "minimize") == 0.2 and kth_best(values, 3, "minimize") == 0.5
    assert kth_best(values, 1, "maximize") == 0.9 and kth_best(values, 3, "maximize") == 0.4
    assert kth_best(values, 5, "minimize") is None  # four finite values


def test_maximising_reads_the_other_way() -> None:
    rising = curve(lambda x: 0.6 - 0.5 * x ** -0.8, 15)  # ends near 0.59
    assert decide(rising, [0.95, 0.93, 0.92], direction="maximize") is not None
    assert decide(rising, [0.5, 0.4, 0.3], direction="maximize") is None


def test_an_abstention_is_logged_for_debugging_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="converge.pruning"):
        assert decide({e: 0.7 for e in range(20)}, [0.1, 0.2, 0.3]) is None
    assert "trial 7, epoch 19: no extrapolation: the objective has moved less than 10%" in caplog.text


def test_a_decision_costs_under_two_milliseconds() -> None:
    values = curve(lambda x: 0.2 + x ** -0.5, 200, noise=0.01)
    completed = [0.1, 0.2, 0.3, 0.4]
    decide(values, completed)  # warm
    times = []
    for _ in range(30):
        started = time.perf_counter()
        decide(values, completed)
        times.append(time.perf_counter() - started)
    assert sorted(times)[len(times) // 2] < 0.002


# ---------------------------------------------------------------- the spec's options


@pytest.mark.parametrize(("options", "named"), [
    ({"extrapolation_probability": 1.0}, ["pruner.extrapolation_probability"]),
    ({"extrapolation_probability": 0.0}, ["pruner.extrapolation_probability"]),
    ({"extrapolation_top_k": 0}, ["pruner.extrapolation_top_k"]),
    ({"extrapolation_top_k": 0, "extrapolation_probability": 1.5},
     ["pruner.extrapolation_top_k", "pruner.extrapolation_probability"]),
])
def test_extrapolation_options_out_of_range_are_a_422_naming_each(settings: Settings, options: dict[str, float],
                                                                  named: list[str]) -> None:
    answer = TestClient(create_app(settings)).post("/v1/studies", json=tiny_spec("bad", pruner=options))
    assert answer.status_code == 422
    problems = answer.json()["problems"]
    assert len(problems) == len(named) and all(any(p.startswith(n) for p in problems) for n in named), problems


def test_extrapolation_options_belong_to_the_convergence_pruner(settings: Settings) -> None:
    spec = tiny_spec("bad", pruner={"name": "median", "extrapolation_top_k": 5})
    answer = TestClient(create_app(settings)).post("/v1/studies", json=spec)
    assert answer.status_code == 422 and "extrapolation_top_k" in answer.text
