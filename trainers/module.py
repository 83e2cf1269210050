"""The LightningModule: the loss and the per-epoch metrics around a plain network."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F


class _RunningMean:
    """A batch-size-weighted mean kept as a tensor, so steps neither sync a GPU nor call `self.log`."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), device=device)
        self.count = 0

    def add(self, batch_mean: Tensor, batch_size: int) -> None:
        self.total += batch_mean.detach().float() * batch_size
        self.count += batch_size

    def value(self) -> Tensor:
        return self.total / max(self.count, 1)


class LitModel(pl.LightningModule):
    """Cross-entropy for classification, MSE for regression; logs `train_loss`, `val_loss`, `val_acc` per epoch.

    Each metric is logged once per epoch, as a mean weighted by batch size: a `self.log`
    call costs about a millisecond in Lightning 2.x, as much as a small model's whole step.
    """

    _train_loss: _RunningMean  # (re)made by the epoch-start hooks
    _val_loss: _RunningMean
    _val_acc: _RunningMean

    def __init__(self, network: nn.Module, task: str, lr: float, weight_decay: float = 0.0):
        super().__init__()
        self.network = network
        self.task = task
        self.lr = lr
        self.weight_decay = weight_decay

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def _loss(self, output: Tensor, y: Tensor) -> Tensor:
        if self.task == "classification":
            return F.cross_entropy(output, y)
        return F.mse_loss(output, y)

    def on_train_epoch_start(self) -> None:
        self._train_loss = _RunningMean(self.device)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self._loss(self(x), y)
        self._train_loss.add(loss, len(x))
        # Logged at the last batch, not in on_train_epoch_end: callbacks' on_train_epoch_end runs before the module's.
        if batch_idx == self.trainer.num_training_batches - 1:
            self.log("train_loss", self._train_loss.value(), on_step=False, on_epoch=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_loss, self._val_acc = _RunningMean(self.device), _RunningMean(self.device)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        output = self(x)
        self._val_loss.add(self._loss(output, y), len(x))
        if self.task == "classification":
            self._val_acc.add((output.argmax(dim=1) == y).float().mean(), len(x))

    def on_validation_epoch_end(self) -> None:
        self.log("val_loss", self._val_loss.value())
        if self.task == "classification":
            self.log("val_acc", self._val_acc.value())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
