"""Per-epoch metrics for the convergence diagnosis, and the hook that lets a sweep stop a run early."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from converge.trainers.module import LitModel

EpochHook = Callable[[dict[str, float | int | None]], bool]


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    """Each tensor's L2 norm, in one fused call where torch has it (what `clip_grad_norm_` uses)."""
    return list(torch._foreach_norm(tensors)) if hasattr(torch, "_foreach_norm") else [t.norm(2) for t in tensors]


def global_norm(tensors: Iterable[Tensor]) -> Tensor:
    """L2 norm of all tensors taken together, as a 0-d tensor (no device sync)."""
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return torch.tensor(float("nan"))
    return torch.linalg.vector_norm(torch.stack([n.float() for n in _norms(tensors)]))


def gradient_norm(network: nn.Module) -> Tensor:
    """Global L2 norm of the gradients the next optimizer step will apply."""
    return global_norm(p.grad for p in network.parameters() if p.grad is not None)


class EpochMetricsCallback(pl.Callback):
    """Records one metrics dict per epoch and passes it to `on_epoch_end`; a True answer stops training.

    It runs at `on_train_epoch_end`, which Lightning 2.x calls after the epoch's validation
    pass, so each dict carries that epoch's `val_loss` and `val_acc` (read from `LitModel.epoch_means`).
    """

    def __init__(self, on_epoch_end: EpochHook | None = None, norms: bool = True):
        self.on_epoch_end = on_epoch_end
        self.norms = norms  # gradient and weight norms: off only to measure what they cost
        self.epochs: list[dict[str, float | int | None]] = []
        self.stopped_early = False
        self._started = 0.0
        self._params: list[nn.Parameter] = []
        self._step_norms: list[list[Tensor]] = []  # per step: each gradient tensor's norm

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        self._params = [p for p in pl_module.parameters() if p.requires_grad]
        self._step_norms = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self.norms:
            return
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            # One fused op per step, kept on the device (no GPU sync); combined into global norms
            # once, at the epoch's end. Every op counts: a small model's step is well under a millisecond.
            self._step_norms.append(_norms(grads))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: LitModel) -> None:
        means = pl_module.epoch_means()
        grad_norm = _mean_global_norm(self._step_norms)
        metrics: dict[str, float | int | None] = {
            "epoch": trainer.current_epoch,
            "train_loss": _float(means["train_loss"]),
            "val_loss": _float(means["val_loss"]),
            "val_acc": _float(means["val_acc"]) if pl_module.task == "classification" else None,
            "grad_norm": grad_norm,
            "param_norm": _float(global_norm(pl_module.parameters())) if self.norms else math.nan,
            "lr": float(trainer.optimizers[0].param_groups[0]["lr"]),
        }
        metrics["epoch_seconds"] = time.perf_counter() - self._started  # after the syncs above: GPU work included
        self.epochs.append(metrics)
        if self.on_epoch_end is not None and self.on_epoch_end(dict(metrics)):
            self.stopped_early = True
            trainer.should_stop = True


def _mean_global_norm(step_norms: list[list[Tensor]]) -> float:
    """The mean over steps of each step's global gradient norm, from the per-tensor norms."""
    if not step_norms:
        return math.nan
    if len({len(norms) for norms in step_norms}) == 1:  # the usual case: one stack for the whole epoch
        per_tensor = torch.stack([n for norms in step_norms for n in norms]).float().view(len(step_norms), -1)
        return _float(torch.linalg.vector_norm(per_tensor, dim=1).mean())
    return _float(torch.stack([torch.linalg.vector_norm(torch.stack(norms).float()) for norms in step_norms]).mean())


def _float(value: Any) -> float:
    """A plain float; a missing metric reads as NaN, so a dict always has every key."""
    if value is None:
        return math.nan
    return float(value.item() if isinstance(value, Tensor) else value)


# Keys of the standard per-epoch dict; any other metric a user's module logs is added under its own name.
STANDARD_KEYS = ("epoch", "train_loss", "val_loss", "val_acc", "grad_norm", "param_norm", "lr")


class ModuleMetricsCallback(pl.Callback):
    """The per-epoch metrics of any LightningModule, from what it logs and what it optimizes.

    - `train_loss`: the mean of the losses its `training_step` returned (automatic
      optimization); when it returns none (manual optimization), what it logged as
      `train_loss` (or `loss`).
    - every other metric it logged (`self.log`) at the epoch's end, under its own name
      (`val_loss_epoch` as `val_loss` when only the suffixed name exists): the objective,
      `val_loss`, `val_acc`, `val_f1`, ...
    - `grad_norm`: the mean over optimizer steps of the global L2 norm of the gradients the
      step applies, whichever optimizer steps (several optimizers included);
      `param_norm`: the global L2 norm of the module's trainable parameters at the epoch's end;
      `lr`: the learning rate of the first optimizer's first parameter group at its last step of
      the epoch (what the epoch trained with, before an epoch-interval scheduler's step).

    `context` goes into each checkpoint as `checkpoint["converge"]`, so a checkpoint says
    which factories and hyperparameters built it (`trainers.plugins.load_checkpoint`).
    """

    def __init__(self, on_epoch_end: EpochHook | None = None, context: dict[str, Any] | None = None):
        self.on_epoch_end = on_epoch_end
        self.context = context
        self.epochs: list[dict[str, float | int | None]] = []
        self.stopped_early = False
        self._started = 0.0
        self._losses: list[Tensor] = []
        self._step_norms: list[list[Tensor]] = []
        self._lr = math.nan

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        self._losses = []
        self._step_norms = []
        self._lr = math.nan

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().float().reshape(()))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            self._step_norms.append(_norms(grads))
        first = trainer.optimizers[0] if trainer.optimizers else None
        if getattr(optimizer, "_optimizer", optimizer) is getattr(first, "_optimizer", first):
            self._lr = float(optimizer.param_groups[0]["lr"])  # what this step used, before any scheduler step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logged = logged_metrics(trainer)
        if self._losses:
            train_loss = _float(torch.stack(self._losses).mean())
        else:
            train_loss = logged.get("train_loss", logged.get("loss", math.nan))
        optimizers = trainer.optimizers
        metrics: dict[str, float | int | None] = {
            "epoch": trainer.current_epoch,
            "train_loss": train_loss,
            "val_loss": logged.get("val_loss"),
            "val_acc": logged.get("val_acc"),
            "grad_norm": _mean_global_norm(self._step_norms),
            "param_norm": _float(global_norm(p for p in pl_module.parameters() if p.requires_grad)),
            "lr": self._lr if math.isfinite(self._lr) or not optimizers else float(optimizers[0].param_groups[0]["lr"]),
        }
        for name, value in logged.items():
            if name not in metrics:
                metrics[name] = value
        metrics["epoch_seconds"] = time.perf_counter() - self._started
        self.epochs.append(metrics)
        if self.on_epoch_end is not None and self.on_epoch_end(dict(metrics)):
            self.stopped_early = True
            trainer.should_stop = True

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.context is not None:
            checkpoint["converge"] = dict(self.context)


def logged_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """Every scalar the module logged, as floats: `NAME_epoch` as NAME where NAME itself is absent,
    `NAME_step` left out (a single step's value, not the epoch's)."""
    found: dict[str, float] = {}
    for name, value in trainer.callback_metrics.items():
        if isinstance(value, Tensor) and value.numel() != 1:
            continue
        if name.endswith("_step"):
            continue
        found[name] = _float(value)
    for name in [n for n in found if n.endswith("_epoch")]:
        found.setdefault(name.removesuffix("_epoch"), found[name])
        del found[name]
    return found
