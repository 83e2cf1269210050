"""A study's diagnosis: regions that explain unhealthy verdicts, importance, the next sweep's spec."""

from __future__ import annotations

import math
import random
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from test_cli import converge

from conftest import tiny_spec
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.settings import Settings
from converge.service.api.app import create_app
from converge.service.schemas import STUDY_DIAGNOSIS_EXAMPLE, StudyDiagnosisOut
from converge.studies.diagnosis import HEALTHY_VERDICTS, UNHEALTHY_VERDICTS, VERDICTS
from converge.studies.spec import FloatFixed, FloatRange, IntChoices, IntFixed, IntRange, StudySpec, parse_spec
from converge.studies.storage import storage_for
from converge.studies.study_diagnosis import (
    MIN_IMPORTANCE_TRIALS,
    TrialRecord,
    chance_of_region,
    diagnose_study,
    find_regions,
    next_name,
    param_importance,
    recommend,
    roundest_between,
)
from converge.studies.sweep import run_sweep

SPEC = parse_spec({"name": "synthetic"})  # the default search space: lr 1e-05..1 (log), batch_size choices, ...


def _params(rng: random.Random, lr: float) -> dict[str, Any]:
    return {"lr": lr, "batch_size": rng.choice([16, 32, 64, 128, 256]), "epochs": rng.randint(5, 50),
            "weight_decay": 10 ** rng.uniform(-6, -1), "dropout": rng.uniform(0.0, 0.7)}


def diverging_study(seed: int = 0) -> list[TrialRecord]:
    """30 trials: 9 of the 10 with lr > 0.2 diverged (failed), one converged; the best ones sit near lr 3e-3."""
    rng = random.Random(seed)
    safe = [10 ** rng.uniform(-5, math.log10(0.15)) for _ in range(20)]
    risky = [10 ** rng.uniform(math.log10(0.25), 0) for _ in range(10)]
    trials = []
    for number, lr in enumerate(safe + risky):
        if lr > 0.2 and number != 29:
            trials.append(TrialRecord(number, "failed", _params(rng, lr), None, "diverged"))
        else:
            loss = (math.log10(lr) + 2.5) ** 2 + rng.uniform(0, 0.05)
            trials.append(TrialRecord(number, "complete", _params(rng, lr), loss, rng.choice(HEALTHY_VERDICTS)))
    return trials


# ---------------------------------------------------------------- regions


def test_a_study_where_high_learning_rates_diverge_gets_that_region_with_its_counts() -> None:
    regions = find_regions(SPEC.search_space, diverging_study())
    assert [(r.verdict, r.param, r.op, r.threshold) for r in regions] == [("diverged", "lr", ">", 0.2)]
    (region,) = regions
    assert (region.matching, region.with_verdict, region.precision) == (10, 9, 0.9)
    assert region.text == "lr > 0.2: 9 of 10 trials unhealthy: diverged 9"
    assert region.verdicts == {"diverged": 9}


def _unhealthy_above(lrs_bad: list[tuple[float, str]], safe: int = 18, safe_verdicts: tuple[str, ...] = ("converged",),
                     ) -> list[TrialRecord]:
    """`safe` trials at lr 1e-05..0.25 (their verdicts in turn from `safe_verdicts`), then the given
    (lr, verdict) ones; the other params cycle so that none of them sorts the verdicts."""
    lrs = [(10 ** (-5 + k * (math.log10(0.25) + 5) / (safe - 1)), safe_verdicts[k % len(safe_verdicts)])
           for k in range(safe)] + lrs_bad
    trials = []
    for n, (lr, verdict) in enumerate(lrs):
        params = {"lr": lr, "batch_size": [16, 32, 64, 128, 256][n % 5], "epochs": 5 + 7 * n % 46,
                  "weight_decay": 10 ** (-6 + 5 * (5 * n % 24) / 24), "dropout": 0.7 * (11 * n % 24) / 24}
        if verdict == "diverged":
            trials.append(TrialRecord(n, "failed", params, None, verdict))
        else:
            trials.append(TrialRecord(n, "complete", params, (math.log10(lr) + 2.5) ** 2, verdict))
    return trials


SPLIT_ABOVE = [(0.35, "diverged"), (0.42, "oscillating"), (0.5, "diverged"), (0.61, "underfitting"),
               (0.75, "oscillating"), (0.9, "diverged")]


