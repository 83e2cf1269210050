"""Generate labelled training curves for the convergence diagnosis: `tests/data/curves.jsonl`.

Each record is one real training run - a small MLP trained with plain PyTorch on a scikit-learn
dataset that is bundled or generated (nothing is downloaded) - with its per-epoch history in the
diagnosis contract's format and one of the nine verdicts as its label.

Why the labels can be trusted: every run is made to show its verdict by an *induced cause* (an lr
far too high or too low, a deep tanh net with tiny init, a big net on 80 rows, dropout 0.9, a run
stopped after a third of its epochs...; see `curves/recipes.py`), and is then kept only if an
explicit acceptance check for that verdict passes and the checks of all eight other verdicts fail
(`curves/checks.py`, one documented function per verdict). The checks use oracle knowledge that the
diagnosis classifier does not have: healthy reference runs (Adam, two lrs, 60 epochs) on the same
data and loss, whose best validation loss and accuracy define a "good" value and whose early
gradient norm defines "a working run's", and, for the Gaussian NLL, the noise level the data was
generated with. Runs that fail their check, or pass another verdict's too, are rejected and counted
in the summary with the criterion that rejected them. The labels never depend on the diagnosis
classifier (studies/diagnosis), which this file exists to evaluate.

Details worth knowing when reading the file:
- histories are measured like the product's metrics callback (see `curves/train.py`); a run stops
  after its first non-finite epoch, and non-finite values are written as "NaN"/"Infinity"/"-Infinity";
  values are rounded to 6 significant digits, and the checks judge exactly the written values;
- `max_epochs` is the configured length. still_improving runs are healthy runs stopped after 20-40%
  of it, so they have fewer rows. slow_convergence runs are trained for up to 100 epochs at a
  constant lr and cut to a configured length E (>= 12) at which they show slow convergence: nothing in
  such a run depends on its configured length, so its first E epochs are exactly the run configured with E;
- losses come at several scales and signs: cross-entropy, MSE on standardised targets, MSE on raw
  targets (thousands), and a Gaussian NLL with learned variance (negative once the fit is good);
- exploding_gradients runs are all raw-target regressions: a bias-free deep ReLU net must grow its
  output ~100x, so the gradient norm (measured before clip_grad_norm_) rises 100-1000x while the
  clipped momentum update keeps the loss finite but spiky;
- ~20% of classification runs have the objective val_acc/maximize; a few kept runs are also written
  without their val metrics and grad_norm (id suffix `-trainonly`, objective train_loss) after
  checking that the shortened history still shows the label and no other.

Usage (from the repository root; deterministic for given options; ~5 minutes on one CPU thread):
    .venv/bin/python benchmarks/make_curves.py [--out tests/data/curves.jsonl] [--seeds N] [--keep K]
--seeds caps the candidate runs (seeds 0..N-1, or from --first-seed on) tried per verdict, --keep
stops a verdict once that many runs are kept; a summary of kept and rejected runs is printed at
the end. `--first-seed 1000 --keep 15 --out tests/data/curves_holdout.jsonl` made the held-out set.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import replace
from functools import cache
from pathlib import Path

import torch

from curves.checks import VERDICTS, Curve, Reference, judge, onset_epoch
from curves.data import load, nll_floor
from curves.recipes import candidate
from curves.train import RunSpec, train

TRAIN_ONLY = ("diverged", "converged", "still_improving", "slow_convergence")  # labels that survive dropping val
TRAIN_ONLY_PER_LABEL = 2
MIN_EPOCHS = 12


@cache
def reference(dataset: str, loss: str) -> Reference:
    """Healthy runs (Adam, lr 3e-3 and 1e-2, 60 epochs) on `dataset`: what a good loss and a working gradient are."""
    data = load(dataset)
    floor = nll_floor(data) if loss == "gnll" else 0.0
    runs = [train(RunSpec(dataset, "adam", lr, 32, 60, seed=0, loss=loss)) for lr in (3e-3, 1e-2)]
    best_val = min(row["val_loss"] for run in runs for row in run) - floor
    best_acc = max(row["val_acc"] for run in runs for row in run) if data.task == "classification" else None
    grad = statistics.median(row["grad_norm"] for row in runs[0][:5])
    return Reference(best_val, best_acc, grad, floor)


def finite_or_name(value: float) -> float | str:
    """Strict JSON has no NaN/inf: they are written as the strings the contract names."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return float(f"{value:.6g}")


def objective_for(spec: RunSpec, rng: random.Random) -> dict:
    """val_loss/minimize, except for ~20% of classification runs, which maximise val_acc."""
    if load(spec.dataset).task == "classification" and rng.random() < 0.2:
        return {"metric": "val_acc", "direction": "maximize"}
    return {"metric": "val_loss", "direction": "minimize"}


