"""The `converge` CLI as users run it: real subprocesses on a real database."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import CLI, REPO, converge_env, tiny_spec
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.settings import Settings
from converge.studies.diagnosis import VERDICTS
from converge.studies.storage import storage_for


def converge(db_url: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=REPO, env=converge_env(db_url),
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
                    ["study", "list"], ["study", "show"], ["study", "cancel"], ["diagnose"], ["repair"],
                    ["worker", "list"], ["token"], ["token", "create"], ["token", "list"], ["token", "revoke"]):
        done = subprocess.run([*CLI, *command, "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "Usage: converge" in done.stdout, command


def test_bad_devices_option_is_a_usage_error(db_url: str) -> None:
    done = converge(db_url, "worker", "--devices", "tpu")
    assert done.returncode == 2 and "bad --devices 'tpu'" in done.stderr


# ---------------------------------------------------------------- converge diagnose (no database)


def diagnose_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "diagnose", *args], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=60)


DIVERGED = ('{"max_epochs": 10, "epochs": [{"epoch": 0, "train_loss": 2.3, "val_loss": 2.2},'
            ' {"epoch": 1, "train_loss": NaN, "val_loss": "NaN"}]}')
IMPROVING = '{"epochs": [{"epoch": 0, "train_loss": 2.3}, {"epoch": 1, "train_loss": 1.9}]}'
OUT_OF_ORDER = '{"epochs": [{"epoch": 1, "train_loss": 2.3}, {"epoch": 0, "train_loss": 1.9}]}'


def test_diagnose_a_file_and_stdin(tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    path.write_text(DIVERGED)
    done = diagnose_cli(str(path))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {"verdict", "healthy", "onset_epoch", "confidence", "findings", "remedies", "summary"} <= set(result)
    assert result["verdict"] == "diverged" and result["healthy"] is False
    assert done.stdout.startswith('{\n  "verdict"')  # indented for people
    piped = diagnose_cli("-", stdin=DIVERGED)
    assert piped.returncode == 0 and piped.stdout == done.stdout


def test_diagnose_jsonl_keeps_output_lines_aligned_and_exits_2_after_a_bad_line() -> None:
    lines = [DIVERGED, "{not json", OUT_OF_ORDER, "", IMPROVING]
    done = diagnose_cli("-", "--jsonl", stdin="\n".join(lines) + "\n")
    assert done.returncode == 2
    out = done.stdout.splitlines()
    assert len(out) == len(lines)
    results = [json.loads(line) for line in out]
    assert results[0]["verdict"] == "diverged" and results[4]["verdict"] in VERDICTS
    assert results[1]["line"] == 2 and results[1]["error"].startswith("not valid JSON")
    assert results[2]["line"] == 3 and "out of order" in results[2]["error"]
    assert results[3] == {"line": 4, "error": "empty line: expected one JSON history"}
    assert all(line == json.dumps(json.loads(line), separators=(",", ":")) for line in out)  # compact
    assert done.stderr.strip() == "converge: 3 of 5 lines could not be diagnosed"

    good = diagnose_cli("-", "--jsonl", stdin=f"{IMPROVING}\n{DIVERGED}\n")
    assert good.returncode == 0 and len(good.stdout.splitlines()) == 2


@pytest.mark.parametrize("text, words", [
    ('{"epochs": [', "not valid JSON"),
    (OUT_OF_ORDER, "invalid history: epoch 0 at epochs[1] is out of order"),
    ("[1, 2]", "invalid history: a history is a JSON object"),
])
def test_diagnose_refuses_invalid_input_with_one_line_and_exit_2(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    done = diagnose_cli(str(path))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"converge: {path}: ") and words in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_diagnose_of_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    done = diagnose_cli(str(tmp_path / "nowhere.json"))
    assert done.returncode == 2 and "nowhere.json" in done.stderr and "Traceback" not in done.stderr


def test_diagnose_never_imports_torch_or_the_database(tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    path.write_text(IMPROVING)
    script = f"""
import sys
from converge.service.cli import cli
try:
    cli.main(["diagnose", {str(path)!r}], prog_name="converge")
except SystemExit as exc:
    assert not exc.code, exc.code
heavy = sorted(m for m in sys.modules if m.removeprefix("converge.").split(".")[0] in
               ("torch", "pytorch_lightning", "lightning", "trainers", "optuna", "sqlalchemy", "fastapi"))
print(heavy, file=sys.stderr)
sys.exit(1 if heavy else 0)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- converge study show: the verdict table


def _stored(verdict: str, remedies: list[dict]) -> dict:
    return {"verdict": verdict, "healthy": verdict in ("converged", "still_improving"), "onset_epoch": None,
            "confidence": 0.8, "findings": [], "remedies": remedies, "summary": f"{verdict}."}


def test_study_show_ends_with_a_verdict_table(db_url: str, tmp_path: Path) -> None:
    assert converge(db_url, "study", "create", "--spec", _spec_file(tmp_path, tiny_spec("verdicts"))).returncode == 0
    optuna_study = optuna.load_study(study_name="verdicts", storage=storage_for(Settings(database_url=db_url)))
    trials = [optuna_study.ask() for _ in range(4)]
    stored = [
        _stored("diverged", [{"param": "lr", "action": "decrease", "factor": 0.1, "reason": "r"}]),
        _stored("slow_convergence", [{"param": "epochs", "action": "set", "value": 18, "reason": "r"}]),
        _stored("diverged", [{"param": "gradient_clip", "action": "enable", "reason": "r"}]),
    ]
    with session_scope(get_engine(db_url)) as session:
        study_id = repo.get_study(session, "verdicts").id
        for trial, diagnosis in zip(trials, stored):
            repo.save_diagnosis(session, study_id, trial._trial_id, trial.number, 0, diagnosis)

    shown = converge(db_url, "study", "show", "verdicts")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:6] == ["#", "state", "value", "verdict",
                                                                          "confidence", "remedy"])
    assert lines[start - 1] == ""  # after the trial table, as before
    rows = lines[start + 1:start + 5]
    assert rows[0].split() == ["0", "running", "-", "diverged", "0.80", "lr", "×", "0.1"]
    assert rows[1].split() == ["1", "running", "-", "slow_convergence", "0.80", "epochs", "=", "18"]
    assert rows[2].split() == ["2", "running", "-", "diverged", "0.80", "gradient_clip", "on"]
    assert rows[3].split() == ["3", "running", "-", "-", "-", "-"]
    assert lines[start + 5] == "verdicts: diverged 2, slow_convergence 1, no diagnosis 1"
