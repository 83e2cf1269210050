"""`fit`: one training run, configured lean for a sweep trial, reporting metrics epoch by epoch."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, TensorDataset

from trainers.callbacks import EpochHook, EpochMetricsCallback
from trainers.config import TrainConfig
from trainers.data import DataSplit, load_dataset
from trainers.models import build_network
from trainers.module import LitModel

_LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric")


@dataclass
class FitResult:
    """What a run produced: one metrics dict per epoch run, whether the hook stopped it, its wall time."""

    epochs: list[dict[str, float | int | None]] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0


def fit(config: TrainConfig, on_epoch_end: EpochHook | None = None, split: DataSplit | None = None,
        norms: bool = True) -> FitResult:
    """Train `config` and return its per-epoch metrics.

    `on_epoch_end` sees each epoch's metrics as the epoch ends; returning True stops the
    run after that epoch (`stopped_early`). `split` skips loading the dataset again.
    `norms=False` leaves out the gradient and weight norms the diagnosis reads (they are
    NaN then); the diagnosis benchmark uses it to measure what collecting them costs.
    Exceptions from data, model or training propagate to the caller.
    """
    started = time.perf_counter()
    with _quiet_lightning():
        pl.seed_everything(config.seed, workers=False, verbose=False)
        if split is None:
            split = load_dataset(config.dataset, config.val_fraction, config.seed)
        module = LitModel(build_network(config, split), split.task, config.lr, config.weight_decay)
        train_loader, val_loader = make_loaders(split, config.batch_size, config.seed)
        metrics = EpochMetricsCallback(on_epoch_end, norms=norms)
        accelerator = _accelerator(config.device)
        trainer = pl.Trainer(
            max_epochs=config.epochs,
            accelerator=accelerator,
            devices=1,
            precision=_precision(accelerator),
            callbacks=[metrics],
            enable_checkpointing=False,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            deterministic=False,
        )
        trainer.fit(module, train_loader, val_loader)
    return FitResult(epochs=metrics.epochs, stopped_early=metrics.stopped_early,
                     seconds=time.perf_counter() - started)


def make_loaders(split: DataSplit, batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """Train loader shuffled by its own seeded generator (same order for the same seed), val in order."""
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(split.x_train, split.y_train), batch_size=batch_size, shuffle=True,
                       generator=generator, num_workers=0)
    val = DataLoader(TensorDataset(split.x_val, split.y_val), batch_size=batch_size, shuffle=False, num_workers=0)
    return train, val


def _accelerator(device: str) -> str:
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if device == "cuda" else "cpu"


def _precision(accelerator: str) -> str:
    if accelerator == "gpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Mute Lightning's info banners and its dataloader hints for one run.

    A sweep runs many trials; their output should hold results and real warnings only.
    Levels and filters are restored afterwards, so the caller's logging setup is untouched.
    """
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=PossibleUserWarning)
            # Lightning's own use of an API newer torch deprecates; nothing a caller can act on.
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
