"""The plug-in examples under examples/: each spec swept end to end on SQLite with a tiny budget."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest

from converge.core.db.migrate import upgrade
from converge.core.settings import Settings
from converge.studies.checkpoints import CHECKPOINT_ATTR
from converge.studies.spec import load_spec_file, parse_spec
from converge.studies.storage import storage_for
from converge.studies.sweep import run_sweep

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.slow


@pytest.fixture
def example_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    url = f"sqlite:///{tmp_path}/converge.db"
    upgrade(url)
    return Settings(database_url=url, artifact_dir=str(tmp_path / "artifacts"))


def _tiny(spec_file: str, **params: int) -> object:
    data = load_spec_file(EXAMPLES / spec_file).model_dump(mode="json")
    data["task"]["params"].update(params)
    data["n_trials"] = 2
    data["search_space"]["epochs"] = {"low": 2, "high": 3}
    data["sampler"] = {"name": "random", "seed": 0}
    return parse_spec(data)


@pytest.mark.parametrize(("spec_file", "params", "metric"), [
    ("shapes-cnn.yaml", {"n_images": 160, "size": 16, "channels": 4}, "val_acc"),
    ("tabular-regression.yaml", {"hidden": 8}, "val_mae"),
])
def test_an_example_sweeps_end_to_end(example_settings: Settings, spec_file: str, params: dict, metric: str) -> None:
    spec = _tiny(spec_file, **params)
    assert run_sweep(example_settings, spec, progress=False) == "done"
    trials = optuna.load_study(study_name=spec.name, storage=storage_for(example_settings)).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(t.value is not None for t in trials)
    assert any(CHECKPOINT_ATTR in t.user_attrs for t in trials)
    assert spec.objective.metric == metric and all(t.intermediate_values for t in trials)
    assert "converge_examples" in sys.modules
