"""What does `trainers.fit` (PyTorch Lightning) cost over a hand-written PyTorch loop?

For the reference MLP and CNN, both sides train on the same sklearn:digits tensors with the
same network class, init seed, AdamW, batch size, epochs, per-epoch validation and per-step
gradient-norm measurement, on CPU, so the ratio is the framework's overhead alone. (`fit` hands
Lightning each epoch as one batch and its step loops over the mini-batches, one optimizer step
each: the same steps, in the same order, as the plain loop's.) Each rep runs every model through
both sides, interleaved, so a busy machine slows both alike.

    .venv/bin/python benchmarks/trainer_overhead.py [--reps 5] [--epochs 10] [--batch-size 64] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from converge.trainers import DataSplit, TrainConfig, fit, load_dataset
from converge.trainers.callbacks import global_norm, gradient_norm
from converge.trainers.fit import make_loaders
from converge.trainers.models import build_network

MODELS = {  # the reference models: params, description
    "mlp": ({"width": 128, "depth": 2}, "MLP width 128 depth 2"),
    "cnn": ({"channels": 16}, "CNN channels 16"),
}


def reference_config(epochs: int, batch_size: int, model: str = "mlp") -> TrainConfig:
    return TrainConfig(model=model, dataset="sklearn:digits", params=MODELS[model][0], dropout=0.1,
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
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    configs = {model: reference_config(args.epochs, args.batch_size, model) for model in MODELS}
    split = load_dataset("sklearn:digits", 0.2, 0)
    print(f"{'; '.join(description for _, description in MODELS.values())}; dropout 0.1, on sklearn:digits "
          f"({len(split.y_train)} train / {len(split.y_val)} val), {args.epochs} epochs, batch {args.batch_size}, "
          f"CPU, torch.get_num_threads() = {torch.get_num_threads()}")
    for config in configs.values():  # warm-up: imports, first-call allocations
        run_converge(config, split)
        run_plain(config, split)

    print(f"{'rep':>3}  {'model':<5}  {'converge s':>10}  {'plain s':>8}  {'ratio':>6}  "
          f"{'converge val_loss':>17}  {'plain val_loss':>14}")
    ratios: dict[str, list[float]] = {model: [] for model in configs}
    for rep in range(1, args.reps + 1):
        for model, config in configs.items():
            converge_s, converge_val = run_converge(config, split)
            plain_s, plain_val = run_plain(config, split)
            ratios[model].append(converge_s / plain_s)
            print(f"{rep:>3}  {model:<5}  {converge_s:>10.3f}  {plain_s:>8.3f}  {ratios[model][-1]:>6.2f}  "
                  f"{converge_val:>17.4f}  {plain_val:>14.4f}")
    print("median ratio (converge / plain): "
          + ", ".join(f"{model} {statistics.median(values):.2f}" for model, values in ratios.items()))


if __name__ == "__main__":
    main()
