"""`fit`: one training run, configured lean for a sweep trial, reporting metrics epoch by epoch."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.profilers import PassThroughProfiler

from converge.trainers.callbacks import EpochHook, EpochMetricsCallback
from converge.trainers.config import TrainConfig
from converge.trainers.data import DataSplit, load_dataset
from converge.trainers.models import build_network
from converge.trainers.module import LitModel
from converge.trainers.plugins import fit_plugin
from converge.trainers.quiet import quiet_lightning


@dataclass
class FitResult:
    """What a run produced: one metrics dict per epoch run, whether the hook stopped it, its wall time."""

    epochs: list[dict[str, float | int | None]] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0
    device: str = "cpu"  # where it trained: "cpu" or the GPU's name
    precision: str = "32-true"  # Lightning's precision: "bf16-mixed" on a GPU that supports it


def fit(config: TrainConfig, on_epoch_end: EpochHook | None = None, split: DataSplit | None = None,
        norms: bool = True, checkpoint_path: str | Path | None = None) -> FitResult:
    """Train `config` and return its per-epoch metrics.

    `on_epoch_end` sees each epoch's metrics as the epoch ends; returning True stops the
    run after that epoch (`stopped_early`). `split` skips loading the dataset again.
    `norms=False` leaves out the gradient and weight norms the diagnosis reads (they are
    NaN then); the diagnosis benchmark uses it to measure what collecting them costs.
    Exceptions from data, model or training propagate to the caller. `checkpoint_path`: the
    trained module is saved there (Lightning's checkpoint format) when the run ends.

    A user's task (`config.data` set) trains their own LightningModule and data through
    `trainers.plugins.fit_plugin`, in full precision, with `ModuleMetricsCallback`.
    """
    started = time.perf_counter()
    if config.is_plugin:
        accelerator = _accelerator(config.device)
        with quiet_lightning():
            epochs, stopped = fit_plugin(config, on_epoch_end, accelerator, checkpoint_path)
        device = torch.cuda.get_device_name() if accelerator == "gpu" else "cpu"
        return FitResult(epochs=epochs, stopped_early=stopped, device=device, precision="32-true",
                         seconds=time.perf_counter() - started)
    with quiet_lightning():
        pl.seed_everything(config.seed, workers=False, verbose=False)
        if split is None:
            split = load_dataset(config.dataset, config.val_fraction, config.seed, data_dir=config.data_dir,
                                 max_bytes=config.max_data_bytes)
        module = LitModel(build_network(config, split), split.task, config.lr, config.weight_decay)
        accelerator = _accelerator(config.device)
        precision = _precision(accelerator)
        train_loader, val_loader = make_loaders(split, config.batch_size, config.seed,
                                                device="cuda" if accelerator == "gpu" else "cpu")
        metrics = EpochMetricsCallback(on_epoch_end, norms=norms)
        trainer = pl.Trainer(
            max_epochs=config.epochs,
            accelerator=accelerator,
            devices=1,
            precision=precision,
            callbacks=[metrics],
            enable_checkpointing=False,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            deterministic=False,
            profiler=_Unprofiled(),
        )
        trainer.fit(module, WholeEpoch(train_loader), WholeEpoch(val_loader))
        if checkpoint_path is not None:
            trainer.save_checkpoint(checkpoint_path)
    device = torch.cuda.get_device_name() if accelerator == "gpu" else "cpu"
    return FitResult(epochs=metrics.epochs, stopped_early=metrics.stopped_early, device=device, precision=precision,
                     seconds=time.perf_counter() - started)


class TensorBatches:
    """Batches of in-memory tensors taken by index: one gather per batch, no per-sample collation.

    A `DataLoader` over a `TensorDataset` indexes and re-stacks every sample, which costs more
    than a small model's whole step. The tensors stay where they are (on the training device,
    see `fit`); shuffling draws one permutation per epoch from the batches' own seeded generator,
    so the same seed gives the same order.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int = 0):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        if not self.shuffle:
            for start in range(0, n, self.batch_size):
                yield self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]
            return
        order = torch.randperm(n, generator=self.generator).to(self.x.device)
        for start in range(0, n, self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.x[index], self.y[index]


class WholeEpoch:
    """`batches` handed to Lightning as one batch per pass: an iterator over all its mini-batches.

    Lightning's per-batch machinery (fetcher, hooks, progress tracking) costs more than a small
    model's whole step; with the pass as its unit, it runs once an epoch, and `LitModel`'s steps
    loop over the mini-batches themselves. They are `batches`' own, gathered one at a time as the
    step reaches them: the same mini-batches, order and seeded shuffles as iterating `batches`.
    """

    def __init__(self, batches: TensorBatches):
        self.batches = batches

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        yield iter(self.batches)


def make_loaders(split: DataSplit, batch_size: int, seed: int,
                 device: torch.device | str = "cpu") -> tuple[TensorBatches, TensorBatches]:
    """Train batches shuffled by their own seeded generator (same order for the same seed), val in order.

    The split's tensors are moved to `device` once, here, rather than batch by batch.
    """
    def on(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    train = TensorBatches(on(split.x_train), on(split.y_train), batch_size, shuffle=True, seed=seed)
    val = TensorBatches(on(split.x_val), on(split.y_val), batch_size, shuffle=False)
    return train, val


class _Unprofiled(PassThroughProfiler):
    """Lightning's default no-op profiler without its per-call generator: Lightning enters it ~30 times a step."""

    _NOTHING = nullcontext()

    def profile(self, action_name: str) -> AbstractContextManager[None]:
        return self._NOTHING


def _accelerator(device: str) -> str:
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if device == "cuda" else "cpu"


def _precision(accelerator: str) -> str:
    if accelerator == "gpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"