def make_record(label: str, spec: RunSpec, cause: str, epochs: list[dict], rng: random.Random) -> dict:
    rows = [{key: (value if key == "epoch" else finite_or_name(value)) for key, value in row.items()} for row in epochs]
    return {
        "id": f"{label}-{spec.dataset}-{spec.optimizer}-s{spec.seed}",
        "label": label,
        "onset_epoch": None,
        "cause": cause,
        "dataset": spec.dataset,
        "task": load(spec.dataset).task,
        "optimizer": spec.optimizer,
        "config": spec.config(),
        "history": {"objective": objective_for(spec, rng), "max_epochs": spec.epochs, "epochs": rows},
    }


def curve_of(record: dict, ref: Reference) -> Curve:
    """The record's history as the checks see it: exactly the (rounded) values written to the file."""
    return Curve.of(record["history"]["epochs"], ref.floor)


def fit_slow_length(label: str, spec: RunSpec, epochs: list[dict], ref: Reference,
                    rng: random.Random) -> tuple[RunSpec, list[dict]]:
    """For slow_convergence: the configured length E (>= 12) at which the constant-lr run shows it, if any."""
    if label != "slow_convergence":
        return spec, epochs
    fits = [n for n in range(MIN_EPOCHS, len(epochs) + 1)
            if judge(label, Curve.of(epochs[:n], ref.floor), ref) is None]
    n = rng.choice(fits) if fits else len(epochs)
    return replace(spec, epochs=n), epochs[:n]


def train_only(record: dict, ref: Reference) -> dict | None:
    """The record without val metrics and grad_norm, if it still shows its label that way."""
    rows = [{k: v for k, v in row.items() if k in ("epoch", "train_loss", "lr")} for row in record["history"]["epochs"]]
    history = {"objective": {"metric": "train_loss", "direction": "minimize"},
               "max_epochs": record["history"]["max_epochs"], "epochs": rows}
    short = {**record, "id": record["id"] + "-trainonly", "history": history}
    curve = curve_of(short, ref)
    if judge(record["label"], curve, ref) is not None:
        return None
    short["onset_epoch"] = onset_epoch(record["label"], curve)
    return short


def generate(label: str, seeds: int, keep: int, stats: dict, first: int = 0) -> list[dict]:
    """Candidates first..first+seeds-1 for `label`, until `keep` pass their checks; rejections go to `stats`."""
    kept: list[dict] = []
    for i in range(first, first + seeds):
        if len(kept) >= keep:
            break
        spec, cause = candidate(label, i)
        ref = reference(spec.dataset, spec.loss)
        rng = random.Random(f"record/{label}/{i}")
        spec, epochs = fit_slow_length(label, spec, train(spec), ref, rng)
        record = make_record(label, spec, cause, epochs, rng)
        curve = curve_of(record, ref)
        problem = judge(label, curve, ref)
        if problem:
            stats["rejected"][label][problem] += 1
            continue
        record["onset_epoch"] = onset_epoch(label, curve)
        kept.append(record)
    if label in TRAIN_ONLY:
        shorts = [s for s in (train_only(r, reference(r["dataset"], r["config"]["loss"])) for r in kept) if s]
        kept += shorts[:TRAIN_ONLY_PER_LABEL]
    return kept


def summary(records: list[dict], stats: dict, seconds: float) -> str:
    lines = ["kept runs per label:"]
    counts = Counter(r["label"] for r in records)
    for label in VERDICTS:
        rejected = stats["rejected"][label]
        lines.append(f"  {label:20s} kept {counts[label]:3d}   rejected {sum(rejected.values()):3d}"
                     f"   ({stats['seconds'][label]:.0f} s)")
        for why, n in rejected.most_common():
            lines.append(f"      {n:3d} x {why}")
    for key in ("dataset", "optimizer", "task"):
        by = Counter(r[key] for r in records)
        lines.append(f"kept runs per {key}: " + ", ".join(f"{k} {n}" for k, n in by.most_common()))
    by_task = defaultdict(set)
    for r in records:
        by_task[r["label"]].add(r["task"])
    lines.append("labels with both tasks: " + ", ".join(v for v in VERDICTS if len(by_task[v]) == 2))
    lines.append(f"train-only histories: {sum(r['id'].endswith('-trainonly') for r in records)}")
    lines.append(f"total kept {len(records)}, rejected {sum(sum(c.values()) for c in stats['rejected'].values())}, "
                 f"wall time {seconds:.0f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/data/curves.jsonl"))
    parser.add_argument("--seeds", type=int, default=120, help="candidate runs (seeds) tried per label at most")
    parser.add_argument("--keep", type=int, default=30, help="runs kept per label before moving on")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="first candidate seed: another range gives a held-out set of different runs")
    parser.add_argument("--labels", nargs="*", default=list(VERDICTS), choices=VERDICTS, help="only these labels")
    args = parser.parse_args()

    torch.set_num_threads(1)
    started = time.perf_counter()
    stats = {"rejected": defaultdict(Counter), "seconds": Counter()}
    records: list[dict] = []
    for label in args.labels:
        t0 = time.perf_counter()
        records += generate(label, args.seeds, args.keep, stats, args.first_seed)
        stats["seconds"][label] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for record in records:
            f.write(json.dumps(record, allow_nan=False) + "\n")
    print(summary(records, stats, time.perf_counter() - started))
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
