"""Remedies work: a real (tiny) training with a diagnosed problem, rerun with the first remedy, is healthy.

Each case induces one cause on the product's own trainer (`trainers.fit`, the digits MLP),
checks the diagnosis names it, applies the diagnosis' first remedy to the five swept
hyperparameters with `apply_remedy`, trains again from the same seed and expects a
healthy verdict.
"""

from __future__ import annotations

import pytest

from converge.studies.diagnosis import diagnose
from converge.studies.diagnosis.remedies import apply_remedy

pytestmark = pytest.mark.slow

BASE = {"dataset": "sklearn:digits", "lr": 3e-3, "batch_size": 32, "epochs": 10, "weight_decay": 0.0,
        "dropout": 0.0}

CASES = {
    # far too large a step: the loss blows up in the first epoch and the units die
    "diverged": {"lr": 0.3, "batch_size": 128},
    # a step that overshoots: the validation loss swings up and down
    "oscillating": {"lr": 0.01, "epochs": 8},
    # a step far too small: the loss creeps down
    "slow_convergence": {"lr": 1e-5, "epochs": 30},
    # no regularisation and many epochs: validation loss turns up while training loss falls
    "overfitting": {"epochs": 30, "batch_size": 64},
    # dropout so heavy the network cannot fit
    "underfitting": {"dropout": 0.95},
}


def train_and_diagnose(params: dict):
    from converge.trainers import TrainConfig, fit

    result = fit(TrainConfig(device="cpu", seed=0, **params))
    return diagnose({"objective": {"metric": "val_loss", "direction": "minimize"}, "max_epochs": params["epochs"],
                     "epochs": result.epochs})


@pytest.mark.parametrize("verdict", sorted(CASES))
def test_the_first_remedy_makes_the_run_healthy(verdict: str) -> None:
    params = {**BASE, **CASES[verdict]}
    before = train_and_diagnose(params)
    assert before.verdict == verdict, before.summary
    remedy = before.remedies[0]
    assert remedy.param in ("lr", "batch_size", "epochs", "weight_decay", "dropout")
    repaired = apply_remedy(params, remedy)
    after = train_and_diagnose(repaired)
    assert after.healthy, f"{remedy.label()} gave {after.verdict}: {after.summary}"
