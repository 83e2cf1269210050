"""The sweep-trials benchmark (benchmarks/sweep_trials.py): its labels and shares, and a tiny run end to end
(its figures are not checked here: docs/performance.md records them from full runs)."""

from __future__ import annotations

import math
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import sweep_trials  # noqa: E402
from sweep_trials import Trial, figures, gain  # noqa: E402


def trial(value: float | None, *, healthy: bool, verdict: str = "", remedy: bool = True,
          repaired: float | None = None, longer: float | None = None) -> Trial:
    t = Trial("t", "t-seed0", 0, {"lr": 0.1, "epochs": 10}, value,
              verdict or ("converged" if healthy else "underfitting"), healthy)
    t.remedy = {"param": "lr", "action": "decrease"} if remedy else None
    t.repaired, t.longer = repaired, longer
    return t


def test_gain_is_relative_and_a_failed_run_is_worst() -> None:
    assert gain(1.0, 0.9) == pytest.approx(0.1)
    assert gain(-2.0, -2.2) == pytest.approx(0.1)  # a negative loss improves downward too
    assert gain(None, 5.0) == math.inf and gain(1.0, None) == -math.inf and gain(None, None) == 0.0


def test_the_four_shares_count_by_outcome() -> None:
    trials = [
        trial(1.00, healthy=True, longer=0.995),                      # best; twice the epochs no better: healthy
        trial(1.05, healthy=False, repaired=1.04, longer=1.05),       # healthy by outcome, called unhealthy
        trial(2.00, healthy=False, repaired=1.20),                    # poor; its remedy helps
        trial(3.00, healthy=True, verdict="converged"),               # poor, called converged
        trial(None, healthy=False, repaired=None),                    # failed: poor; its rerun failed too
        trial(1.50, healthy=False, repaired=1.60),                    # remedy harms (> 5% worse)
        trial(1.50, healthy=False, remedy=False, repaired=1.50),      # no applicable remedy: not improved
    ]
    f = figures([trials])
    assert f["unhealthy"] == 5 and f["efficacy"] == pytest.approx(1 / 5) and f["harm"] == pytest.approx(1 / 5)
    assert f["poor"] == 3 and f["poor_called_converged"] == pytest.approx(1 / 3)
    assert f["healthy"] == 2 and f["healthy_called_unhealthy"] == pytest.approx(1 / 2)


@pytest.mark.slow
def test_a_tiny_sweep_runs_end_to_end(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "fits.jsonl"
    result = sweep_trials.main(["--trials", "3", "--tasks", "cancer-mlp", "--parts", "tune", "--jobs", "1",
                                "--cache", str(cache), "--dump", str(tmp_path / "trials.jsonl")])
    out = capsys.readouterr().out
    assert "cancer-mlp" in out and "overall" in out
    assert result["tune"]["overall"]["trials"] == 3 * len(sweep_trials.PARTS["tune"])
    trained = len(cache.read_text().splitlines())
    assert trained >= 3  # the sweep's trials, then the reruns that label them
    sweep_trials.main(["--trials", "3", "--tasks", "cancer-mlp", "--parts", "tune", "--cache", str(cache)])
    assert len(cache.read_text().splitlines()) == trained  # a second run trains nothing new
    assert len((tmp_path / "trials.jsonl").read_text().splitlines()) == 3 * len(sweep_trials.PARTS["tune"])
