"""Hostile input never crashes: `converge diagnose` as a real subprocess (one line on stderr, exit status 2, never
a traceback; --jsonl goes on past a bad line), and the API through the real ASGI app (a 4xx that says what was
wrong, never a 500 or a bare "ValueError")."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import CLI, REPO, tiny_spec
from converge.core.settings import Settings
from converge.service.api.app import create_app
from converge.service.cli import MAX_DIAGNOSE_INPUT_BYTES, MAX_DIAGNOSE_LINE_BYTES, _LineReader, _mib
from converge.service.json_input import number_too_long

DIGITS = sys.get_int_max_str_digits()  # 4300 unless PYTHONINTMAXSTRDIGITS says otherwise
GOOD = '{"epochs": [{"epoch": 0, "train_loss": 2.3}, {"epoch": 1, "train_loss": 1.9}]}'
DEEP = "[" * 200_000
HUGE_NUMBER = '{"epochs": [{"epoch": 0, "train_loss": ' + "7" * 5000 + "}]}"
PAST_FLOAT = '{"epochs": [{"epoch": 0, "train_loss": ' + "7" * 400 + "}]}"  # parses, but no float holds it


def diagnose_cli(*args: str, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*CLI, "diagnose", *args], cwd=REPO, input=stdin,
                          capture_output=True, timeout=timeout)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode("utf-8", "replace"),
                                       done.stderr.decode("utf-8", "replace"))


def assert_refused(done: subprocess.CompletedProcess[str], name: str, words: str) -> None:
    """Exit status 2, nothing on stdout, exactly one line on stderr naming the input, no traceback."""
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.endswith("\n"), done.stderr
    assert done.stderr.startswith(f"converge: {name}: ") and words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- converge diagnose FILE|-


@pytest.mark.parametrize("content, words", [
    pytest.param(DEEP.encode(), "nested too deeply", id="deep-nesting"),
    pytest.param(HUGE_NUMBER.encode(), f"epochs[0].train_loss: a number of 5000 digits is too long (at most {DIGITS}",
                 id="5000-digit-number"),
    pytest.param(PAST_FLOAT.encode(), "epochs[0].train_loss must be a number within a float's range",
                 id="integer-past-a-float"),
    pytest.param(b'{"epochs": [{"epoch": 0, "train_loss": 1.0, "lr": "\xff\xfe"}]}', "not UTF-8 text",
                 id="invalid-utf8"),
    pytest.param(b"[1, 2]", "a history is a JSON object", id="array"),
    pytest.param(b'"a string"', "a history is a JSON object", id="string"),
    pytest.param(b"null", "a history is a JSON object", id="null"),
    pytest.param(b"", "not valid JSON", id="empty"),
    pytest.param(b'{"max_epochs": ' + b"[" * 950 + b"]" * 950 + b', "epochs": [{"epoch": 0, "train_loss": 1}]}',
                 "max_epochs must be a positive integer", id="nesting-json-takes"),
])
def test_diagnose_refuses_bad_input_in_one_line(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    assert_refused(diagnose_cli(str(path)), str(path), words)
    assert_refused(diagnose_cli("-", stdin=content), "<stdin>", words)


def test_diagnose_refuses_a_file_over_the_input_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    with path.open("wb") as f:
        f.truncate(MAX_DIAGNOSE_INPUT_BYTES + 1)  # sparse: no disk used
    assert_refused(diagnose_cli(str(path)), str(path), f"larger than the {_mib(MAX_DIAGNOSE_INPUT_BYTES)} limit")


def test_diagnose_stops_reading_dev_zero_at_the_limit() -> None:
    assert_refused(diagnose_cli("/dev/zero", timeout=60), "/dev/zero", "64 MiB limit")
    done = diagnose_cli("/dev/zero", "--jsonl", timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == [
        {"line": 1, "error": "the line is longer than the 4 MiB limit of a --jsonl line; it was skipped unread"}]
    assert done.stderr.count("\n") == 1 and "reading stopped at the 64 MiB limit" in done.stderr


def test_the_limits_are_in_the_help() -> None:
    done = subprocess.run([*CLI, "diagnose", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert f"at most {_mib(MAX_DIAGNOSE_INPUT_BYTES)} of input" in text
    assert f"at most {_mib(MAX_DIAGNOSE_LINE_BYTES)} per line" in text
    assert "exit status 2 if any line could not be diagnosed, else 0" in text


# ---------------------------------------------------------------- converge diagnose --jsonl


@pytest.mark.parametrize("bad, words", [
    pytest.param(DEEP.encode(), "nested too deeply", id="deep-nesting"),
    pytest.param(HUGE_NUMBER.encode(), "epochs[0].train_loss: a number of 5000 digits is too long",
                 id="5000-digit-number"),
    pytest.param(PAST_FLOAT.encode(), "within a float's range", id="integer-past-a-float"),
    pytest.param(b'{"epochs": \xff}', "not UTF-8 text", id="invalid-utf8"),
    pytest.param(b"[1, 2]", "a history is a JSON object", id="array"),
    pytest.param(b"{not json", "not valid JSON", id="not-json"),
    pytest.param(b" " * (MAX_DIAGNOSE_LINE_BYTES + 1), "longer than the 4 MiB limit", id="line-over-4-MiB"),
])
def test_jsonl_answers_every_line_and_goes_on_past_a_bad_one(bad: bytes, words: str) -> None:
    done = diagnose_cli("-", "--jsonl", stdin=GOOD.encode() + b"\n" + bad + b"\n" + GOOD.encode() + b"\n")
    assert done.returncode == 2, done.stderr
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(out) == 3
    assert out[0]["verdict"] == out[2]["verdict"] and "error" not in out[0]
    assert set(out[1]) == {"line", "error"} and out[1]["line"] == 2 and words in out[1]["error"], out[1]
    assert done.stderr == "converge: 1 of 3 lines could not be diagnosed\n"


def test_jsonl_lines_split_as_a_text_file_splits_them() -> None:
    """\\n, \\r\\n and \\r end a line, wherever the chunks the input is read in happen to end."""
    data = b"a\r\nbb\rc\n\r\n\xff\nlast"
    expected = [b"a", b"bb", b"c", b"", b"\xff", b"last"]
    for chunk in (1, 2, 3, 5, 64):
        assert list(_LineReader(io.BytesIO(data), 100, 100, chunk_bytes=chunk)) == expected
    reader = _LineReader(io.BytesIO(data), 1, 100, chunk_bytes=2)
    assert [line if isinstance(line, bytes) else "long" for line in reader] == [
        b"a", "long", b"c", b"", b"\xff", "long"]
    cut = _LineReader(io.BytesIO(data), 100, 6, chunk_bytes=4)  # stops inside "c"
    lines = list(cut)
    assert lines[:2] == [b"a", b"bb"] and len(lines) == 3 and not isinstance(lines[2], bytes) and cut.stopped


# ---------------------------------------------------------------- the API


@pytest.fixture
def client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.mark.parametrize("path, status", [("/static/favicon.ico", 404), ("/favicon.ico", 200),
                                          ("/static/bundle.js.LICENSE.txt", 200)])
def test_dashboard_files_without_accept_encoding(client: TestClient, path: str, status: int) -> None:
    """optuna-dashboard reads Accept-Encoding to pick a gzipped file: without the header it was a 500."""
    request = client.build_request("GET", path)
    del request.headers["accept-encoding"]
    response = client.send(request)
    assert response.status_code == status, response.text
    assert "content-encoding" not in response.headers  # the plain file: the client asked for no coding
    gzipped = client.get(path, headers={"accept-encoding": "gzip"})
    assert gzipped.status_code == status


@pytest.mark.parametrize("path, body, problem", [
    ("/v1/studies", json.dumps(tiny_spec("big")).replace('"n_trials": 3', '"n_trials": ' + "9" * 5000),
     f"n_trials: a number of 5000 digits is too long (at most {DIGITS} digits)"),
    ("/v1/diagnose", HUGE_NUMBER,
     f"epochs[0].train_loss: a number of 5000 digits is too long (at most {DIGITS} digits)"),
    ("/v1/diagnose", "-" + "1" * 5000, f"a number of 5000 digits is too long (at most {DIGITS} digits)"),
    ("/v1/diagnose", PAST_FLOAT, "epochs[0].train_loss must be a number within a float's range (about 1.8e308), "
                                 "got an integer of over 300 digits"),
])
def test_a_number_too_long_is_a_422_naming_it(client: TestClient, path: str, body: str, problem: str) -> None:
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["problems"] == [problem]
    assert "ValueError" not in response.text


@pytest.mark.parametrize("path", ["/v1/diagnose", "/v1/studies"])
@pytest.mark.parametrize("body", [
    pytest.param(DEEP, id="200000-deep"),
    pytest.param("[" * 5000 + "]" * 5000, id="5000-deep"),
    pytest.param('{"max_epochs": ' + "[" * 950 + "]" * 950 + ', "epochs": [{"epoch": 0, "train_loss": 1}]}',
                 id="950-deep-value"),
])
def test_deeply_nested_json_is_a_4xx(client: TestClient, path: str, body: str) -> None:
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert isinstance(response.json()["detail"], str)


def test_number_too_long_names_where_the_number_is() -> None:
    long = "1" * (DIGITS + 1)
    what = f"a number of {DIGITS + 1} digits is too long (at most {DIGITS} digits)"
    assert number_too_long(f'{{"a": [0, {{"b": {long}}}]}}') == f"a[1].b: {what}"
    assert number_too_long(f"-{long}".encode()) == what
    assert number_too_long(f'{{"a": {long}, "b": ' + "[" * 100_000) == what  # the rest fails too: no place known
