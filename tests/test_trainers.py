"""The `trainers` package: real (tiny) training runs on scikit-learn's bundled data and small CSVs."""

from __future__ import annotations

import csv
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch.nn import functional as F

from converge.trainers import MODEL_NAMES, SKLEARN_DATASETS, DataSplit, FitResult, TrainConfig, fit, load_dataset
from converge.trainers.fit import TensorBatches, WholeEpoch, make_loaders
from converge.trainers.models import MLP, SmallCNN, build_network

METRIC_KEYS = {"epoch", "train_loss", "val_loss", "val_acc", "grad_norm", "param_norm", "lr", "epoch_seconds"}
TINY_MLP = {"width": 16, "depth": 2}


def tiny(**overrides) -> TrainConfig:
    base = {"model": "mlp", "params": TINY_MLP, "epochs": 3, "lr": 1e-2, "device": "cpu"}
    return TrainConfig(**{**base, **overrides})


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def regression_csv(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = x @ np.array([1.5, -2.0, 0.5]) + 0.1 * rng.normal(size=200) + 10.0
    return write_csv(tmp_path / "reg.csv", ["a", "b", "c", "y"], [[*row, t] for row, t in zip(x, y)])


@pytest.fixture
def labelled_csv(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(120):
        label = ["cat", "dog", "owl"][i % 3]
        centre = {"cat": -2.0, "dog": 0.0, "owl": 2.0}[label]
        rows.append([centre + rng.normal(), rng.normal(), label])
    return write_csv(tmp_path / "animals.csv", ["x1", "x2", "species"], rows)


def assert_well_formed(result: FitResult, epochs: int, classification: bool = True) -> None:
    assert [m["epoch"] for m in result.epochs] == list(range(epochs))
    for m in result.epochs:
        assert set(m) == METRIC_KEYS
        assert type(m["epoch"]) is int
        for key in METRIC_KEYS - {"epoch", "val_acc"}:
            assert type(m[key]) is float and math.isfinite(m[key]), (key, m[key])
        if classification:
            assert type(m["val_acc"]) is float and 0.0 <= m["val_acc"] <= 1.0
        else:
            assert m["val_acc"] is None


# --- training runs ----------------------------------------------------------------------------


@pytest.mark.slow
def test_mlp_on_digits_learns_and_reports_every_epoch(capfd: pytest.CaptureFixture[str]) -> None:
    lightning_level = logging.getLogger("pytorch_lightning").level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(tiny())

    assert_well_formed(result, epochs=3)
    losses = [m["train_loss"] for m in result.epochs]
    assert losses[0] > losses[1] > losses[2], losses
    assert result.epochs[-1]["val_acc"] > 0.8
    assert all(m["grad_norm"] > 0 and m["param_norm"] > 0 for m in result.epochs)
    assert all(m["lr"] == 1e-2 for m in result.epochs)
    assert not result.stopped_early and result.seconds > 0

    # Quiet for a sweep: no Lightning banners or dataloader hints, and logging left as it was.
    assert "GPU available" not in capfd.readouterr().err
    assert not [w for w in caught if issubclass(w.category, PossibleUserWarning)]
    assert logging.getLogger("pytorch_lightning").level == lightning_level


@pytest.mark.slow
def test_cnn_on_digits() -> None:
    result = fit(tiny(model="cnn", params={"channels": 4}, epochs=2))
    assert_well_formed(result, epochs=2)


@pytest.mark.slow
def test_hook_sees_each_epoch_with_its_validation_and_can_stop() -> None:
    seen: list[dict] = []

    def stop_after_second(metrics: dict) -> bool:
        seen.append(metrics)
        return metrics["epoch"] == 1

    result = fit(tiny(epochs=5), on_epoch_end=stop_after_second)

    assert [m["epoch"] for m in seen] == [0, 1]
    # Epoch 0's dict already holds validation metrics: validation ran before the hook.
    assert math.isfinite(seen[0]["val_loss"]) and seen[0]["val_acc"] is not None
    assert seen[0]["val_loss"] != seen[1]["val_loss"]
    assert seen == result.epochs
    assert result.stopped_early and len(result.epochs) == 2


@pytest.mark.slow
def test_val_metrics_are_this_epochs_and_weighted_by_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """360 validation rows in batches of 64 (the last one 40): the logged mean must equal the full-set value."""
    networks = []

    def capture(config: TrainConfig, split: DataSplit) -> torch.nn.Module:
        networks.append(build_network(config, split))
        return networks[-1]

    monkeypatch.setattr(sys.modules["converge.trainers.fit"], "build_network", capture)
    split = load_dataset("sklearn:digits", 0.2, 0)
    last = fit(tiny(epochs=2), split=split).epochs[-1]

    network = networks[0].eval()
    with torch.no_grad():
        output = network(split.x_val)
    assert last["val_loss"] == pytest.approx(F.cross_entropy(output, split.y_val).item(), rel=1e-5)
    assert last["val_acc"] == pytest.approx((output.argmax(dim=1) == split.y_val).float().mean().item(), rel=1e-6)


@pytest.mark.slow
def test_hook_returning_false_runs_all_epochs() -> None:
    result = fit(tiny(epochs=2), on_epoch_end=lambda metrics: False)
    assert not result.stopped_early and len(result.epochs) == 2


@pytest.mark.slow
def test_regression_csv(regression_csv: Path) -> None:
    result = fit(tiny(dataset=f"csv:{regression_csv}?target=y", epochs=2, batch_size=32,
                       data_dir=str(regression_csv.parent)))
    assert_well_formed(result, epochs=2, classification=False)


@pytest.mark.slow
def test_classification_csv_with_string_labels(labelled_csv: Path) -> None:
    result = fit(tiny(dataset=f"csv:{labelled_csv}?target=species", epochs=2, batch_size=16,
                       data_dir=str(labelled_csv.parent)))
    assert_well_formed(result, epochs=2)


@pytest.mark.slow
def test_same_seed_same_first_epoch() -> None:
    first, second = (fit(tiny(epochs=1, seed=7)).epochs[0] for _ in range(2))
    assert first["train_loss"] == second["train_loss"]
    assert first["val_loss"] == second["val_loss"]


def _fit_and_its_twin(config: TrainConfig) -> tuple[list[dict[str, Any]], DataSplit, torch.nn.Module,
                                                     torch.optim.Optimizer, TensorBatches, TensorBatches]:
    """`fit`'s epochs, and what a hand-written loop needs to repeat them: the same split, network,
    initial weights, optimizer and batches."""
    split = load_dataset(config.dataset, config.val_fraction, config.seed)
    reported = fit(config, split=split).epochs
    torch.manual_seed(config.seed)
    network = build_network(config, split)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    train_batches, val_batches = make_loaders(split, config.batch_size, config.seed)
    return reported, split, network, optimizer, train_batches, val_batches


@pytest.mark.slow
def test_every_epoch_metric_equals_a_hand_computation() -> None:
    """The lean trainer (manual optimization, means kept as tensors, norms combined per epoch) reports what a
    plain loop over the same batches computes: the size-weighted mean train loss, the mean of the steps'
    global gradient norms, the val loss and accuracy, the final weight norm and the learning rate."""
    config = tiny(epochs=3, weight_decay=0.01)
    reported, split, network, optimizer, train_batches, val_batches = _fit_and_its_twin(config)
    for epoch in reported:
        loss_sum, grad_norms = 0.0, []
        network.train()
        for x, y in train_batches:
            optimizer.zero_grad()
            loss = F.cross_entropy(network(x), y)
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in network.parameters()])
            grad_norms.append(grads.norm().item())
            optimizer.step()
            loss_sum += loss.item() * len(x)
        network.eval()
        with torch.no_grad():
            outputs = torch.cat([network(x) for x, _ in val_batches])
        weights = torch.cat([p.detach().flatten() for p in network.parameters()])
        expected = {
            "train_loss": loss_sum / len(split.y_train),
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "val_loss": F.cross_entropy(outputs, split.y_val).item(),
            "val_acc": (outputs.argmax(dim=1) == split.y_val).float().mean().item(),
            "param_norm": weights.norm().item(),
        }
        for key, value in expected.items():
            assert epoch[key] == pytest.approx(value, rel=1e-5), (epoch["epoch"], key)
        assert epoch["lr"] == config.lr