def test_unhealthy_trials_split_among_verdicts_make_one_region_that_names_each_with_its_count() -> None:
    """Each verdict apart is too few above lr 0.3 (3, 2 and 1 of 6): only the group explains them."""
    trials = _unhealthy_above(SPLIT_ABOVE)
    regions = find_regions(SPEC.search_space, trials)
    assert [r.text for r in regions] == ["lr > 0.3: 6 of 6 trials unhealthy: diverged 3, oscillating 2, underfitting 1"]
    (region,) = regions
    assert (region.verdict, region.param, region.op, region.threshold) == ("diverged", "lr", ">", 0.3)
    assert (region.matching, region.with_verdict, region.precision) == (6, 6, 1.0)
    assert region.verdicts == {"diverged": 3, "oscillating": 2, "underfitting": 1}

    recommendation = recommend(SPEC, trials, regions)  # the next sweep stays below the grouped region
    assert recommendation.changes[0].startswith("lr: 1e-05..1 → ")
    assert recommendation.changes[0].endswith(", avoiding lr > 0.3 (diverged, oscillating, underfitting)")
    assert parse_spec(recommendation.spec).search_space.lr.high <= 0.3

    served = StudyDiagnosisOut.model_validate({**diagnose_study(SPEC, trials).to_dict(), "rerun_attempts": 0})
    assert [(r.verdict, r.with_verdict, r.text) for r in served.regions] == [("diverged", 6, region.text)]


def test_a_verdict_the_other_unhealthy_ones_hide_still_gets_its_region() -> None:
    """Half the trials below lr 0.25 oscillate, so the unhealthy share above 0.3 hardly stands out
    (chance could make it); the diverged share there does."""
    trials = _unhealthy_above([(lr, "diverged") for lr in (0.35, 0.42, 0.5, 0.61, 0.75, 0.9)], safe=24,
                              safe_verdicts=("converged", "oscillating"))
    regions = find_regions(SPEC.search_space, trials)
    assert [r.text for r in regions] == ["lr > 0.3: 6 of 6 trials unhealthy: diverged 6"]


def test_unhealthy_trials_at_both_ends_of_a_range_get_a_region_each() -> None:
    """Low learning rates underfit (or converge slowly), high ones diverge (or oscillate)."""
    low = ("underfitting", "slow_convergence", "underfitting", "underfitting", "slow_convergence", "underfitting")
    high = SPLIT_ABOVE[:3] + [(0.61, "diverged"), (0.75, "diverged"), (0.9, "oscillating")]
    trials = [t if t.number >= len(low) else TrialRecord(t.number, t.state, t.params, t.value, low[t.number])
              for t in _unhealthy_above(high, safe=30)]
    regions = find_regions(SPEC.search_space, trials)
    assert [r.text for r in regions] == [  # as good as each other: below first
        "lr < 6e-05: 6 of 6 trials unhealthy: underfitting 4, slow_convergence 2",
        "lr > 0.3: 6 of 6 trials unhealthy: diverged 4, oscillating 2"]
    lr = parse_spec(recommend(SPEC, trials, regions).spec).search_space.lr
    assert 6e-5 <= lr.low < lr.high <= 0.3


def test_integer_params_read_on_an_observed_value_and_running_trials_do_not_count() -> None:
    rng = random.Random(1)
    trials = [TrialRecord(n, "complete", _params(rng, 1e-3), 1.0, "converged") for n in range(24)]
    for n in range(6):  # the batch size 256 trials underfit
        trials[n] = TrialRecord(n, "pruned", {**trials[n].params, "batch_size": 256}, 2.0, "underfitting")
    trials = [t if t.verdict == "underfitting" or t.params["batch_size"] != 256
              else TrialRecord(t.number, t.state, {**t.params, "batch_size": 128}, t.value, t.verdict) for t in trials]
    running = [TrialRecord(100 + n, "running", {**trials[0].params, "batch_size": 16}, None, "underfitting")
               for n in range(5)]  # provisional: would make a "batch_size <= 16" region if they counted
    regions = find_regions(SPEC.search_space, trials + running)
    assert [r.text for r in regions] == ["batch_size >= 256: 6 of 6 trials unhealthy: underfitting 6"]
    assert diagnose_study(SPEC, trials + running).provisional == 5


def test_chance_alone_rarely_makes_a_region() -> None:
    rng = random.Random(2)
    with_regions = 0
    for _ in range(20):
        trials = [TrialRecord(n, "complete", _params(rng, 10 ** rng.uniform(-5, 0)), 1.0,
                              rng.choice(["converged", "converged", "diverged", "oscillating"])) for n in range(40)]
        with_regions += bool(find_regions(SPEC.search_space, trials))
    assert with_regions <= 1
    assert chance_of_region(total=40, with_verdict=10, matching=10, hits=10) == pytest.approx(1 / math.comb(40, 10))
    assert chance_of_region(total=40, with_verdict=10, matching=10, hits=0) == pytest.approx(1.0)


