"""The LightningModule: the loss and the per-epoch metrics around a plain network."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F

# Set by Lightning around every hook call, dozens of times a step; plain strings, never parameters or submodules.
_BOOKKEEPING_ATTRS = frozenset({"_current_fx_name"})

_Method = TypeVar("_Method", bound=Callable[..., Any])


def _signed(method: _Method) -> _Method:
    """Store the method's signature on it: Lightning inspects the step methods' every epoch (30 us; stored, 12)."""
    method.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]
    return method


class _RunningMean:
    """A batch-size-weighted mean kept as a tensor, so steps neither sync a GPU nor call `self.log`."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), device=device)
        self.count = 0

    def add(self, batch_mean: Tensor, batch_size: int) -> None:
        self.total += batch_mean.detach().float() * batch_size
        self.count += batch_size

    def value(self) -> Tensor:
        return self.total / self.count


class LitModel(pl.LightningModule):
    """Cross-entropy for classification, MSE for regression; keeps `train_loss`, `val_loss`, `val_acc` per epoch.

    Lean for small models, whose whole step is well under a millisecond: each Lightning batch is
    a whole pass's mini-batches, which the step methods loop over (`fit.WholeEpoch`), so
    Lightning's per-batch machinery runs once an epoch rather than every step; the epoch means are
    kept as tensors and read once per epoch (`epoch_means`) instead of through `self.log`,
    whose result collection costs about a millisecond a call; optimization is manual, which
    skips the closure machinery of automatic optimization (precision plugins still apply, via
    `manual_backward` and the Lightning optimizer).
    """

    def __init__(self, network: nn.Module, task: str, lr: float, weight_decay: float = 0.0):
        super().__init__()
        self.network = network
        self.task = task
        self.lr = lr
        self.weight_decay = weight_decay
        self.automatic_optimization = False
        self._train_loss: _RunningMean | None = None  # (re)made by the epoch-start hooks
        self._val_loss: _RunningMean | None = None
        self._val_acc: _RunningMean | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module's checks for parameters, buffers and submodules cost ~2 us a call.
        if name in _BOOKKEEPING_ATTRS:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def _loss(self, output: Tensor, y: Tensor) -> Tensor:
        if self.task == "classification":
            return F.cross_entropy(output, y)
        return F.mse_loss(output, y)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # `fit` puts the data on the training device once, and a batch is an epoch's lazy mini-batches.
        return batch

    def on_train_epoch_start(self) -> None:
        self._train_loss = _RunningMean(self.device)

    @_signed
    def training_step(self, batches: Iterable[tuple[Tensor, Tensor]], batch_idx: int) -> None:
        """One optimizer step per mini-batch of `batches` (an epoch's, see `fit.WholeEpoch`).

        Under bf16-mixed one autocast region wraps the whole call; Lightning's keeps no cache of
        cast weights, so each step still sees the weights the step before it updated.
        """
        optimizer = self.optimizers()
        for x, y in batches:
            optimizer.zero_grad()
            loss = self._loss(self(x), y)
            self.manual_backward(loss)
            optimizer.step()  # runs the callbacks' on_before_optimizer_step (gradient norms) first
            self._train_loss.add(loss, len(x))

    def on_validation_epoch_start(self) -> None:
        self._val_loss, self._val_acc = _RunningMean(self.device), _RunningMean(self.device)

    @_signed
    def validation_step(self, batches: Iterable[tuple[Tensor, Tensor]], batch_idx: int) -> None:
        for x, y in batches:
            output = self(x)
            self._val_loss.add(self._loss(output, y), len(x))
            if self.task == "classification":
                self._val_acc.add((output.argmax(dim=1) == y).float().mean(), len(x))

    def epoch_means(self) -> dict[str, Tensor | None]:
        """The epoch's `train_loss`, `val_loss`, `val_acc` as 0-d tensors; None if none was seen (or regression)."""
        def mean(running: _RunningMean | None) -> Tensor | None:
            return running.value() if running is not None and running.count else None

        return {"train_loss": mean(self._train_loss), "val_loss": mean(self._val_loss),
                "val_acc": mean(self._val_acc) if self.task == "classification" else None}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
