"""The deployment: docker-compose.yml's services run real `converge` subcommands with valid options, and the
same topology runs as local processes (scripts/cluster-smoke.sh). No Docker engine is needed."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import click
import pytest
import yaml

from conftest import REPO
from converge.service.cli import cli
from converge.studies.devices import parse_devices

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())


def resolve(args: list[str]) -> tuple[str, click.Context]:
    """Parse a `converge` command line as click would, without running it: the command's path and its
    context (every option parsed and converted). Raises click's own error for an unknown command or option."""
    command: click.Command = cli
    path, rest, ctx = ["converge"], list(args), None
    while True:
        ctx = command.make_context(path[-1], rest, parent=ctx)
        if not isinstance(command, click.Group):
            return " ".join(path), ctx
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            return " ".join(path), ctx
        name, command, rest = command.resolve_command(ctx, rest)
        path.append(name)


def _converge_services() -> dict[str, dict]:
    return {name: s for name, s in COMPOSE["services"].items() if s.get("image") == "converge:latest"}


def test_every_converge_service_runs_a_real_subcommand_with_valid_options() -> None:
    services = _converge_services()
    assert set(services) == {"migrate", "api", "worker"}
    commands = {}
    for name, service in services.items():
        command, ctx = resolve(list(service["command"]))
        commands[name] = command
        if command == "converge worker":
            parse_devices(ctx.params["devices"])  # what the worker itself would refuse
    assert commands == {"migrate": "converge db upgrade", "api": "converge serve", "worker": "converge worker"}
    _, serve = resolve(list(services["api"]["command"]))
    assert serve.params["workers"] == 0 and serve.params["host"] == "0.0.0.0"
    assert services["api"]["ports"] == [f"{serve.params['port']}:{serve.params['port']}"]
    with pytest.raises(click.UsageError):
        resolve(["worker", "--gpus", "2"])  # the check itself catches a wrong option
    with pytest.raises(click.UsageError):
        resolve(["db", "downgrade"])


def test_the_stack_has_a_healthy_database_a_one_shot_migrate_gpu_workers_and_an_env_file() -> None:
    services = COMPOSE["services"]
    postgres = services["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in COMPOSE["volumes"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker"):
        assert services[name]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    deploy = services["worker"]["deploy"]
    assert deploy["replicas"] >= 2
    device = deploy["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    for name in ("postgres", "migrate", "api", "worker"):
        assert services[name]["env_file"] == ["converge.env", SECRETS], name  # committed, then made on first use
    assert (REPO / "converge.env").is_file()


SECRETS = "secrets/postgres.env"


def _env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def test_no_password_is_committed_and_make_secrets_makes_one_on_first_use(tmp_path: Path) -> None:
    committed = _env(REPO / "converge.env")
    assert "POSTGRES_PASSWORD" not in committed and "CONVERGE_DATABASE_URL" not in committed
    assert "/secrets/" in (REPO / ".gitignore").read_text().splitlines()
    made = [tmp_path / "a.env", tmp_path / "b.env"]
    for path in made:
        done = subprocess.run(["bash", str(REPO / "scripts" / "make-secrets.sh"), str(path)], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert path.stat().st_mode & 0o077 == 0  # readable by its owner only
    first, second = _env(made[0]), _env(made[1])
    assert re.fullmatch(r"[0-9a-f]{64}", first["POSTGRES_PASSWORD"])
    assert first["POSTGRES_PASSWORD"] != second["POSTGRES_PASSWORD"]  # random, not a fixed default
    url = first["CONVERGE_DATABASE_URL"]
    assert url == (f"postgresql://{committed['POSTGRES_USER']}:{first['POSTGRES_PASSWORD']}@postgres:5432/"
                   f"{committed['POSTGRES_DB']}")
    before = made[0].read_text()
    again = subprocess.run(["bash", str(REPO / "scripts" / "make-secrets.sh"), str(made[0])], capture_output=True,
                           text=True, timeout=30)
    assert again.returncode == 0 and "kept" in again.stdout and made[0].read_text() == before


def test_the_dockerfile_builds_a_cpu_or_a_cuda_image_by_build_argument() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", dockerfile, re.M)
    assert "cpu)" in dockerfile and "cuda)" in dockerfile and 'ENTRYPOINT ["converge"]' in dockerfile
    assert COMPOSE["x-converge"]["build"]["args"]["VARIANT"] in ("cpu", "cuda")


@pytest.mark.slow
@pytest.mark.postgres
def test_the_cluster_smoke_script_runs_a_study_through_api_and_two_workers(postgres_admin: object) -> None:
    done = subprocess.run(["bash", str(REPO / "scripts" / "cluster-smoke.sh")], cwd=REPO, capture_output=True,
                          text=True, timeout=240, env=dict(os.environ))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "cluster smoke: ok" in done.stdout