def test_thresholds_are_the_roundest_number_between_neighbours() -> None:
    assert roundest_between(0.2034, 0.2211) == 0.21
    assert roundest_between(0.15, 0.25) == 0.2
    assert roundest_between(1.1e-5, 3.7e-5) == 2e-5
    assert roundest_between(0.0, 0.05) == 0.01
    assert roundest_between(0.50213, 0.50218) == 0.50214


# ---------------------------------------------------------------- importance


def test_importance_needs_enough_completed_trials_and_says_why() -> None:
    few = diverging_study()[:MIN_IMPORTANCE_TRIALS - 1]
    importance = param_importance(SPEC, few)
    assert importance.importances is None and importance.trials_used == MIN_IMPORTANCE_TRIALS - 1
    assert importance.reason == f"needs {MIN_IMPORTANCE_TRIALS} completed trials with a finite value, has 9"
    fixed = parse_spec({"name": "fixed", "search_space": {"lr": 0.01, "batch_size": 32, "epochs": 5,
                                                          "weight_decay": 0.0, "dropout": 0.1}})
    assert param_importance(fixed, diverging_study()).reason == "every hyperparameter is fixed"


def test_importance_ranks_the_parameter_that_drives_the_objective_first() -> None:
    importance = param_importance(SPEC, diverging_study())
    assert importance.evaluator == "PedAnovaImportanceEvaluator" and importance.trials_used == 21
    assert list(importance.importances)[0] == "lr"
    assert set(importance.importances) == {"lr", "batch_size", "epochs", "weight_decay", "dropout"}
    assert sum(importance.importances.values()) == pytest.approx(1, abs=1e-3)


# ---------------------------------------------------------------- recommendation


def test_the_recommendation_moves_toward_the_best_trials_and_away_from_the_region() -> None:
    trials = diverging_study()
    recommendation = recommend(SPEC, trials, find_regions(SPEC.search_space, trials))
    spec = parse_spec(recommendation.spec)
    assert spec.name == "synthetic-next"
    lr = spec.search_space.lr
    assert isinstance(lr, FloatRange) and lr.log and 1e-5 <= lr.low < lr.high <= 0.2
    best = sorted((t for t in trials if t.value is not None), key=lambda t: t.value)[:6]
    assert all(lr.low <= t.params["lr"] <= lr.high for t in best)
    assert recommendation.changes[0] == f"lr: 1e-05..1 → {lr.low:.3g}..{lr.high:.3g}, avoiding lr > 0.2 (diverged)"
    assert {k: v for k, v in recommendation.spec.items() if k not in ("name", "search_space")} == \
        {k: v for k, v in SPEC.model_dump(mode="json").items() if k not in ("name", "search_space")}


def test_too_few_completed_trials_change_nothing_and_say_so() -> None:
    recommendation = recommend(SPEC, diverging_study()[:3], [])
    assert recommendation.spec["search_space"] == SPEC.model_dump(mode="json")["search_space"]
    assert recommendation.changes == ["no change: 4 completed trials with a finite value are needed to narrow "
                                      "the ranges"]


def test_the_next_name_keeps_to_the_name_rule() -> None:
    assert next_name("digits") == "digits-next"
    assert next_name("x" * 100) == "x" * 95 + "-next"


def _random_param(rng: random.Random, name: str) -> Any:
    """A parameter spec the validators accept, often at the edges (tiny ranges, zero, two choices)."""
    kind = rng.choice(["range", "range", "choices", "fixed"] if name in ("batch_size", "epochs")
                      else ["range", "range", "fixed"])
    if name in ("batch_size", "epochs"):
        if kind == "choices":
            return IntChoices(choices=rng.sample([1, 2, 3, 8, 16, 32, 64, 100, 128, 256, 512], rng.randint(1, 5)))
        if kind == "fixed":
            return IntFixed(value=rng.randint(1, 300))
        low = rng.choice([1, 2, 5, 16])
        return IntRange(low=low, high=low + rng.choice([1, 2, 3, 10, 200]), log=rng.random() < 0.4)
    bounds = {"lr": (1e-9, 10.0), "weight_decay": (0.0, 1.0), "dropout": (0.0, 0.999)}[name]
    if kind == "fixed":
        return FloatFixed(value=rng.uniform(max(bounds[0], 1e-9), bounds[1]))
    log = rng.random() < 0.5
    lowest = max(bounds[0], 1e-9) if log else bounds[0]
    low = rng.choice([lowest, rng.uniform(lowest, bounds[1] / 2)])
    high = rng.choice([bounds[1], low + (bounds[1] - low) * rng.choice([1e-6, 0.01, 0.5]), math.nextafter(low, 9)])
    return FloatRange(low=low, high=min(max(high, math.nextafter(low, 9)), bounds[1]), log=log)


