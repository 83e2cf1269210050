"""What does `trainers.fit` (PyTorch Lightning) cost over a hand-written PyTorch loop?

Both sides train the reference MLP on the same sklearn:digits tensors with the same
network class, init seed, AdamW, batch size, epochs, per-epoch validation and per-step
gradient-norm measurement, on CPU, so the ratio is the framework's overhead alone.

    .venv/bin/python benchmarks/trainer_overhead.py [--reps 5] [--epochs 10] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from trainers import DataSplit, TrainConfig, fit, load_dataset
from trainers.callbacks import global_norm, gradient_norm
from trainers.fit import make_loaders
from trainers.models import build_network


def reference_config(epochs: int, batch_size: int) -> TrainConfig:
    return TrainConfig(model="mlp", dataset="sklearn:digits", params={"width": 128, "depth": 2}, dropout=0.1,
                       lr=1e-3, epochs=epochs, batch_size=batch_size, seed=0, device="cpu")


def run_converge(config: TrainConfig, split: DataSplit) -> tuple[float, float]:
    started = time.perf_counter()
    result = fit(config, split=split)
    return time.perf_counter() - started, float(result.epochs[-1]["val_loss"])


def run_plain(config: TrainConfig, split: DataSplit) -> tuple[float, float]:
    """The same work as `fit`, minus Lightning: train, grad norm per step, validate and take norms per epoch."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    network = build_network(config, split)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    train_loader, val_loader = make_loaders(split, config.batch_size, config.seed)
    epochs = []
    for epoch in range(config.epochs):
        network.train()
        loss_sum, grad_norm_sum, steps = torch.zeros(()), torch.zeros(()), 0
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(network(x), y)
            loss.backward()
            grad_norm_sum += gradient_norm(network)
            optimizer.step()
            loss_sum += loss.detach() * len(x)
            steps += 1
        network.eval()
        val_sum, correct = torch.zeros(()), torch.zeros(())
        with torch.inference_mode():
            for x, y in val_loader:
                output = network(x)
                val_sum += F.cross_entropy(output, y) * len(x)
                correct += (output.argmax(dim=1) == y).sum()
        epochs.append({
            "epoch": epoch,
            "train_loss": float(loss_sum) / len(split.y_train),
            "val_loss": float(val_sum) / len(split.y_val),
            "val_acc": float(correct) / len(split.y_val),
            "grad_norm": float(grad_norm_sum) / steps,
            "param_norm": float(global_norm(network.parameters())),
            "lr": optimizer.param_groups[0]["lr"],
        })
    return time.perf_counter() - started, epochs[-1]["val_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    config = reference_config(args.epochs, args.batch_size)
    split = load_dataset(config.dataset, config.val_fraction, config.seed)
    print(f"MLP width 128 depth 2 dropout 0.1 on sklearn:digits ({len(split.y_train)} train / {len(split.y_val)} val), "
          f"{args.epochs} epochs, batch {args.batch_size}, CPU, torch.get_num_threads() = {torch.get_num_threads()}")
    run_converge(config, split)  # warm-up: imports, first-call allocations
    run_plain(config, split)

    print(f"{'rep':>3}  {'converge s':>10}  {'plain s':>8}  {'ratio':>6}  "
          f"{'converge val_loss':>17}  {'plain val_loss':>14}")
    ratios = []
    for rep in range(1, args.reps + 1):
        converge_s, converge_val = run_converge(config, split)
        plain_s, plain_val = run_plain(config, split)
        ratios.append(converge_s / plain_s)
        print(f"{rep:>3}  {converge_s:>10.3f}  {plain_s:>8.3f}  {ratios[-1]:>6.2f}  "
              f"{converge_val:>17.4f}  {plain_val:>14.4f}")
    print(f"median ratio (converge / plain): {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
