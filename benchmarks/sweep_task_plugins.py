"""Plug-in tasks for `benchmarks/sweep_trials.py`: the awkward data a user brings that the built-in
datasets never show (they standardise features and targets).

- `raw_diabetes`: sklearn's diabetes with its target left in its own units (mean about 150, sd
  about 77): the untrained loss is tens of thousands and the output bias must travel far;
- `many_classes`: 26 classes from `make_classification`, features left unscaled (each multiplied
  by a factor between 0.1 and 30), as a CSV export often is;
- `slow_starter`: 4 classes, 2,400 rows, features unscaled (factors 0.1 to 100): the loss barely
  moves for the first epochs at most learning rates (`benchmarks/sweep_efficiency.py`'s slow starter).

Each factory takes what a Converge plug-in is offered (`lr`, `weight_decay`, `dropout`;
`batch_size`, `seed`) and the model logs `train_loss`, `val_loss` (and `val_acc`).
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn import datasets
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

N_CLASSES = 26


def _loaders(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders of a 75/25 split drawn by `seed`."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = len(x) // 4
    val, train = order[:n_val], order[n_val:]
    as_y = torch.int64 if y.dtype.kind in "iu" else torch.float32
    xs, ys = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=as_y)
    return (DataLoader(TensorDataset(xs[train], ys[train]), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed)),
            DataLoader(TensorDataset(xs[val], ys[val]), batch_size=1024))


def build_raw_diabetes(batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    x, y = datasets.load_diabetes(return_X_y=True)  # sklearn ships the features already scaled
    return _loaders(x / x.std(axis=0), y.reshape(-1, 1), batch_size, seed)


def build_many_classes(batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    x, y = datasets.make_classification(n_samples=3000, n_features=30, n_informative=20, n_redundant=4,
                                        n_classes=N_CLASSES, n_clusters_per_class=1, class_sep=2.0, random_state=0)
    scales = 10 ** np.random.default_rng(0).uniform(-1, 1.5, size=x.shape[1])
    return _loaders(x * scales, y.astype(np.int64), batch_size, seed)


def build_slow_starter(batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    x, y = datasets.make_classification(n_samples=2400, n_features=20, n_informative=10, n_redundant=4,
                                        n_classes=4, n_clusters_per_class=2, class_sep=1.0, random_state=1)
    scales = 10 ** np.random.default_rng(1).uniform(-1, 2, size=x.shape[1])
    return _loaders(x * scales + 5.0 * scales, y.astype(np.int64), batch_size, seed)


class _Net(pl.LightningModule):
    def __init__(self, n_inputs: int, n_outputs: int, lr: float, weight_decay: float, dropout: float,
                 hidden: int = 128):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(n_inputs, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, y) if self.hparams.n_outputs == 1 else F.cross_entropy(out, y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self._loss(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self.log("val_loss", self._loss(out, y))
        if self.hparams.n_outputs > 1:
            self.log("val_acc", (out.argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def build_regressor(lr: float, weight_decay: float, dropout: float) -> _Net:
    return _Net(10, 1, lr, weight_decay, dropout, hidden=64)


def build_classifier(lr: float, weight_decay: float, dropout: float) -> _Net:
    return _Net(30, N_CLASSES, lr, weight_decay, dropout)


def build_four_classes(lr: float, weight_decay: float, dropout: float) -> _Net:
    return _Net(20, 4, lr, weight_decay, dropout, hidden=64)
