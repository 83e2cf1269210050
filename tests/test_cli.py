"""The `converge` CLI as users run it: real subprocesses on a real database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, converge_env, tiny_spec
from service.db import repo
from service.db.engine import get_engine, session_scope


def converge(db_url: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, env=converge_env(db_url),
                          capture_output=True, text=True, timeout=timeout)


def _spec_file(tmp_path: Path, spec: dict) -> str:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.slow
def test_sweep_runs_a_study_to_completion_and_prints_its_trials(db_url: str, tmp_path: Path) -> None:
    done = converge(db_url, "sweep", "--spec", _spec_file(tmp_path, tiny_spec("cli-sweep")))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "study cli-sweep: done"
    header = next(i for i, line in enumerate(lines) if line.startswith("#"))
    rows = lines[header + 1:]
    assert len(rows) == 3 and all(" complete " in row for row in rows)
    assert "3/3" in done.stderr  # the progress bar reached the end


def test_invalid_spec_exits_2_with_every_problem_and_writes_nothing(db_url: str, tmp_path: Path) -> None:
    bad = tiny_spec("bad name", n_trials=20000)
    bad["task"]["model"] = "transformer"
    for command in ("sweep", "study create"):
        done = converge(db_url, *command.split(), "--spec", _spec_file(tmp_path, bad))
        assert done.returncode == 2
        assert "invalid study spec (3 problems)" in done.stderr
        assert "task.model: unknown model 'transformer'" in done.stderr
        assert "Traceback" not in done.stderr
    with session_scope(get_engine(db_url)) as session:
        assert repo.count_studies(session) == 0


def test_study_create_list_show(db_url: str, tmp_path: Path) -> None:
    created = converge(db_url, "study", "create", "--spec", _spec_file(tmp_path, tiny_spec("queued-one")))
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == "study 'queued-one' queued: 3 trials"
    listed = converge(db_url, "study", "list")
    assert listed.stdout.splitlines()[1].split()[:3] == ["queued-one", "queued", "3"]
    shown = converge(db_url, "study", "show", "queued-one")
    assert shown.stdout.startswith("study queued-one: queued")
    again = converge(db_url, "study", "create", "--spec", _spec_file(tmp_path, tiny_spec("queued-one")))
    assert again.returncode == 1 and again.stderr.strip() == "converge: a study named 'queued-one' already exists"
    missing = converge(db_url, "study", "show", "nope")
    assert missing.returncode == 1 and missing.stderr.strip() == "converge: no study named 'nope'"


def test_every_command_has_help() -> None:
    for command in ([], ["serve"], ["worker"], ["db", "upgrade"], ["sweep"], ["study", "create"],
                    ["study", "list"], ["study", "show"]):
        done = subprocess.run([sys.executable, "-m", "service.cli", *command, "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "Usage: converge" in done.stdout, command


def test_bad_devices_option_is_a_usage_error(db_url: str) -> None:
    done = converge(db_url, "worker", "--devices", "tpu")
    assert done.returncode == 2 and "bad --devices 'tpu'" in done.stderr
