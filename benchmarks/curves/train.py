"""One plain-PyTorch training run, measured per epoch exactly like the product's metrics callback.

`train_loss` is the batch-size-weighted mean of the epoch's minibatch losses (train mode);
`val_loss`/`val_acc` come from the validation split after the epoch (eval mode); `grad_norm` is the
mean over the epoch's optimizer steps of the global L2 gradient norm taken just before
`optimizer.step()` and before any clipping; `param_norm` is the global L2 norm of the parameters at
epoch end; `lr` is `param_groups[0]["lr"]`. A run stops after the first epoch whose loss is not finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import VAR_MIN, Data, load

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run: two equal specs give identical histories."""

    dataset: str
    optimizer: str
    lr: float
    batch_size: int
    epochs: int  # configured epochs: the history's `max_epochs`
    seed: int
    width: int = 64
    depth: int = 2  # hidden layers; 0 is a linear model
    activation: str = "relu"
    dropout: float = 0.0
    weight_decay: float = 0.0
    loss: str = "default"  # default (cross-entropy / MSE on standardised targets), mse_raw, gnll
    n_train: int | None = None  # train on a subset of this many rows
    init_std: float | None = None  # normal init of every weight with this std (default: PyTorch's)
    bias: bool = True
    clip: float | None = None  # clip_grad_norm_ to this after measuring the norm
    stop_after: int | None = None  # the run is stopped (e.g. pruned) after this many epochs
    warmup: int = 0  # linear warmup: the lr ramps from lr/100 to lr over this many epochs
    cosine: bool = False  # cosine decay from lr to lr/100 over the configured epochs

    def model_name(self) -> str:
        if self.depth == 0:
            return "linear"
        return f"mlp-{self.depth}x{self.width}-{self.activation}"

    def config(self) -> dict:
        """The record's `config`: the hyperparameters a sweep would have set, plus the model's shape."""
        cfg = {"lr": self.lr, "batch_size": self.batch_size, "epochs": self.epochs, "weight_decay": self.weight_decay,
               "dropout": self.dropout, "model": self.model_name(), "seed": self.seed, "loss": self.loss}
        optional = {"n_train": self.n_train, "init_std": self.init_std, "clip_grad_norm": self.clip,
                    "stopped_after": self.stop_after, "warmup_epochs": self.warmup or None,
                    "lr_schedule": "cosine" if self.cosine else None, "bias": False if not self.bias else None}
        return cfg | {k: v for k, v in optional.items() if v is not None}


def build_model(spec: RunSpec, n_in: int, n_out: int) -> nn.Module:
    """An MLP of `depth` hidden layers (Linear, activation, Dropout) and a linear head."""
    layers: list[nn.Module] = []
    size = n_in
    for _ in range(spec.depth):
        layers += [nn.Linear(size, spec.width, bias=spec.bias), ACTIVATIONS[spec.activation]()]
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        size = spec.width
    layers.append(nn.Linear(size, n_out, bias=spec.bias))
    model = nn.Sequential(*layers)
    if spec.init_std is not None:
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=spec.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return model


def make_optimizer(spec: RunSpec, params) -> torch.optim.Optimizer:
    wd = spec.weight_decay
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=wd)
    if spec.optimizer == "momentum":
        return torch.optim.SGD(params, lr=spec.lr, momentum=0.9, weight_decay=wd)
    if spec.optimizer == "nesterov":
        return torch.optim.SGD(params, lr=spec.lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=wd)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=wd)
    if spec.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=spec.lr, weight_decay=wd)
    if spec.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=spec.lr, weight_decay=wd)
    raise ValueError(f"unknown optimizer {spec.optimizer!r}")


class Objective:
    """The training loss of a run and its scale: raw-target MSE is in the thousands, Gaussian NLL can be < 0."""

    def __init__(self, spec: RunSpec, data: Data):
        self.kind = "ce" if data.task == "classification" else spec.loss if spec.loss != "default" else "mse"
        self.scale = data.y_std if self.kind == "mse_raw" else 1.0
        self.shift = data.y_mean if self.kind == "mse_raw" else 0.0
        self.n_out = data.n_classes if self.kind == "ce" else 2 if self.kind == "gnll" else 1

    def __call__(self, out: Tensor, y: Tensor) -> Tensor:
        if self.kind == "ce":
            return F.cross_entropy(out, y)
        if self.kind == "gnll":
            return F.gaussian_nll_loss(out[:, 0], y, F.softplus(out[:, 1]) + VAR_MIN, full=True)
        return F.mse_loss(out[:, 0], y * self.scale + self.shift)


def lr_at(spec: RunSpec, epoch: int) -> float:
    """The epoch's lr: an optional linear warmup from lr/100, then constant or a cosine decay to lr/100."""
    if epoch < spec.warmup:
        return spec.lr * (0.01 + 0.99 * epoch / spec.warmup)
    if spec.cosine:
        return spec.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * epoch / spec.epochs)))
    return spec.lr


def _global_norm(tensors) -> float:
    norms = [t.detach().norm(2) for t in tensors]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else math.nan


def train(spec: RunSpec) -> list[dict]:
    """Train `spec` and return its per-epoch metrics (floats; non-finite values are kept as floats here)."""
    torch.manual_seed(spec.seed)
    data = load(spec.dataset)
    if spec.n_train is not None:
        data = data.subset(spec.n_train, spec.seed)
    objective = Objective(spec, data)
    model = build_model(spec, data.n_features, objective.n_out)
    if objective.kind == "mse_raw" and spec.bias:  # start at the target mean, as one would for raw targets
        with torch.no_grad():
            model[-1].bias.fill_(data.y_mean)
    optimizer = make_optimizer(spec, model.parameters())
    gen = torch.Generator().manual_seed(spec.seed)
    n = len(data.x_train)
    epochs = []
    for epoch in range(spec.stop_after or spec.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(spec, epoch)
        model.train()
        loss_sum, grad_sum, steps = 0.0, 0.0, 0
        for idx in torch.randperm(n, generator=gen).split(spec.batch_size):
            loss = objective(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_sum += _global_norm(p.grad for p in model.parameters() if p.grad is not None)
            steps += 1
            if spec.clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), spec.clip)
            optimizer.step()
            loss_sum += float(loss.detach()) * len(idx)
        row = {"epoch": epoch, "train_loss": loss_sum / n, **_evaluate(model, data, objective),
               "grad_norm": grad_sum / steps, "param_norm": _global_norm(model.parameters()),
               "lr": float(optimizer.param_groups[0]["lr"])}
        epochs.append(row)
        if not (math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])):
            break
    return epochs


@torch.no_grad()
def _evaluate(model: nn.Module, data: Data, objective: Objective) -> dict:
    model.eval()
    out = model(data.x_val)
    metrics = {"val_loss": float(objective(out, data.y_val))}
    if objective.kind == "ce":
        metrics["val_acc"] = float((out.argmax(1) == data.y_val).float().mean())
    return metrics
