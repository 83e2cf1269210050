"""Optuna's own CLI and optuna-dashboard see the studies Converge creates."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import REPO, tiny_spec
from converge.core.settings import Settings
from converge.service.api.app import create_app
from converge.studies.spec import parse_spec
from converge.studies.sweep import run_sweep

pytestmark = pytest.mark.slow


@pytest.fixture
def finished_study(settings: Settings) -> str:
    run_sweep(settings, parse_spec(tiny_spec("interop", n_trials=2)), progress=False)
    return "interop"


def _optuna_cli() -> str:
    venv = REPO / ".venv" / "bin" / "optuna"
    return str(venv) if venv.exists() else "optuna"


def test_optuna_cli_lists_the_study(settings: Settings, finished_study: str) -> None:
    done = subprocess.run([_optuna_cli(), "studies", "--storage", settings.database_url, "-f", "json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (study,) = json.loads(done.stdout)
    assert study["name"] == finished_study and study["n_trials"] == 2 and study["direction"] == ["MINIMIZE"]
    trials = subprocess.run([_optuna_cli(), "trials", "--storage", settings.database_url, "--study-name",
                             finished_study, "-f", "json"], capture_output=True, text=True, timeout=120)
    assert {t["state"] for t in json.loads(trials.stdout)} == {"COMPLETE"}


def test_dashboard_lists_the_study_and_its_trials(settings: Settings, finished_study: str) -> None:
    client = TestClient(create_app(settings))
    page = client.get("/dashboard")
    assert page.status_code == 200 and "<html" in page.text.lower()
    summaries = client.get("/api/studies").json()["study_summaries"]
    (summary,) = summaries
    assert summary["study_name"] == finished_study
    detail = client.get(f"/api/studies/{summary['study_id']}").json()
    assert len(detail["trials"]) == 2
    assert {p["name"] for p in detail["trials"][0]["params"]} == {"lr", "batch_size", "epochs", "weight_decay",
                                                                   "dropout"}
    assert client.get("/").headers.get("location", "/dashboard") == "/dashboard"


def test_compose_services_run_real_converge_commands() -> None:
    """No Docker engine here: parse the compose file and let the CLI parse each command."""
    import yaml

    from converge.service.cli import cli

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    commands = {name: svc["command"] for name, svc in compose["services"].items() if "command" in svc}
    assert set(commands) == {"migrate", "api", "worker"}
    for name, argv in commands.items():
        context = cli.make_context("converge", list(argv), resilient_parsing=False)
        sub = context.command.get_command(context, argv[0])
        rest = argv[1:]
        if hasattr(sub, "get_command") and rest and rest[0] in sub.list_commands(context):  # `db upgrade`
            sub = sub.get_command(context, rest[0])
            rest = rest[1:]
        elif hasattr(sub, "get_command"):  # a group that runs itself, such as `worker --devices ...`
            assert sub.invoke_without_command, name
        assert sub is not None, name
        sub.make_context(argv[0], list(rest), parent=context)  # raises on an unknown option
    worker = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert worker["capabilities"] == ["gpu"]
    assert Path(REPO / "Dockerfile").exists()
