"""A small CNN on a generated image data set: noisy squares, discs and crosses (3 classes).

Offline and deterministic (the images are drawn from `seed`). At its defaults (24,000 images of
32x32, 3 channels) one epoch is a few seconds on a GPU, so a trial of 5 to 15 epochs takes tens
of seconds: Converge's GPU reference workload. Tests shrink it through `task.params`.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

CLASSES = ("square", "disc", "cross")


def make_images(n: int, size: int, seed: int) -> TensorDataset:
    """`n` images of `size`x`size`, 3 channels: one shape each, at a random place, scale and colour, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    radius = size * (0.15 + 0.2 * torch.rand(n, 1, 1, generator=g))
    cy = size * (0.3 + 0.4 * torch.rand(n, 1, 1, generator=g))
    cx = size * (0.3 + 0.4 * torch.rand(n, 1, 1, generator=g))
    dy, dx = (ys - cy).abs(), (xs - cx).abs()
    square = (dy < radius) & (dx < radius)
    disc = dy ** 2 + dx ** 2 < radius ** 2
    cross = ((dy < radius / 3) & (dx < radius)) | ((dx < radius / 3) & (dy < radius))
    masks = torch.stack([square, disc, cross], dim=1)[torch.arange(n), labels].float()
    colour = 0.5 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    images = masks[:, None] * colour + 0.3 * torch.randn(n, 3, size, size, generator=g)
    return TensorDataset(images, labels)


def build_data(batch_size: int, seed: int, n_images: int = 24_000, size: int = 32) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders: 80% / 20% of the generated images."""
    images = make_images(n_images, size, seed)
    n_train = int(0.8 * n_images)
    train = TensorDataset(*(t[:n_train] for t in images.tensors))
    val = TensorDataset(*(t[n_train:] for t in images.tensors))
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)),
            DataLoader(val, batch_size=512))


class ShapesCNN(pl.LightningModule):
    def __init__(self, lr: float, weight_decay: float, dropout: float, channels: int = 32):
        super().__init__()
        self.save_hyperparameters()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.BatchNorm2d(4 * c), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * c, len(CLASSES)),
        )

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
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def build_model(lr: float, weight_decay: float, dropout: float, channels: int = 32) -> ShapesCNN:
    return ShapesCNN(lr, weight_decay, dropout, channels)
