"""User-style LightningModules and data factories for the plug-in tests (tests/test_plugins.py).

Importable as `converge_test_plugins` from the tests directory (pytest puts it on sys.path; a
worker subprocess gets it through PYTHONPATH).
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


def _blobs(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=generator)
    x = torch.randn(n, 4, generator=generator) + y[:, None].float() * 1.5
    return TensorDataset(x, y)


def build_data(batch_size: int, seed: int, n: int = 192) -> tuple[DataLoader, DataLoader]:
    """(train, val) dataloaders of two Gaussian blobs in 4 dimensions."""
    train, val = _blobs(n, seed), _blobs(n // 3, seed + 1)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)),
            DataLoader(val, batch_size=batch_size))


class BlobsData(pl.LightningDataModule):
    def __init__(self, batch_size: int, seed: int):
        super().__init__()
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self) -> DataLoader:
        return build_data(self.batch_size, self.seed)[0]

    def val_dataloader(self) -> DataLoader:
        return build_data(self.batch_size, self.seed)[1]


def build_datamodule(batch_size: int, seed: int) -> BlobsData:
    return BlobsData(batch_size, seed)


def _f1(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    predicted = logits.argmax(dim=1)
    tp = ((predicted == 1) & (y == 1)).sum().float()
    return 2 * tp / ((predicted == 1).sum() + (y == 1).sum()).clamp(min=1).float()


class Classifier(pl.LightningModule):
    """A plain user module: automatic optimization, AdamW and a cosine schedule, logs its losses and val_f1."""

    def __init__(self, lr: float, weight_decay: float, dropout: float, hidden: int = 16, log_objective: bool = True):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        if self.hparams.log_objective:
            self.log("val_loss", F.cross_entropy(logits, y))
            self.log("val_f1", _f1(logits, y))
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10)}


def build_model(lr: float, weight_decay: float, dropout: float, hidden: int = 16) -> Classifier:
    return Classifier(lr, weight_decay, dropout, hidden)


def forgets_objective(lr: float, weight_decay: float, dropout: float) -> Classifier:
    """A module that logs val_acc but never val_loss or val_f1."""
    return Classifier(lr, weight_decay, dropout, log_objective=False)


def raises(**hyperparameters: float) -> pl.LightningModule:
    raise RuntimeError("this factory needs a GPU cluster")


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers (an SGD encoder, an Adam head) and a StepLR on the first."""

    def __init__(self, lr: float):
        super().__init__()
        self.automatic_optimization = False
        self.lr = lr
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        encoder_opt, head_opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        encoder_opt.zero_grad()
        head_opt.zero_grad()
        self.manual_backward(loss)
        encoder_opt.step()
        head_opt.step()
        self.log("train_loss", loss, on_epoch=True, on_step=False)

    def on_train_epoch_end(self) -> None:
        self.lr_schedulers().step()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> tuple[list, list]:
        encoder_opt = torch.optim.SGD(self.encoder.parameters(), lr=self.lr)
        head_opt = torch.optim.Adam(self.head.parameters(), lr=self.lr / 10)
        return [encoder_opt, head_opt], [torch.optim.lr_scheduler.StepLR(encoder_opt, step_size=1, gamma=0.5)]


def two_optimizers(lr: float) -> TwoOptimizers:
    return TwoOptimizers(lr)


class Diverges(Classifier):
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", math.nan)


def diverges(lr: float, weight_decay: float, dropout: float) -> Diverges:
    return Diverges(lr, weight_decay, dropout)