def _random_value(rng: random.Random, p: Any) -> Any:
    if isinstance(p, (FloatFixed, IntFixed)):
        return p.value
    if isinstance(p, IntChoices):
        return rng.choice(p.choices)
    if isinstance(p, IntRange):
        return rng.randint(p.low, p.high)
    if p.log:
        return 10 ** rng.uniform(math.log10(p.low), math.log10(p.high))
    return rng.uniform(p.low, p.high)


def _random_study(rng: random.Random, index: int) -> tuple[StudySpec, list[TrialRecord]]:
    space = {name: _random_param(rng, name) for name in ("lr", "batch_size", "epochs", "weight_decay", "dropout")}
    name = rng.choice(["s", "study.one", "x" * 100, "a-b_c"]) + str(index)
    spec = parse_spec({"name": name[:100], "search_space": {k: v.model_dump() for k, v in space.items()},
                       "objective": {"metric": "val_acc", "direction": rng.choice(["minimize", "maximize"])}})
    driver, cut = rng.choice(list(space)), rng.random()
    trials = []
    for number in range(rng.choice([0, 1, 3, 5, 12, 40, 120])):
        params = {k: _random_value(rng, p) for k, p in spec.search_space}
        ordered = sorted(getattr(spec.search_space, driver).values())
        unhealthy = params[driver] >= ordered[0] + cut * (ordered[-1] - ordered[0])  # some studies get regions
        verdict = rng.choice(UNHEALTHY_VERDICTS[:3]) if unhealthy and rng.random() < 0.9 else rng.choice(VERDICTS)
        state = rng.choice(["complete", "complete", "pruned", "failed", "running", "waiting"])
        value = rng.choice([rng.uniform(-1, 3), rng.uniform(0, 1), math.nan, None]) if state != "waiting" else None
        trials.append(TrialRecord(number, state, params, value, None if state == "waiting" else verdict))
    return spec, trials


def test_every_recommendation_of_many_random_studies_is_a_valid_narrower_spec() -> None:
    rng = random.Random(20240611)
    with_changes = 0
    for index in range(150):
        spec, trials = _random_study(rng, index)
        recommendation = diagnose_study(spec, trials).recommendation
        parsed = parse_spec(recommendation.spec)  # raises on anything POST /v1/studies would refuse
        assert parsed.name == next_name(spec.name) and len(parsed.name) <= 100
        assert recommendation.changes and all(isinstance(c, str) for c in recommendation.changes)
        with_changes += not recommendation.changes[0].startswith("no change")
        for name, new in parsed.search_space:
            old = getattr(spec.search_space, name)
            assert type(new) is type(old), (index, name)
            if isinstance(old, (FloatFixed, IntFixed)):
                assert new == old
            elif isinstance(old, IntChoices):
                assert len(set(new.choices)) == len(new.choices) >= min(2, len(old.choices))
                assert set(new.choices) <= set(old.choices)
            else:
                assert old.low <= new.low < new.high <= old.high, (index, name, old, new)
                assert new.log == old.log and (not new.log or new.low > 0)
    assert with_changes >= 30  # the property is not met by changing nothing


# ---------------------------------------------------------------- through the API and the CLI


@pytest.fixture
def client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings))


def _diagnosed_trials(settings: Settings, name: str, lrs: list[float], diverge_above: float) -> None:
    """Ended trials of a submitted study, diagnosed diverged above `diverge_above` and converged below it."""
    study = optuna.load_study(study_name=name, storage=storage_for(settings))
    distributions = {"lr": FloatDistribution(1e-3, 1e-1, log=True), "batch_size": CategoricalDistribution([64, 128]),
                     "epochs": IntDistribution(2, 3)}
    for number, lr in enumerate(lrs):
        params = {"lr": lr, "batch_size": (64, 128)[number % 2], "epochs": 2 + number % 3 // 2}
        diverged = lr > diverge_above
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions, state=TrialState.FAIL if diverged else TrialState.COMPLETE,
            value=None if diverged else abs(math.log10(lr) + 2)))
    with session_scope(get_engine(settings.database_url)) as session:
        study_id = repo.get_study(session, name).id
        for trial in study.get_trials(deepcopy=False):
            verdict = "converged" if trial.state == TrialState.COMPLETE else "diverged"
            repo.save_diagnosis(session, study_id, trial._trial_id, trial.number, 1,
                                {"verdict": verdict, "healthy": verdict == "converged", "onset_epoch": None,
                                 "confidence": 0.9, "findings": [], "remedies": [], "summary": verdict},
                                final=True)


