"""The user's own LightningModules and data: spec form, dry run, metrics, sweeps, bad input,
kept checkpoints as artifacts (API and `converge study export-best`)."""

from __future__ import annotations

import io
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from conftest import CLI, REPO, converge_env, epoch_rows, start_worker
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.db.migrate import upgrade
from converge.core.settings import Settings
from converge.service.api.app import create_app
from converge.studies.checkpoints import CHECKPOINT_ATTR, artifact_dir
from converge.studies.lifecycle import submit_study
from converge.studies.plugin_check import PluginCheckError, check_task
from converge.studies.spec import SpecError, parse_spec
from converge.studies.storage import storage_for
from converge.studies.sweep import run_sweep

TESTS = Path(__file__).parent
P = "converge_test_plugins"


def plugin_spec(name: str, model: str = f"{P}:build_model", data: str = f"{P}:build_data", **overrides: Any) -> dict:
    spec: dict[str, Any] = {
        "name": name,
        "task": {"model": model, "data": data, "params": {"hidden": 8}},
        "objective": {"metric": "val_f1", "direction": "maximize"},
        "search_space": {"lr": {"low": 1e-3, "high": 3e-2, "log": True}, "batch_size": {"choices": [32, 64]},
                         "epochs": {"low": 2, "high": 3}, "weight_decay": 1e-4, "dropout": 0.0},
        "n_trials": 3,
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
    }
    spec.update(overrides)
    return spec


def _trials(settings: Settings, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage_for(settings)).get_trials(deepcopy=False)


@pytest.fixture
def art_settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(update={"artifact_dir": str(tmp_path / "artifacts")})


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    """SQLite only: for the tests that start processes (each imports torch), kept to one database for time."""
    url = f"sqlite:///{tmp_path}/converge.db"
    upgrade(url)
    return Settings(database_url=url, heartbeat_interval_s=1, grace_period_s=5, worker_poll_s=0.2,
                    artifact_dir=str(tmp_path / "artifacts"))


# ---------------------------------------------------------------- the spec (no torch)


def test_the_spec_takes_import_paths_and_checks_only_their_form() -> None:
    spec = parse_spec(plugin_spec("p", model="pkg.models:Net.build", data="pkg.data:build"))
    assert spec.task.is_plugin and spec.kept_checkpoints() == 1  # a model of your own keeps its best checkpoint
    assert parse_spec({"name": "b"}).kept_checkpoints() == 0  # a built-in keeps none unless asked
    assert parse_spec(plugin_spec("k", checkpoints={"keep": "top_k", "top_k": 2})).kept_checkpoints() == 2
    bad = [
        ({"task": {"model": "pkg.models:build"}}, "name the data factory too"),
        ({"task": {"data": "pkg.data:build"}}, "needs a model import path"),
        ({"task": {"model": "pkg/models.py:build", "data": "p:d"}}, "task.model: unknown model 'pkg/models.py:build'"),
        ({"task": {"model": "p:m", "data": "../etc:passwd"}}, "task.data: data '../etc:passwd' is not an import path"),
        ({"objective": {"metric": "val_f1"}}, "unknown objective metric 'val_f1' for a built-in model"),
        ({"objective": {"metric": "val f1"}, "task": {"model": "p:m", "data": "p:d"}}, "is not a metric name"),
    ]
    for fields, message in bad:
        with pytest.raises(SpecError, match=message):
            parse_spec({"name": "x", **fields})


# ---------------------------------------------------------------- the dry run and the metrics