@pytest.mark.slow
def test_mixed_precision_still_applies_under_manual_optimization(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fit` steps the optimizer itself; bf16-mixed (what a GPU worker gets) must still autocast the steps."""
    from converge.trainers.module import LitModel

    autocast: list[bool] = []
    training_step = LitModel.training_step

    def spy(self: LitModel, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        autocast.append(torch.is_autocast_enabled("cpu"))
        training_step(self, batch, batch_idx)

    monkeypatch.setattr(sys.modules["converge.trainers.fit"], "_precision", lambda accelerator: "bf16-mixed")
    monkeypatch.setattr(LitModel, "training_step", spy)
    result = fit(tiny(epochs=2))

    assert autocast and all(autocast)
    assert_well_formed(result, epochs=2)
    assert result.epochs[1]["train_loss"] < result.epochs[0]["train_loss"]


@pytest.mark.slow
def test_mixed_precision_steps_see_the_weights_the_previous_step_updated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16-mixed each step must use the weights the previous step left, as when each step is its own
    autocast region. An epoch's steps share one region (one `training_step`); an autocast that kept its bf16
    copies of the weights for the region (torch's default cache; Lightning turns it off) would give them all
    the epoch's first weights."""
    monkeypatch.setattr(sys.modules["converge.trainers.fit"], "_precision", lambda accelerator: "bf16-mixed")
    config = tiny(epochs=2)
    reported, split, network, optimizer, train_batches, _ = _fit_and_its_twin(config)
    for epoch in reported:
        network.train()
        loss_sum = 0.0
        for x, y in train_batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):  # one region per step
                optimizer.zero_grad()
                loss = F.cross_entropy(network(x), y)
                loss.backward()
                optimizer.step()
            loss_sum += loss.item() * len(x)
        assert epoch["train_loss"] == pytest.approx(loss_sum / len(split.y_train), rel=1e-3), epoch["epoch"]


# --- data -------------------------------------------------------------------------------------


def test_whole_epoch_is_one_lightning_batch_of_the_same_mini_batches() -> None:
    """`fit` hands Lightning each pass as one batch; the steps must still see the loader's own mini-batches."""
    split = load_dataset("sklearn:digits", 0.2, 0)
    direct, _ = make_loaders(split, 64, seed=3)
    wrapped, _ = make_loaders(split, 64, seed=3)
    lightning_batches = WholeEpoch(wrapped)
    assert len(lightning_batches) == 1
    for _ in range(2):  # a fresh shuffle each pass, drawn alike
        (only,) = list(lightning_batches)
        pairs = list(zip(only, direct, strict=True))
        assert len(pairs) == len(direct) == math.ceil(len(split.y_train) / 64)
        for (x, y), (x_direct, y_direct) in pairs:
            assert torch.equal(x, x_direct) and torch.equal(y, y_direct)


@pytest.mark.parametrize(("name", "n_classes"), [("digits", 10), ("wine", 3), ("breast_cancer", 2), ("iris", 3)])
def test_sklearn_datasets(name: str, n_classes: int) -> None:
    split = load_dataset(f"sklearn:{name}", 0.2, 0)
    assert split.task == "classification" and split.n_classes == n_classes
    assert split.image_shape == ((1, 8, 8) if name == "digits" else None)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    assert split.x_train.shape[1] == split.x_val.shape[1] == split.n_features
    assert set(split.y_val.tolist()) == set(range(n_classes))  # stratified: every class in val
    assert torch.allclose(split.x_train.mean(dim=0), torch.zeros(split.n_features), atol=1e-4)


def test_registries() -> None:
    assert MODEL_NAMES == frozenset({"mlp", "cnn"})
    assert SKLEARN_DATASETS == frozenset({"digits", "wine", "breast_cancer", "iris", "diabetes", "friedman1"})


def test_diabetes_is_a_standardised_regression_target() -> None:
    split = load_dataset("sklearn:diabetes", 0.2, 0)
    assert split.task == "regression" and split.n_classes is None and split.n_features == 10
    assert split.y_train.dtype == torch.float32 and split.y_train.shape == (353, 1)
    assert split.y_train.mean().abs() < 1e-4 and (split.y_train.std() - 1).abs() < 0.01


def test_friedman1_is_generated_the_same_everywhere() -> None:
    a, b = load_dataset("sklearn:friedman1", 0.2, 0), load_dataset("sklearn:friedman1", 0.2, 0)
    assert a.task == "regression" and a.n_classes is None and a.n_features == 10
    assert a.y_train.shape == (800, 1) and a.y_val.shape == (200, 1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert a.y_train.mean().abs() < 1e-4 and (a.y_train.std() - 1).abs() < 0.01


def test_split_is_deterministic_by_seed() -> None:
    a, b = load_dataset("sklearn:iris", 0.2, 1), load_dataset("sklearn:iris", 0.2, 1)
    c = load_dataset("sklearn:iris", 0.2, 2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert not torch.equal(a.x_train, c.x_train)


def test_regression_csv_split(regression_csv: Path) -> None:
    split = load_dataset(f"csv:{regression_csv}?target=y", 0.25, 0, data_dir=regression_csv.parent)
    assert split.task == "regression" and split.n_classes is None and split.n_features == 3
    assert split.y_train.dtype == torch.float32 and split.y_train.shape == (150, 1) and split.y_val.shape == (50, 1)
    assert abs(split.y_train.mean().item()) < 1e-4  # targets standardised with train statistics


def test_string_labels_become_class_ids(labelled_csv: Path) -> None:
    split = load_dataset(f"csv:{labelled_csv}?target=species", 0.25, 0, data_dir=labelled_csv.parent)
    assert split.task == "classification" and split.n_classes == 3
    assert set(split.y_train.tolist()) == {0, 1, 2}


def test_task_inference_and_override(tmp_path: Path) -> None:
    rows = [[i * 0.1, i % 4 + 1] for i in range(40)]  # integer target, 4 distinct values
    path = write_csv(tmp_path / "small.csv", ["x", "grade"], rows)
    assert load_dataset(f"csv:{path}?target=grade", 0.25, 0, data_dir=tmp_path).n_classes == 4
    assert load_dataset(f"csv:{path}?target=grade&task=regression", 0.25, 0, data_dir=tmp_path).task == "regression"
    assert load_dataset("csv:small.csv?target=x", 0.25, 0, data_dir=tmp_path).task == "regression"


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("sklearn:mnist", "unknown sklearn dataset 'mnist'"),
        ("parquet:data.pq", "bad dataset ref"),
        ("digits", "bad dataset ref"),
        ("csv:data.csv", "bad dataset ref"),
        ("csv:data.csv?target=y&task=ranking", "unknown task 'ranking'"),
        ("csv:no/such/file.csv?target=y", "CSV file not found"),
        ("csv:/no/such/file.csv?target=y", "outside the data folder"),
    ],
)
def test_bad_refs(ref: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_dataset(ref, 0.2, 0)


def test_missing_target_column(regression_csv: Path) -> None:
    with pytest.raises(ValueError, match="target column 'price' not in .*columns are"):
        load_dataset(f"csv:{regression_csv}?target=price", 0.2, 0, data_dir=regression_csv.parent)


def test_non_numeric_feature_column_is_named(labelled_csv: Path) -> None:
    with pytest.raises(ValueError, match="feature column 'species'"):
        load_dataset(f"csv:{labelled_csv}?target=x1", 0.2, 0, data_dir=labelled_csv.parent)


# --- models and config ------------------------------------------------------------------------


def test_build_network_shapes() -> None:
    digits = load_dataset("sklearn:digits", 0.2, 0)
    mlp = build_network(tiny(), digits)
    cnn = build_network(tiny(model="cnn", params={"channels": 4}), digits)
    assert isinstance(mlp, MLP) and isinstance(cnn, SmallCNN)
    assert mlp(digits.x_val[:5]).shape == cnn(digits.x_val[:5]).shape == (5, 10)


def test_cnn_needs_an_image_dataset() -> None:
    wine = load_dataset("sklearn:wine", 0.2, 0)
    with pytest.raises(ValueError, match=r"model 'cnn' needs an image dataset \(sklearn:digits\)"):
        build_network(tiny(model="cnn", params={}), wine)
    with pytest.raises(ValueError, match="needs an image dataset"):
        fit(tiny(model="cnn", params={}, dataset="sklearn:wine"))


def test_unknown_model_params_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown params for model 'mlp': \['channels'\]"):
        build_network(tiny(params={"channels": 8}), load_dataset("sklearn:iris", 0.2, 0))


def test_config_validation() -> None:
    assert TrainConfig().model == "mlp" and TrainConfig().dataset == "sklearn:digits"
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        TrainConfig(model="resnet")
    with pytest.raises(ValueError, match="unknown device 'tpu'.*val_fraction"):
        TrainConfig(device="tpu", val_fraction=1.5)
