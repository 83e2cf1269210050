"""Tabular regression: an MLP and its own LightningDataModule reading a CSV file.

The CSV (`data/houses.csv` by default, `csv_path` in `task.params` otherwise) has numeric
feature columns and a `target` column; the DataModule splits it by `seed`, standardises the
features and the target with the training rows' statistics, and serves both splits.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

DEFAULT_CSV = Path(__file__).parent / "data" / "houses.csv"


class CSVRegressionData(pl.LightningDataModule):
    def __init__(self, csv_path: str | Path, batch_size: int, seed: int, target: str = "target",
                 val_fraction: float = 0.2):
        super().__init__()
        self.csv_path, self.batch_size, self.seed = Path(csv_path), batch_size, seed
        self.target, self.val_fraction = target, val_fraction

    def setup(self, stage: str | None = None) -> None:
        with self.csv_path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or self.target not in rows[0]:
            raise ValueError(f"{self.csv_path}: no rows, or no {self.target!r} column")
        features = [name for name in rows[0] if name != self.target]
        x = torch.tensor([[float(row[name]) for name in features] for row in rows])
        y = torch.tensor([float(row[self.target]) for row in rows])[:, None]
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_val = max(1, int(len(x) * self.val_fraction))
        val, train = order[:n_val], order[n_val:]
        mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-8)
        y_mean, y_std = y[train].mean(), y[train].std().clamp(min=1e-8)
        x, y = (x - mean) / std, (y - y_mean) / y_std
        self.n_features = x.shape[1]
        self.train_set, self.val_set = TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1024)


class Regressor(pl.LightningModule):
    def __init__(self, lr: float, weight_decay: float, dropout: float, n_features: int = 6, hidden: int = 64):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        prediction = self(x)
        self.log("val_loss", F.mse_loss(prediction, y))
        self.log("val_mae", (prediction - y).abs().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def build_model(lr: float, weight_decay: float, dropout: float, hidden: int = 64, n_features: int = 6) -> Regressor:
    return Regressor(lr, weight_decay, dropout, n_features=n_features, hidden=hidden)


def build_data(batch_size: int, seed: int, csv_path: str | None = None) -> CSVRegressionData:
    return CSVRegressionData(csv_path or DEFAULT_CSV, batch_size, seed)