@pytest.mark.parametrize(("model", "data", "cause"), [
    ("no_such_package.models:build", f"{P}:build_data",
     "task.model 'no_such_package.models:build' does not import: ModuleNotFoundError"),
    (f"{P}:no_such_factory", f"{P}:build_data", f"task.model '{P}:no_such_factory' does not import: AttributeError"),
    (f"{P}:raises", f"{P}:build_data", f"task.model '{P}:raises' raised RuntimeError: this factory needs a GPU"),
    (f"{P}:forgets_objective", f"{P}:build_data",
     f"task.model '{P}:forgets_objective' logs no 'val_f1', the objective metric (it logs: train_loss, val_acc)"),
    (f"{P}:build_model", f"{P}:build_model", f"task.data '{P}:build_model' raised TypeError"),
])
def test_the_dry_run_names_the_cause_and_the_path(model: str, data: str, cause: str) -> None:
    with pytest.raises(PluginCheckError) as caught:
        check_task(parse_spec(plugin_spec("dry", model=model, data=data, task={"model": model, "data": data})))
    assert cause in str(caught.value)


def test_a_dry_run_that_passes_reports_the_logged_metrics() -> None:
    outcome = check_task(parse_spec(plugin_spec("ok", data=f"{P}:build_datamodule",
                                                task={"model": f"{P}:build_model", "data": f"{P}:build_datamodule"})))
    assert {"train_loss", "val_loss", "val_acc", "val_f1"} <= set(outcome["metrics"])


def test_metrics_of_a_module_with_two_optimizers_and_a_scheduler() -> None:
    from converge.trainers import TrainConfig, fit

    config = TrainConfig(model=f"{P}:two_optimizers", data=f"{P}:build_datamodule", lr=0.2, batch_size=32, epochs=3,
                         device="cpu")
    epochs = fit(config).epochs
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert [e["lr"] for e in epochs] == pytest.approx([0.2, 0.1, 0.05])  # the StepLR on the first optimizer
    for e in epochs:
        assert math.isfinite(e["train_loss"]) and math.isfinite(e["val_loss"]) and e["val_acc"] is None
        assert e["grad_norm"] > 0 and e["param_norm"] > 0  # both optimizers' steps measured
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"]


# ---------------------------------------------------------------- sweeps


