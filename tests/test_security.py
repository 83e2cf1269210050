"""What a token holder must not be able to make Converge do (docs/security.md): run code through
plug-in paths the operator did not allow, read files outside the data folder, ask for sizes no
worker can hold, or drive an open server from a web page through a foreign `Host`.

Each attack is refused where the spec enters (the API's 422, the CLI's exit 2) and again by a real
worker on a spec written straight into the database, with no side effect."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import optuna
import pytest
from fastapi.testclient import TestClient

from conftest import CLI, REPO, converge_env, start_worker, tiny_spec
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.settings import Settings
from converge.service import auth
from converge.service.api.app import create_app
from converge.studies.lifecycle import submit_study
from converge.studies.policy import PolicyError, check_spec, module_allowed
from converge.studies.spec import StudySpec, parse_spec
from converge.studies.storage import storage_for
from converge.trainers.data import load_dataset

TESTS = Path(__file__).parent


def plugin_task(model: str, data: str, **params: object) -> dict[str, object]:
    return {"model": model, "data": data, "params": params}


ATTACKS = {
    "os-system": plugin_task("os:system", "subprocess:getoutput", command="touch MARKER"),
    "eval": plugin_task("builtins:eval", "builtins:exec", source="1"),
    "converge-own": plugin_task("converge.studies.lifecycle:submit_study", "converge.service.cli:main"),
    "not-listed": plugin_task("numpy:load", "numpy:save"),
}


# ---------------------------------------------------------------- plug-in modules


@pytest.mark.parametrize(("module", "prefixes", "allowed"), [
    ("mypkg.models", ["mypkg"], True),
    ("mypkg", ["mypkg"], True),
    ("mypkg2.models", ["mypkg"], False),  # whole dotted parts, not a string prefix
    ("mypkg.models", [], False),  # empty (the default): no plug-in at all
    ("os", ["os"], False),  # the standard library never, even when listed
    ("subprocess", ["subprocess"], False),
    ("builtins", ["builtins"], False),
    ("posix", ["posix"], False),
    ("converge.studies.objective", ["converge"], False),  # Converge's own never
    ("converge.service", ["converge.service"], False),
    ("service", ["service"], True),  # a user's own package of that name: Converge installs only `converge`
])
def test_which_modules_are_allowed(module: str, prefixes: list[str], allowed: bool) -> None:
    assert module_allowed(module, prefixes) is allowed


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_the_api_refuses_plugin_paths_the_operator_did_not_allow(settings: Settings, attack: str) -> None:
    client = TestClient(create_app(settings))
    answer = client.post("/v1/studies", json=tiny_spec(attack, task=ATTACKS[attack]))
    assert answer.status_code == 422, answer.text
    assert "CONVERGE_PLUGIN_MODULES" in answer.json()["detail"] or "never allowed" in answer.json()["detail"]
    assert client.get("/v1/studies").json() == []  # nothing stored


def test_an_empty_allow_list_refuses_every_plugin_and_a_listed_one_passes(settings: Settings) -> None:
    spec = parse_spec(tiny_spec("p", task=plugin_task("converge_test_plugins:build_model",
                                                      "converge_test_plugins:build_data")))
    closed = settings.model_copy(update={"plugin_modules": ""})
    with pytest.raises(PolicyError, match=r"CONVERGE_PLUGIN_MODULES \(now nothing: plug-ins are off\)"):
        check_spec(spec, closed)
    check_spec(spec, settings.model_copy(update={"plugin_modules": "converge_test_plugins"}))


# ---------------------------------------------------------------- data paths


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    (root / "ok.csv").write_text("a,y\n" + "".join(f"{i},{i % 2}\n" for i in range(40)))
    (root / "escape.csv").symlink_to("/etc/passwd")
    (root / "up").symlink_to(tmp_path)
    (tmp_path / "secret.csv").write_text("token,y\nSECRET-VALUE,1\n")
    return root


ESCAPES = ["/proc/self/environ", "/etc/passwd", "../../../etc/hostname", "../secret.csv", "escape.csv",
           "up/secret.csv", "ok.csv/../../secret.csv"]


@pytest.mark.parametrize("path", ESCAPES)
def test_csv_paths_that_leave_the_data_folder_are_refused_at_submission(settings: Settings, data_dir: Path,
                                                                        path: str) -> None:
    local = settings.model_copy(update={"data_dir": str(data_dir)})
    client = TestClient(create_app(local))
    answer = client.post("/v1/studies", json=tiny_spec("csv", task={"dataset": f"csv:{path}?target=y"}))
    assert answer.status_code == 422, answer.text
    assert "outside the data folder" in answer.json()["detail"] and "CONVERGE_DATA_DIR" in answer.json()["detail"]


def test_a_csv_inside_the_data_folder_is_taken(settings: Settings, data_dir: Path) -> None:
    local = settings.model_copy(update={"data_dir": str(data_dir)})
    for path in ("ok.csv", str(data_dir / "ok.csv")):
        check_spec(parse_spec(tiny_spec("csv", task={"dataset": f"csv:{path}?target=y"})), local)


@pytest.mark.parametrize("path", ESCAPES)
def test_the_trainer_refuses_the_same_paths_on_the_real_path(data_dir: Path, path: str) -> None:
    with pytest.raises(ValueError, match="outside the data folder"):
        load_dataset(f"csv:{path}?target=y", 0.2, 0, data_dir=data_dir)


def test_csv_errors_never_quote_the_file_and_show_at_most_20_short_column_names(tmp_path: Path) -> None:
    names = [f"column_{i:02d}_" + "x" * 60 for i in range(25)]
    (tmp_path / "wide.csv").write_text(",".join(names) + "\n" + ",".join(["SECRET-CELL"] * 25) + "\n")
    with pytest.raises(ValueError) as caught:
        load_dataset("csv:wide.csv?target=price", 0.2, 0, data_dir=tmp_path)
    message = str(caught.value)
    assert "target column 'price' not in" in message and "wide.csv" in message and "and 5 more" in message
    assert "SECRET-CELL" not in message and "x" * 41 not in message
    assert message.count("column_") == 20


def test_a_csv_over_the_byte_cap_is_refused_unread(tmp_path: Path) -> None:
    (tmp_path / "big.csv").write_text("a,y\n" + "1,0\n" * 1000)
    with pytest.raises(ValueError, match="more than the 100 a worker reads .CONVERGE_MAX_DATA_BYTES."):
        load_dataset("csv:big.csv?target=y", 0.2, 0, data_dir=tmp_path, max_bytes=100)
    assert load_dataset("csv:big.csv?target=y", 0.2, 0, data_dir=tmp_path).n_features == 1


# ---------------------------------------------------------------- the worker checks again


def _store_unchecked(settings: Settings, spec: StudySpec) -> None:
    """Write a study as a process that skipped the API's checks would (a spec reaching the database
    by another route): Optuna's study and Converge's queued row."""
    storage = storage_for(settings)
    storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], study_name=spec.name)
    with session_scope(get_engine(settings.database_url)) as session:
        repo.add_study(session, spec.name, spec.model_dump(mode="json"), spec.n_trials)


@pytest.mark.slow
def test_a_worker_refuses_what_the_api_would_have_refused_and_runs_nothing(settings: Settings, tmp_path: Path,
                                                                          data_dir: Path) -> None:
    marker = tmp_path / "marker.txt"
    bad = {
        "os-system": plugin_task("os:system", "subprocess:getoutput", command=f"id > {marker}"),
        "eval": plugin_task("builtins:eval", "builtins:exec", source=f"open({str(marker)!r}, 'w')"),
        # allowed module, but the names are os.system and subprocess.getoutput imported into it
        "reexport": plugin_task("converge_reexports:build_model", "converge_reexports:system",
                                command=f"id > {marker}"),
        "passwd": {"dataset": "csv:/etc/passwd?target=root"},
        "symlink": {"dataset": "csv:escape.csv?target=root"},
    }
    for name, task in bad.items():
        _store_unchecked(settings, StudySpec.model_validate(tiny_spec(name, task=task, n_trials=1)))
    submit_study(settings, parse_spec(tiny_spec("good", n_trials=1)))
    worker = start_worker(settings.database_url, "--exit-when-idle", PYTHONPATH=str(TESTS),
                          CONVERGE_PLUGIN_MODULES="converge_test_plugins,converge_reexports",
                          CONVERGE_DATA_DIR=str(data_dir))
    output, _ = worker.communicate(timeout=180)
    assert worker.returncode == 0, output
    assert not marker.exists()
    with session_scope(get_engine(settings.database_url)) as session:
        for name in bad:
            study = repo.get_study(session, name)
            assert study.state == "failed" and "refused by this worker's settings" in study.detail, (name, study.detail)
            assert "root:" not in study.detail  # nothing of /etc/passwd
        assert repo.get_study(session, "good").state == "done"
        detail = repo.get_study(session, "reexport").detail
        assert "is defined in 'posix', not in an allowed module" in detail
    for name in bad:
        assert optuna.load_study(study_name=name, storage=storage_for(settings)).trials == []


@pytest.mark.slow
def test_cli_check_imports_nothing_the_settings_do_not_allow(db_url: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(repr(tiny_spec("x", task=plugin_task("os:system", "subprocess:getoutput",
                                                             command=f"id > {marker}"))).replace("'", '"'))
    done = subprocess.run([*CLI, "study", "create", "--spec", str(spec_path),
                           "--check"], cwd=REPO, env=converge_env(db_url), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "CONVERGE_PLUGIN_MODULES" in done.stderr or "never allowed" in done.stderr
    assert "Traceback" not in done.stderr and not marker.exists()


# ---------------------------------------------------------------- sizes


SIZES = [
    ({"search_space": {"epochs": 100_000_000}}, "epochs values must be at most 10,000"),
    ({"search_space": {"epochs": {"low": 5, "high": 10_001}}}, "epochs values must be at most 10,000"),
    ({"search_space": {"batch_size": 10**12}}, "batch_size values must be at most 65,536"),
    ({"search_space": {"batch_size": {"choices": [32, 65_537]}}}, "batch_size values must be at most 65,536"),
    ({"task": {"params": {"width": 10**9, "depth": 10**6}}}, "params.width must be an integer in 1..65,536"),
    ({"task": {"params": {"width": 1e9}}}, "params.width must be an integer in 1..65,536"),
    ({"task": {"params": {"depth": 65}}}, "params.depth must be an integer in 0..64"),
    ({"task": {"model": "cnn", "params": {"channels": 10**8}}}, "params.channels must be an integer in 1..4,096"),
    ({"search_space": {"epochs": {"low": 10**400, "high": 10**401}}}, "at most 10,000, got an integer of 401 digits"),
    ({"task": {"params": {"width": -(10**400)}}}, "params.width must be an integer in 1..65,536"),
    ({"task": {"seed": 2**70}}, "task.seed"),
    ({"task": {"seed": -1}}, "task.seed"),
    ({"sampler": {"name": "random", "seed": 2**32}}, "sampler.seed"),
]


@pytest.mark.parametrize(("fields", "problem"), SIZES)
def test_every_size_is_bounded(settings: Settings, fields: dict, problem: str) -> None:
    client = TestClient(create_app(settings))
    answer = client.post("/v1/studies", json={**tiny_spec("big"), **fields})
    assert answer.status_code == 422, answer.text
    assert any(problem in line for line in answer.json()["problems"]), answer.json()


def test_the_largest_sizes_are_taken() -> None:
    parse_spec(tiny_spec("max", search_space={"epochs": 10_000, "batch_size": 65_536, "lr": 0.01,
                                              "weight_decay": 0.0, "dropout": 0.0},
                         task={"params": {"width": 65_536, "depth": 64}, "seed": 2**32 - 1}))


def test_the_cli_names_each_size_problem_with_exit_2(db_url: str, tmp_path: Path) -> None:
    spec_path = tmp_path / "big.json"
    spec_path.write_text('{"name": "big", "search_space": {"epochs": 100000000, "batch_size": 1000000000000},'
                         ' "n_trials": 1' + "0" * 5000 + "}")
    done = subprocess.run([*CLI, "study", "create", "--spec", str(spec_path)],
                          cwd=REPO, env=converge_env(db_url), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "a number is too long to read" in done.stderr, done.stderr
    spec_path.write_text('{"name": "big", "search_space": {"epochs": 100000000, "batch_size": 1000000000000}}')
    done = subprocess.run([*CLI, "study", "create", "--spec", str(spec_path)],
                          cwd=REPO, env=converge_env(db_url), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "epochs values must be at most 10,000" in done.stderr
    assert "batch_size values must be at most 65,536" in done.stderr


# ---------------------------------------------------------------- Host names of an open server


def _host_client(settings: Settings, **app_options: object) -> TestClient:
    return TestClient(create_app(settings, bound_host="127.0.0.1", bound_port=8000, **app_options))


@pytest.mark.parametrize(("host", "status"), [
    ("127.0.0.1:8000", 200), ("localhost:8000", 200), ("[::1]:8000", 200), ("localhost", 200),
    ("rebind.attacker.example", 400), ("rebind.attacker.example:8000", 400), ("localhost:9999", 400),
    ("127.0.0.1.attacker.example:8000", 400), ("LOCALHOST:8000", 200),
])
def test_an_open_server_answers_only_its_own_host_names(settings: Settings, host: str, status: int) -> None:
    client = _host_client(settings)
    answer = client.get("/v1/studies", headers={"Host": host})
    assert answer.status_code == status, answer.text
    if status == 400:
        assert "CONVERGE_ALLOWED_HOSTS" in answer.json()["detail"]
        assert client.get("/dashboard", headers={"Host": host}).status_code == 400  # the dashboard too


def test_allowed_hosts_extend_the_list_and_apply_with_tokens_once_set(settings: Settings) -> None:
    foreign = {"Host": "converge.lab:8000"}
    assert _host_client(settings).get("/v1/health", headers=foreign).status_code == 400
    extended = settings.model_copy(update={"allowed_hosts": "converge.lab"})
    assert _host_client(extended).get("/v1/health", headers=foreign).status_code == 200
    token, _ = auth.create_token(get_engine(settings.database_url), "read")
    # With a token, the token guards the server: a foreign Host reaches the route (401 without a token) ...
    assert _host_client(settings).get("/v1/studies", headers={"Host": "proxy.example"}).status_code == 401
    # ... unless CONVERGE_ALLOWED_HOSTS is set, which keeps the check on.
    bearer = {"Authorization": f"Bearer {token}"}
    assert _host_client(extended).get("/v1/studies", headers={"Host": "proxy.example", **bearer}).status_code == 400
    assert _host_client(extended).get("/v1/studies", headers={**foreign, **bearer}).status_code == 200


def test_without_a_bound_address_or_setting_there_is_no_host_check(settings: Settings) -> None:
    """An app built without `converge serve`'s address (embedded, tests) has no names to check against."""
    assert TestClient(create_app(settings)).get("/v1/health").status_code == 200


def test_settings_env_names() -> None:
    names = {"plugin_modules", "data_dir", "max_data_bytes", "webhook_allow", "allowed_hosts"}
    assert names <= set(Settings.model_fields)
    assert os.environ.get("CONVERGE_PLUGIN_MODULES")  # tests/conftest.py's allow-list for the suite
