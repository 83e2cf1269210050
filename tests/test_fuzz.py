"""Schemathesis against the API's own OpenAPI: every operation, with generated valid and invalid input.

The app runs on a fresh database (SQLite, then PostgreSQL) holding a study with trials of every state, metrics
with NaN and infinities, diagnoses, a rerun attempt and a worker, and an admin token that every generated case
sends. Each response is checked: no 5xx, a status code the operation documents, a documented content type and
headers, and a body that matches the documented schema (errors included: every error has a model).

The documented examples name the seeded study and its trial 7, so the examples phase reaches real data;
generated names and numbers mostly reach 404s and 422s. Hypothesis is derandomized (and keeps no example
database), so a run here is the run in CI. Nothing is excluded: no operation starts training (no worker runs
here; `POST /v1/studies` only queues a study).

Each bug this found has a plain regression test in tests/test_api.py.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import optuna
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from optuna.trial import TrialState, create_trial

from conftest import TINY_DISTRIBUTIONS, scratch_postgres, tiny_spec
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.db.migrate import upgrade
from converge.core.settings import Settings
from converge.service import auth
from converge.service.api.app import create_app
from converge.studies.retries import CRASHED, settle_dead_attempt
from converge.studies.storage import storage_for

SEEDED = "digits-mlp"  # the `name` example of every /v1/studies/{name} operation; trial 7 is the `number` one
MAX_EXAMPLES = 50  # generated cases per operation, besides the examples and coverage phases

CONFIG = {
    "seed": 6,
    # Derandomized, with no example database: every run generates the same cases. `too_slow` measures how long
    # generating takes, which depends on how busy the machine is, not on the API.
    "suppress-health-check": ["too_slow"],
    # Unknown query parameters are ignored, as HTTP APIs do (a cache-busting `?_=...` is no error): invalid
    # input is a documented parameter or body with a wrong value, not an extra parameter.
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none",
                   "allow-extra-parameters": False},
    "checks": {
        "enabled": False,
        "not_a_server_error": {"enabled": True},
        "status_code_conformance": {"enabled": True},
        "content_type_conformance": {"enabled": True},
        "response_headers_conformance": {"enabled": True},
        "response_schema_conformance": {"enabled": True},
        "negative_data_rejection": {"enabled": True},  # input the schema calls invalid is a 4xx
    },
}
# The OpenAPI document does not depend on the database: loaded once, here, for pytest to make one test per
# operation; each test sends its cases to the fixture's app.
schema = schemathesis.openapi.from_dict(create_app(Settings(database_url="sqlite://"), dashboard=False).openapi(),
                                        config=schemathesis.Config.from_dict(CONFIG))

# (state, value, latest verdict or None): trial 7 is an ended, diverged trial that POST .../repair can repair.
TRIALS = [
    (TrialState.COMPLETE, 0.5, "converged"),
    (TrialState.COMPLETE, 0.2, "still_improving"),
    (TrialState.PRUNED, 0.01, "diverged"),
    (TrialState.FAIL, None, "oscillating"),
    (TrialState.COMPLETE, 0.9, "overfitting"),
    (TrialState.RUNNING, None, "still_improving"),  # its process "dies": failed and rerun as trial 10
    (TrialState.WAITING, None, None),
    (TrialState.COMPLETE, math.inf, "diverged"),
    (TrialState.COMPLETE, -1.0, "converged"),
    (TrialState.PRUNED, 3.0, "underfitting"),
]


def _diagnosis(verdict: str) -> dict[str, Any]:
    healthy = verdict in ("converged", "still_improving")
    remedies = [] if healthy else [{"param": "lr", "action": "decrease", "factor": 0.1, "reason": "made up"}]
    return {"verdict": verdict, "healthy": healthy, "onset_epoch": None if healthy else 1, "confidence": 0.8,
            "findings": [{"kind": verdict, "epoch": 1, "evidence": "made up for the test"}], "remedies": remedies,
            "summary": f"{verdict} (made up)"}


def _seed(client: TestClient, settings: Settings) -> None:
    """The seeded study and its trials (through Optuna and Converge's repository, no training), a second
    queued study, and a worker running trial 1."""
    for name in (SEEDED, "to-cancel"):
        assert client.post("/v1/studies", json=tiny_spec(name, n_trials=40)).status_code == 201
    study = optuna.load_study(study_name=SEEDED, storage=storage_for(settings))
    study.add_trials([
        create_trial(state=state, value=value if state in (TrialState.COMPLETE, TrialState.PRUNED) else None,
                     params={"lr": 1e-3 * (1 + i), "batch_size": (64, 128)[i % 2], "epochs": 2 + i % 2,
                             "weight_decay": 1e-4, "dropout": 0.0},
                     distributions=TINY_DISTRIBUTIONS,
                     user_attrs={"error": "RuntimeError: boom"} if state == TrialState.FAIL else {},
                     intermediate_values={0: 1.0, 1: value} if value is not None else {})
        for i, (state, value, _) in enumerate(TRIALS)])
    trials = study.get_trials(deepcopy=False)
    engine = get_engine(settings.database_url)
    with session_scope(engine) as session:
        study_id = repo.get_study(session, SEEDED).id
        for trial, (state, _, verdict) in zip(trials, TRIALS):
            if verdict is None:
                continue
            for epoch in range(2):
                repo.record_epoch(session, study_id, trial._trial_id, trial.number,
                                  {"epoch": epoch, "train_loss": 2.0 - epoch, "val_loss": 1.5 if epoch else math.nan,
                                   "val_acc": 0.5, "grad_norm": math.inf if epoch else 1.0, "param_norm": 3.0,
                                   "lr": 0.01, "epoch_seconds": 0.1})
            repo.save_diagnosis(session, study_id, trial._trial_id, trial.number, 1, _diagnosis(verdict),
                                final=state != TrialState.RUNNING)
        repo.register_worker(session, "fuzz-host-1-abc123", "fuzz-host", 1, "cpu", 2)
        repo.heartbeat_worker(session, "fuzz-host-1-abc123",
                              [{"study": SEEDED, "trial_id": trials[1]._trial_id, "device": "cpu", "slot": 1}])
    assert settle_dead_attempt(storage_for(settings), engine, SEEDED, trials[5]._trial_id, CRASHED,
                               "trial process died (exit code -9)") == len(TRIALS)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, str]]:
    """The app on a fresh, seeded database of each kind, and an admin token."""
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'converge.db'}"
        else:
            url = stack.enter_context(scratch_postgres(request.getfixturevalue("postgres_admin"), "converge_fuzz"))
        stack.callback(lambda: get_engine(url).dispose())
        upgrade(url)
        settings = Settings(database_url=url)
        app = create_app(settings)
        _seed(TestClient(app), settings)
        token, _ = auth.create_token(get_engine(url), "admin", "fuzz")
        yield app, token


@pytest.mark.slow
@schema.parametrize()
def test_every_operation_answers_as_documented(case: schemathesis.Case, served: tuple[FastAPI, str]) -> None:
    app, token = served
    if case.operation.path == "/v1/studies/{name}/cancel" and case.path_parameters == {"name": SEEDED}:
        # The operations run in the order the app declares them, cancel before repair: cancelling the seeded
        # study (the documented example) would turn every repair after it into a 409. Cancel another one.
        case.path_parameters["name"] = "to-cancel"
    case.call_and_validate(app=app, headers={"Authorization": f"Bearer {token}"})