@pytest.mark.slow
def test_checkpoints_in_an_s3_bucket_are_kept_listed_and_downloaded(
        art_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """CONVERGE_ARTIFACT_S3_BUCKET: the same sweep keeps only the best checkpoint, in the bucket (moto's
    in-process S3), and the API lists and serves it from there."""
    import boto3
    from moto import mock_aws

    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    s3_settings = art_settings.model_copy(update={"artifact_s3_bucket": "converge-checkpoints"})
    with mock_aws():
        bucket = boto3.client("s3")
        bucket.create_bucket(Bucket="converge-checkpoints")
        assert run_sweep(s3_settings, parse_spec(plugin_spec("blobs-s3", n_trials=3)), progress=False) == "done"
        trials = _trials(s3_settings, "blobs-s3")
        best = max(trials, key=lambda t: t.value)
        (stored,) = bucket.list_objects_v2(Bucket="converge-checkpoints")["Contents"]  # the best one only
        assert stored["Key"] == best.user_attrs[CHECKPOINT_ATTR]
        assert not Path(art_settings.artifact_dir).exists()  # nothing on the local disk

        client = TestClient(create_app(s3_settings))
        listed = {t.number: client.get(f"/v1/studies/blobs-s3/trials/{t.number}/artifacts").json() for t in trials}
        assert [n for n, artifacts in listed.items() if artifacts] == [best.number]
        response = client.get(f"/v1/studies/blobs-s3/artifacts/{stored['Key']}")
        assert response.status_code == 200
        assert response.content == bucket.get_object(Bucket="converge-checkpoints", Key=stored["Key"])["Body"].read()
        checkpoint = torch.load(io.BytesIO(response.content), weights_only=False)
        assert checkpoint["converge"]["hyperparameters"]["lr"] == pytest.approx(best.params["lr"])


@pytest.mark.slow
def test_a_plugin_sweep_keeps_only_the_best_checkpoint_which_round_trips(art_settings: Settings) -> None:
    spec = parse_spec(plugin_spec("blobs", n_trials=4))
    assert run_sweep(art_settings, spec, progress=False) == "done"
    trials = _trials(art_settings, "blobs")
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    best = max(trials, key=lambda t: t.value)
    assert best.user_attrs["converge_last_metrics"]["val_f1"] == pytest.approx(best.value)
    with session_scope(get_engine(art_settings.database_url)) as session:
        study_id = repo.get_study(session, "blobs").id
        rows = epoch_rows(session, study_id, best.number)
        assert [r.epoch for r in rows] == list(range(best.params["epochs"]))
        assert all(r.grad_norm > 0 and r.lr > 0 and r.val_acc is not None for r in rows)
    # Only the best trial's checkpoint remains in the store.
    assert len(list(Path(art_settings.artifact_dir).iterdir())) == 1

    client = TestClient(create_app(art_settings))
    listed = {t.number: client.get(f"/v1/studies/blobs/trials/{t.number}/artifacts").json() for t in trials}
    assert [n for n, artifacts in listed.items() if artifacts] == [best.number]
    (artifact,) = listed[best.number]
    assert artifact["checkpoint"] and artifact["artifact_id"] == best.user_attrs[CHECKPOINT_ATTR]
    response = client.get(f"/v1/studies/blobs/artifacts/{artifact['artifact_id']}")
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"

    # Loaded again, the module gives the validation loss its trial recorded at its last epoch.
    checkpoint = torch.load(io.BytesIO(response.content), weights_only=False)
    from converge_test_plugins import build_data, build_model

    hyper = checkpoint["converge"]["hyperparameters"]
    module = build_model(lr=hyper["lr"], weight_decay=hyper["weight_decay"], dropout=hyper["dropout"], hidden=8)
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    _, val = build_data(hyper["batch_size"], checkpoint["converge"]["seed"])
    import pytorch_lightning as pl

    (validated,) = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        module, val, verbose=False)
    assert validated["val_loss"] == pytest.approx(rows[-1].val_loss, rel=1e-5)

    # 404s, and never a path outside the store.
    assert client.get("/v1/studies/blobs/artifacts/00000000-0000-0000-0000-000000000000").status_code == 404
    assert client.get(f"/v1/studies/nope/artifacts/{artifact['artifact_id']}").status_code == 404
    assert client.get("/v1/studies/blobs/artifacts/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)
    assert client.get("/v1/studies/blobs/trials/99/artifacts").status_code == 404


@pytest.mark.slow
def test_top_k_keeps_k_checkpoints_and_a_nan_objective_fails_the_trial_naming_the_path(art_settings: Settings) -> None:
    spec = parse_spec(plugin_spec("topk", n_trials=3, checkpoints={"keep": "top_k", "top_k": 2}))
    assert run_sweep(art_settings, spec, progress=False) == "done"
    kept = [t for t in _trials(art_settings, "topk") if CHECKPOINT_ATTR in t.user_attrs
            and (Path(art_settings.artifact_dir) / t.user_attrs[CHECKPOINT_ATTR]).exists()]
    ranked = sorted(_trials(art_settings, "topk"), key=lambda t: t.value, reverse=True)
    assert sorted(t.number for t in kept) == sorted(t.number for t in ranked[:2])

    diverging = parse_spec(plugin_spec("nan", model=f"{P}:diverges", n_trials=1,
                                       task={"model": f"{P}:diverges", "data": f"{P}:build_data"},
                                       objective={"metric": "val_loss"}))
    run_sweep(art_settings, diverging, progress=False)
    (trial,) = _trials(art_settings, "nan")
    assert trial.state == optuna.trial.TrialState.FAIL
    assert "val_loss became nan" in trial.user_attrs["error"] and f"'{P}:diverges'" in trial.user_attrs["error"]


@pytest.mark.slow
def test_a_worker_fails_bad_plugin_studies_with_the_cause_and_runs_the_good_one(sqlite_settings: Settings) -> None:
    """Unresolvable path, a raising factory, no objective logged: each study failed with its cause and
    path in `detail`, by the worker's dry run before any trial; the worker lives on and runs the good study."""
    bad = {
        # under an allowed prefix (CONVERGE_PLUGIN_MODULES, tests/conftest.py), so it gets as far as the import
        "missing": (f"{P}.nowhere:build", f"task.model '{P}.nowhere:build' does not import"),
        "raising": (f"{P}:raises", f"task.model '{P}:raises' raised RuntimeError: this factory needs a GPU"),
        "silent": (f"{P}:forgets_objective", f"task.model '{P}:forgets_objective' logs no 'val_f1'"),
    }
    for name, (model, _) in bad.items():
        submit_study(sqlite_settings, parse_spec(plugin_spec(name, task={"model": model, "data": f"{P}:build_data"})))
    submit_study(sqlite_settings, parse_spec(plugin_spec("good", n_trials=2)))
    worker = start_worker(sqlite_settings.database_url, "--exit-when-idle", PYTHONPATH=str(TESTS),
                          CONVERGE_ARTIFACT_DIR=sqlite_settings.artifact_dir)
    output, _ = worker.communicate(timeout=150)
    assert worker.returncode == 0, output
    with session_scope(get_engine(sqlite_settings.database_url)) as session:
        for name, (_, cause) in bad.items():
            study = repo.get_study(session, name)
            assert study.state == "failed" and cause in study.detail, (name, study.detail)
        assert repo.get_study(session, "good").state == "done"
    for name in bad:
        assert _trials(sqlite_settings, name) == []  # failed before a trial was created
    assert any(CHECKPOINT_ATTR in t.user_attrs for t in _trials(sqlite_settings, "good"))


@pytest.mark.slow
def test_cli_check_and_export_best(sqlite_settings: Settings, tmp_path: Path) -> None:
    env = converge_env(sqlite_settings.database_url, PYTHONPATH=str(TESTS),
                       CONVERGE_ARTIFACT_DIR=str(sqlite_settings.artifact_dir))

    def converge(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(plugin_spec("cli-bad", task={"model": f"{P}:raises", "data": f"{P}:build_data"})))
    done = converge("study", "create", "--spec", str(bad), "--check")
    assert done.returncode == 1 and f"check failed: task.model '{P}:raises' raised RuntimeError" in done.stderr
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(plugin_spec("cli-good", n_trials=2)))
    done = converge("study", "create", "--spec", str(good), "--check")
    assert done.returncode == 0 and "check passed" in done.stdout and "val_f1=" in done.stdout, done.stderr
    with session_scope(get_engine(sqlite_settings.database_url)) as session:
        assert [s.name for s in repo.list_studies(session)] == ["cli-good"]  # the failed check submitted nothing

    run_sweep(sqlite_settings, parse_spec(plugin_spec("cli-good", n_trials=2)), progress=False)
    started = time.monotonic()
    done = converge("study", "export-best", "cli-good", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 60
    exported = yaml.safe_load((tmp_path / "out" / "hyperparameters.yaml").read_text())
    best = max(_trials(sqlite_settings, "cli-good"), key=lambda t: t.value)
    assert exported["trial"] == best.number and exported["hyperparameters"] == best.params
    assert exported["task"]["model"] == f"{P}:build_model" and exported["task"]["params"] == {"hidden": 8}
    from converge.trainers.plugins import load_checkpoint

    module = load_checkpoint(tmp_path / "out" / exported["checkpoint"])
    assert type(module).__name__ == "Classifier" and module.hparams.hidden == 8
    assert os.path.basename(exported["checkpoint"]).endswith(".ckpt")


def test_the_default_artifact_directory_is_next_to_a_sqlite_file(tmp_path: Path) -> None:
    assert artifact_dir(Settings(database_url=f"sqlite:///{tmp_path}/c.db")) == tmp_path / "artifacts"
    assert artifact_dir(Settings(database_url="postgresql+psycopg://u@h/db")) == Path("artifacts")
    assert artifact_dir(Settings(database_url="sqlite:///x.db", artifact_dir="/srv/ckpt")) == Path("/srv/ckpt")
