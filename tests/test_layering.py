"""The package layering holds: checked statically by import-linter and at run time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO


def lint_imports(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / ".venv" / "bin" / "lint-imports") if (REPO / ".venv").exists()
                           else "lint-imports", "--no-cache", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_import_contracts_are_kept() -> None:
    done = lint_imports()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(("folder", "imported", "contract"), [
    ("core", "converge.studies.spec", "layers"),  # the foundation imports no layer above it
    ("core/db", "converge.service.views", "layers"),
    ("trainers", "converge.studies.search_space", "layers"),
    ("studies", "converge.service.cli", "layers"),
    ("core", "converge.trainers.config", "layers"),  # siblings: neither imports the other
    ("trainers", "converge.core.settings", "layers"),
    ("migrations", "converge.service.cli", "layers"),
    ("service/api", "converge.service.cli", "service-layers"),  # the routers never call the CLI
    ("service", "converge.studies.spec", "service-layers"),  # exhaustive: a module of service no layer names
])
def test_a_module_importing_upwards_breaks_the_layers(folder: str, imported: str, contract: str) -> None:
    """A temporary module that imports a higher layer makes `lint-imports` fail, naming the contract."""
    probe = REPO / folder / f"_layering_probe_{os.getpid()}.py"
    probe.write_text(f"import {imported}  # a temporary module of tests/test_layering.py\n")
    try:
        done = lint_imports("--contract", contract)
    finally:
        probe.unlink()
    assert done.returncode != 0 and "1 broken" in done.stdout, done.stdout + done.stderr
    assert probe.stem in done.stdout  # the offending module is named


def test_the_api_process_never_imports_torch(db_url: str) -> None:
    """Serve real requests (dashboard included) through the ASGI app, then look at sys.modules."""
    script = f"""
import sys
from fastapi.testclient import TestClient
from converge.service.api.app import create_app
from converge.core.settings import Settings
client = TestClient(create_app(Settings(database_url={db_url!r})))
assert client.post("/v1/studies", json={{"name": "no-torch", "n_trials": 1}}).status_code == 201
assert client.get("/v1/studies/no-torch/trials").status_code == 200
assert client.get("/v1/studies/no-torch/trials", params={{"sort": "objective"}}).status_code == 200
assert client.get("/v1/studies/no-torch/export").status_code == 200
assert client.get("/v1/studies/no-torch/export?format=csv").status_code == 200
assert client.post("/v1/diagnose", json={{"epochs": [{{"epoch": 0, "train_loss": 1.0}}]}}).status_code == 200
assert client.get("/v1/health").status_code == 200
assert client.get("/v1/studies/no-torch/plot").status_code == 200
assert client.get("/v1/studies/no-torch/plot?format=html").status_code == 200
assert client.get("/metrics").status_code == 200
assert client.get("/api/studies").status_code == 200
assert client.get("/dashboard").status_code == 200
heavy = sorted(m for m in sys.modules
               if m.removeprefix("converge.").split(".")[0] in ("torch", "pytorch_lightning", "lightning", "trainers"))
print(heavy)
sys.exit(1 if heavy else 0)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_spec_names_match_the_trainers_registries() -> None:
    from converge import trainers
    from converge.studies import spec
    from converge.trainers.data import SKLEARN_REGRESSION

    assert spec.MODELS == trainers.MODEL_NAMES
    assert spec.MODEL_PARAMS == trainers.MODEL_PARAMS  # names, minimums and maximums
    assert spec.SKLEARN_DATASETS == trainers.SKLEARN_DATASETS
    assert spec.REGRESSION_DATASETS == {f"sklearn:{name}" for name in SKLEARN_REGRESSION}
