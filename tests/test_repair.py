"""Repairing an unhealthy trial: the remedy applied within the search space, the links, the refusals."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from test_cli import converge

from conftest import tiny_spec
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.settings import Settings
from converge.service.api.app import create_app
from converge.studies.lifecycle import submit_study
from converge.studies.repair import auto_repair, first_applicable_remedy
from converge.studies.spec import SearchSpace, StudySpec, parse_spec
from converge.studies.storage import storage_for
from converge.studies.sweep import run_sweep

LR_DOWN = {"param": "lr", "action": "decrease", "factor": 0.1, "reason": "the loss blew up"}
DIVERGED = {"verdict": "diverged", "healthy": False, "confidence": 0.95, "onset_epoch": 1,
            "findings": [], "remedies": [LR_DOWN], "summary": "diverged"}
CONVERGED = {**DIVERGED, "verdict": "converged", "healthy": True, "remedies": []}


@pytest.fixture
def client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings))


def _ended_trial(settings: Settings, name: str, diagnosis: dict[str, Any] | None, *, lr: float = 0.05,
                 finish: bool = True, fixed_lr: bool = False) -> None:
    """A one-trial study whose trial 0 ran with `lr` and, given a `diagnosis`, was diagnosed so."""
    spec = tiny_spec(name, n_trials=1)
    if fixed_lr:
        spec["search_space"]["lr"] = {"value": lr}
    submit_study(settings, StudySpec.model_validate(spec))
    study = optuna.load_study(study_name=name, storage=storage_for(settings))
    engine = get_engine(settings.database_url)
    with session_scope(engine) as session:
        study_id = repo.claim_trial_slot(session, name).study_id
    distribution = (optuna.distributions.CategoricalDistribution([lr]) if fixed_lr
                    else optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True))
    study.enqueue_trial({"lr": lr})
    trial = study.ask({"lr": distribution})
    assert trial.params == {"lr": lr}
    if finish:
        study.tell(trial, 0.5)
    if diagnosis is not None:
        with session_scope(engine) as session:
            repo.save_diagnosis(session, study_id, trial._trial_id, 0, 2, diagnosis, final=finish)
    if finish:
        with session_scope(engine) as session:
            repo.finish_study_if_complete(session, study_id)


def test_a_diverged_trial_is_queued_again_with_its_remedy_and_linked_both_ways(
        settings: Settings, client: TestClient) -> None:
    _ended_trial(settings, "fix", DIVERGED, lr=0.05)
    assert client.get("/v1/studies/fix").json()["state"] == "done"

    response = client.post("/v1/studies/fix/trials/0/repair")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["trial"] == 0 and body["repair_trial"] == 1 and body["remedy"]["param"] == "lr"
    assert body["params"]["lr"] == pytest.approx(0.005) and body["automatic"] is False

    study = client.get("/v1/studies/fix").json()
    assert study["state"] == "running" and study["n_trials"] == 2  # room for the repair: a worker runs it
    trials = client.get("/v1/studies/fix/trials").json()["trials"]
    assert trials[0]["repaired_as"] == 1 and trials[1]["repair_of"] == 0
    assert trials[1]["state"] == "waiting" and trials[1]["params"]["lr"] == pytest.approx(0.005)
    repair = client.get("/v1/studies/fix/trials/0/diagnosis").json()["repair"]
    assert repair["repair_trial"] == 1 and repair["state"] == "waiting" and repair["verdict"] is None

    again = client.post("/v1/studies/fix/trials/0/repair")
    assert again.status_code == 409 and "already repaired as trial 1" in again.json()["detail"]


@pytest.mark.parametrize(("case", "problem"), [
    ("healthy", "is healthy (converged): nothing to repair"),
    ("running", "is running: repair it once it has ended"),
    ("undiagnosed", "has no diagnosis"),
    ("fixed", "has no remedy that changes a hyperparameter within the study's search space"),
])
def test_a_trial_that_cannot_be_repaired_is_a_409_with_the_reason(
        settings: Settings, client: TestClient, case: str, problem: str) -> None:
    diagnosis = {"healthy": CONVERGED, "undiagnosed": None}.get(case, DIVERGED)
    _ended_trial(settings, "no", diagnosis, finish=case != "running", fixed_lr=case == "fixed")
    response = client.post("/v1/studies/no/trials/0/repair")
    assert response.status_code == 409 and problem in response.json()["detail"], response.text
    assert client.get("/v1/studies/no/trials").json()["total"] == 1  # nothing was queued


def test_a_cancelled_studys_trials_are_not_repaired(settings: Settings, client: TestClient) -> None:
    _ended_trial(settings, "stopped", DIVERGED, finish=False)
    client.post("/v1/studies/stopped/cancel")
    optuna.load_study(study_name="stopped", storage=storage_for(settings)).tell(0, state=optuna.trial.TrialState.FAIL)
    response = client.post("/v1/studies/stopped/trials/0/repair")
    assert response.status_code == 409 and "was cancelled" in response.json()["detail"]


def test_converge_repair_prints_the_change_or_the_reason(settings: Settings) -> None:
    _ended_trial(settings, "by-cli", DIVERGED, lr=0.05)
    done = converge(settings.database_url, "repair", "by-cli", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "trial 0 of 'by-cli': lr decrease ×0.1 → lr = 0.005; queued as trial 1"
    again = converge(settings.database_url, "repair", "by-cli", "0")
    assert again.returncode == 1 and again.stderr.strip() == "converge: trial 0 was already repaired as trial 1"


def test_an_unknown_study_or_trial_is_a_404(settings: Settings, client: TestClient) -> None:
    _ended_trial(settings, "known", DIVERGED)
    assert client.post("/v1/studies/nope/trials/0/repair").status_code == 404
    assert client.post("/v1/studies/known/trials/7/repair").status_code == 404


def test_remedies_are_kept_inside_the_search_space() -> None:
    space = SearchSpace.model_validate({"lr": {"low": 1e-3, "high": 1e-1, "log": True},
                                        "batch_size": {"choices": [16, 64, 256]}, "dropout": 0.0})
    params = {"lr": 2e-3, "batch_size": 64, "dropout": 0.0, "epochs": 10, "weight_decay": 1e-4}
    remedy, fixed = first_applicable_remedy([LR_DOWN], params, space)
    assert remedy == LR_DOWN and fixed["lr"] == pytest.approx(1e-3)  # clipped to the range's low end
    at_edge = {**params, "lr": 1e-3}
    bigger = {"param": "batch_size", "action": "increase", "factor": 2, "reason": "noisy"}
    remedy, fixed = first_applicable_remedy([LR_DOWN, bigger], at_edge, space)
    assert remedy == bigger and fixed["batch_size"] == 256  # lr cannot go lower: the next remedy, next choice up
    dropout_up = {"param": "dropout", "action": "increase", "factor": 2, "reason": "overfit"}
    clip = {"param": "gradient_clip", "action": "enable", "value": 1.0, "reason": "spikes"}
    assert first_applicable_remedy([dropout_up, clip], params, space) == (None, params)  # fixed, not a parameter


@pytest.mark.slow
def test_a_repaired_diverging_trial_runs_and_its_origin_reports_the_outcome(
        settings: Settings, client: TestClient) -> None:
    spec = tiny_spec("blowup", n_trials=1)
    spec["search_space"].update(lr={"low": 1e-3, "high": 1e6, "log": True}, epochs=3)
    submit_study(settings, parse_spec(spec))
    optuna.load_study(study_name="blowup", storage=storage_for(settings)).enqueue_trial({"lr": 1e5})
    run_sweep(settings, parse_spec(spec), progress=False)
    origin = client.get("/v1/studies/blowup/trials/0/diagnosis").json()
    assert origin["healthy"] is False and origin["repair"] is None

    assert client.post("/v1/studies/blowup/trials/0/repair").status_code == 201
    assert run_sweep(settings, parse_spec(spec), progress=False) in ("done", "failed")
    repair = client.get("/v1/studies/blowup/trials/0/diagnosis").json()["repair"]
    assert repair["repair_trial"] == 1 and repair["state"] in ("complete", "pruned", "failed")
    assert repair["verdict"] is not None and repair["healthy"] in (True, False)
    assert repair["params"]["lr"] < 1e5


def test_auto_repair_is_capped_per_study_by_one_conditional_update(settings: Settings) -> None:
    submit_study(settings, parse_spec(tiny_spec("capped", auto_repair={"max": 2})))
    with session_scope(get_engine(settings.database_url)) as session:
        study_id = repo.get_study(session, "capped").id
    taken = []
    for _ in range(3):
        with session_scope(get_engine(settings.database_url)) as session:
            taken.append(repo.reserve_auto_repair(session, study_id, 2))
    assert taken == [True, True, False]


def test_auto_repair_must_allow_at_least_one_repair() -> None:
    with pytest.raises(ValueError, match="auto_repair.max"):
        parse_spec(tiny_spec("zero", auto_repair={"max": 0}))
    assert parse_spec(tiny_spec("off")).auto_repair is None


def test_auto_repair_leaves_trials_the_base_pruner_stopped(settings: Settings) -> None:
    spec = parse_spec(tiny_spec("base-pruned", auto_repair={"max": 5}))
    by_hyperband = optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params={}, distributions={},
                                             user_attrs={"converge_pruned_by": {"rule": "hyperband", "epoch": 1}})
    interrupted = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={}, distributions={},
                                            user_attrs={"error": "TrialInterrupted: the worker stopped"})
    assert auto_repair(settings, spec, by_hyperband) is None
    assert auto_repair(settings, spec, interrupted) is None


@pytest.mark.slow
def test_auto_repair_repairs_unhealthy_trials_up_to_its_max(settings: Settings, client: TestClient) -> None:
    spec = tiny_spec("auto", n_trials=3, auto_repair={"max": 2})
    spec["search_space"].update(lr={"low": 1e-3, "high": 1e6, "log": True}, epochs=2)
    submit_study(settings, parse_spec(spec))
    study = optuna.load_study(study_name="auto", storage=storage_for(settings))
    for lr in (1e5, 2e5, 3e5):  # three trials that blow up at once
        study.enqueue_trial({"lr": lr})
    assert run_sweep(settings, parse_spec(spec), progress=False) == "done"

    body = client.get("/v1/studies/auto").json()
    assert body["n_trials"] == 5  # three trials and two automatic repairs: the cap
    trials = client.get("/v1/studies/auto/trials").json()["trials"]
    repaired = [t for t in trials if t["repaired_as"] is not None]
    assert [t["number"] for t in repaired] == [0, 1]  # the first two; the third found the cap taken
    for origin in repaired:
        repair = client.get(f"/v1/studies/auto/trials/{origin['number']}/diagnosis").json()["repair"]
        assert repair["automatic"] is True and repair["params"]["lr"] < origin["params"]["lr"]
        assert repair["state"] in ("complete", "pruned", "failed")
    assert len(trials) == 5 and all(t["state"] in ("complete", "pruned", "failed") for t in trials)