def test_the_diagnosis_of_stored_trials_counts_verdicts_and_finds_the_region(
        settings: Settings, client: TestClient) -> None:
    assert client.post("/v1/studies", json=tiny_spec("stored", n_trials=20)).status_code == 201
    lrs = [10 ** (-3 + 2 * i / 19) for i in range(20)]  # 1e-3 .. 1e-1, the top 5 above 0.03 diverge
    _diagnosed_trials(settings, "stored", lrs, diverge_above=0.03)
    optuna.load_study(study_name="stored", storage=storage_for(settings)).ask()  # running, no diagnosis yet

    response = client.get("/v1/studies/stored/diagnosis")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["verdicts"] == {"converged": 15, "diverged": 5}
    assert (body["trials"], body["healthy"], body["undiagnosed"], body["provisional"], body["rerun_attempts"]) == \
        (21, 15, 1, 0, 0)
    assert [r["text"] for r in body["regions"]] == ["lr > 0.03: 5 of 5 trials unhealthy: diverged 5"]
    assert body["importance"]["importances"] is not None and body["importance"]["trials_used"] == 15
    assert body["recommendation"]["spec"]["search_space"]["lr"]["high"] <= 0.03


@pytest.mark.slow
def test_a_real_studys_recommended_spec_is_accepted_as_it_is(settings: Settings, client: TestClient) -> None:
    assert run_sweep(settings, parse_spec(tiny_spec("real", n_trials=4)), progress=False) == "done"
    response = client.get("/v1/studies/real/diagnosis")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"study", "trials", "verdicts", "healthy", "undiagnosed", "provisional", "rerun_attempts",
                         "regions", "importance", "recommendation"}
    assert body["study"] == "real" and body["trials"] == 4
    assert sum(body["verdicts"].values()) + body["undiagnosed"] == 4 and set(body["verdicts"]) <= set(VERDICTS)
    assert body["importance"]["importances"] is None and "needs 10 completed trials" in body["importance"]["reason"]
    recommended = body["recommendation"]["spec"]
    assert recommended["name"] == "real-next" and body["recommendation"]["changes"]
    created = client.post("/v1/studies", json=recommended)
    assert created.status_code == 201, created.text
    assert created.json()["spec"] == recommended


def test_the_documented_example_is_a_valid_response_with_a_spec_that_would_be_accepted() -> None:
    example = StudyDiagnosisOut.model_validate(STUDY_DIAGNOSIS_EXAMPLE)
    assert parse_spec(example.recommendation.spec).name == "digits-mlp-next"


def test_an_unknown_study_has_no_diagnosis(client: TestClient) -> None:
    response = client.get("/v1/studies/ghost/diagnosis")
    assert response.status_code == 404 and response.json() == {"detail": "no study named 'ghost'"}


def test_study_show_prints_the_study_diagnosis_after_the_verdict_table(settings: Settings,
                                                                       client: TestClient) -> None:
    assert client.post("/v1/studies", json=tiny_spec("shown", n_trials=20)).status_code == 201
    _diagnosed_trials(settings, "shown", [10 ** (-3 + 2 * i / 19) for i in range(20)], diverge_above=0.03)
    shown = converge(settings.database_url, "study", "show", "shown")
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert out.index("verdicts: ") < out.index("study diagnosis: 20 trials, 15 healthy, 0 undiagnosed")
    assert "  verdicts: converged 15, diverged 5" in out
    assert "    lr > 0.03: 5 of 5 trials unhealthy: diverged 5" in out
    assert "  importance (PedAnovaImportanceEvaluator, 15 trials): lr " in out
    assert "  next sweep:\n    lr: 0.001..0.1 → " in out and "avoiding lr > 0.03 (diverged)" in out
    assert "  recommended spec (`converge study create --spec FILE` takes it as it is):\n    name: shown-next\n" in out
