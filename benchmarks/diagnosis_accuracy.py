"""How well does the diagnosis read real training curves, how fast is it, what do its inputs cost?

Reads the labelled runs in `tests/data/curves.jsonl` (made by `benchmarks/make_curves.py`)
and prints, side by side with the targets of the diagnosis issue:

- overall accuracy and per-verdict precision and recall, with the confusion matrix;
- the share of healthy runs (converged, still_improving) called unhealthy;
- accuracy by confidence band (is `confidence` calibrated?);
- median detection latency for diverged, exploding_gradients and overfitting: epochs from the
  labelled onset to the first prefix of the run diagnosed with its label;
- milliseconds per diagnosis of 200-epoch histories;
- the fit-time cost of collecting the metrics the diagnosis reads: the time spent inside the
  metrics callback's hooks as a share of real fits, cross-checked by `trainers.fit` with and
  without the norms, alternated (median of the paired ratios, which is noisier).

The headline measures are printed for the labelled set the rules were tuned on and, side by
side, for a held-out set generated from other seeds (`tests/data/curves_holdout.jsonl`).

    .venv/bin/python benchmarks/diagnosis_accuracy.py [--curves PATH] [--holdout PATH] [--fit-reps 21] [--skip-fit]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from converge.studies.diagnosis import HEALTHY_VERDICTS, VERDICTS, diagnose

CURVES = Path(__file__).resolve().parent.parent / "tests" / "data" / "curves.jsonl"
HOLDOUT = CURVES.with_name("curves_holdout.jsonl")
# Trials of random sweeps labelled by outcome (`benchmarks/sweep_trials.py --curves tests/data`), one file per set.
SWEEPS = {CURVES: CURVES.with_name("curves_sweeps.jsonl"), HOLDOUT: CURVES.with_name("curves_sweeps_holdout.jsonl")}
HEALTHY_BY_OUTCOME = "healthy"
LATENCY_VERDICTS = ("diverged", "exploding_gradients", "overfitting")
TARGETS = {"accuracy": 0.95, "healthy_called_unhealthy": 0.05, "latency_diverged": 2.0,
           "latency_exploding_gradients": 2.0, "ms_per_diagnosis": 5.0, "collection_overhead": 0.03}


def load_records(path: Path = CURVES, *, with_sweeps: bool = True) -> list[dict[str, Any]]:
    """The runs in `path`, and for the two sets, their sweep trials (`SWEEPS`) after them."""
    paths = [path] + ([SWEEPS[path]] if with_sweeps and path in SWEEPS and SWEEPS[path].exists() else [])
    return [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]


def predictions(records: list[dict[str, Any]]) -> list[tuple[str, str, float]]:
    """(label, verdict, confidence) for each record's full history. A sweep trial labelled `healthy` (by its
    outcome, which cannot tell converged from still improving) counts as right with either healthy verdict."""
    out = []
    for record in records:
        result = diagnose(record["history"])
        label = record["label"]
        if label == HEALTHY_BY_OUTCOME and result.verdict in HEALTHY_VERDICTS:
            label = result.verdict
        out.append((label, result.verdict, result.confidence))
    return out


def scores(pairs: list[tuple[str, str, float]]) -> dict[str, Any]:
    confusion = Counter((label, verdict) for label, verdict, _ in pairs)
    per_verdict = {}
    for v in VERDICTS:
        tp = confusion[(v, v)]
        labelled = sum(n for (label, _), n in confusion.items() if label == v)
        called = sum(n for (_, verdict), n in confusion.items() if verdict == v)
        per_verdict[v] = {"n": labelled, "precision": tp / called if called else float("nan"),
                          "recall": tp / labelled if labelled else float("nan")}
    healthy = [(label, verdict) for label, verdict, _ in pairs if label in (*HEALTHY_VERDICTS, HEALTHY_BY_OUTCOME)]
    false_alarms = sum(verdict not in HEALTHY_VERDICTS for _, verdict in healthy)
    return {
        "n": len(pairs),
        "accuracy": sum(label == verdict for label, verdict, _ in pairs) / len(pairs),
        "healthy_called_unhealthy": false_alarms / len(healthy) if healthy else float("nan"),
        "per_verdict": per_verdict,
        "confusion": confusion,
    }


def calibration(pairs: list[tuple[str, str, float]]) -> list[tuple[str, int, float, float]]:
    """(band, runs, mean confidence, accuracy) per confidence band."""
    bands = [(0.0, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.01)]
    out = []
    for low, high in bands:
        inside = [(label == verdict, c) for label, verdict, c in pairs if low <= c < high]
        if inside:
            out.append((f"[{low:.1f}, {min(high, 1.0):.1f})", len(inside), statistics.mean(c for _, c in inside),
                        statistics.mean(ok for ok, _ in inside)))
    return out


def detection_latency(record: dict[str, Any]) -> int | None:
    """Epochs from the labelled onset to the first prefix diagnosed with the label; None if never."""
    onset = record.get("onset_epoch")
    epochs = record["history"]["epochs"]
    if onset is None:
        return None
    for k in range(1, len(epochs) + 1):
        last = epochs[k - 1]["epoch"]
        if last < onset:
            continue
        if diagnose({**record["history"], "epochs": epochs[:k]}).verdict == record["label"]:
            return int(last - onset)
    return None


def latencies(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for verdict in LATENCY_VERDICTS:
        values = [detection_latency(r) for r in records if r["label"] == verdict]
        found = [v for v in values if v is not None]
        out[verdict] = {"runs": len(values), "detected": len(found),
                        "median": float(statistics.median(found)) if found else float("nan"),
                        "p90": float(np.percentile(found, 90)) if found else float("nan")}
    return out


def synthetic_history(shape: str, n: int = 200, seed: int = 0) -> dict[str, Any]:
    """A noisy 200-epoch run with every column, in one of a few shapes, for timing."""
    rng = np.random.default_rng(seed)
    x = np.arange(n)
    train = 2.0 * np.exp(-x / 30) + 0.05
    val = {"converging": train + 0.1, "overfitting": 0.3 + 2.0 * np.exp(-x / 30) + 0.002 * x,
           "oscillating": 1.0 + 0.3 * (-1.0) ** x}[shape]
    noise = lambda: 1 + 0.02 * rng.standard_normal(n)  # noqa: E731
    rows = [{"epoch": int(i), "train_loss": float(train[i] * noise()[i]), "val_loss": float(val[i] * noise()[i]),
             "val_acc": float(min(1.0, 0.1 + 0.9 * (1 - np.exp(-i / 30)))), "grad_norm": float(1 + 0.1 * rng.random()),
             "param_norm": float(10 + i / 20), "lr": 1e-3} for i in x]
    return {"objective": {"metric": "val_loss", "direction": "minimize"}, "max_epochs": n, "epochs": rows}


def ms_per_diagnosis(reps: int = 200) -> dict[str, float]:
    """Median milliseconds per `diagnose` call (JSON-decoded dict in, `Diagnosis` out) on 200-epoch runs."""
    out = {}
    for shape in ("converging", "overfitting", "oscillating"):
        history = synthetic_history(shape)
        diagnose(history)
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            diagnose(history)
            times.append(time.perf_counter() - started)
        out[shape] = 1000 * statistics.median(times)
    return out


def collection_overhead(reps: int, epochs: int = 20) -> dict[str, float]:
    """`trainers.fit` on the digits MLP with and without the gradient/weight norms, alternated.

    The overhead is the median of the paired ratios; the fastest run of each side is shown too
    (timing noise only ever adds time). On a shared 2-core machine single pairs vary by ±5%, so
    take many pairs.
    """
    import torch

    from converge.trainers import TrainConfig, fit, load_dataset

    torch.set_num_threads(1)
    config = TrainConfig(model="mlp", dataset="sklearn:digits", params={"width": 128, "depth": 2}, lr=1e-3,
                         epochs=epochs, batch_size=64, seed=0, device="cpu")
    split = load_dataset(config.dataset, config.val_fraction, config.seed)
    fit(config, split=split)  # warm-up: imports, allocator, Lightning's first-run work
    with_norms, without, ratios = [], [], []
    for _ in range(reps):
        a = fit(config, split=split, norms=True).seconds
        b = fit(config, split=split, norms=False).seconds
        with_norms.append(a)
        without.append(b)
        ratios.append(a / b)
    median_ratio, best_ratio = statistics.median(ratios) - 1.0, min(with_norms) / min(without) - 1.0
    return {"with_s": min(with_norms), "without_s": min(without), "median_ratio": median_ratio,
            "best_ratio": best_ratio, "overhead": median_ratio}


def collection_share(reps: int = 5, epochs: int = 20) -> float:
    """Share of fit time spent inside the metrics callback's hooks, timed inside real fits.

    Unlike the A/B comparison this does not difference two noisy wall times: it adds up the
    time of exactly the code that collects the metrics (per-step gradient norm, per-epoch
    weight norm and the epoch's dict), so it is stable on a busy machine. Median of `reps` fits.
    """
    import torch

    from converge.trainers import TrainConfig, callbacks, fit, load_dataset

    torch.set_num_threads(1)
    config = TrainConfig(model="mlp", dataset="sklearn:digits", params={"width": 128, "depth": 2}, lr=1e-3,
                         epochs=epochs, batch_size=64, seed=0, device="cpu")
    split = load_dataset(config.dataset, config.val_fraction, config.seed)
    spent: list[float] = []
    hooks = ("on_train_epoch_start", "on_before_optimizer_step", "on_train_epoch_end")
    originals = {name: getattr(callbacks.EpochMetricsCallback, name) for name in hooks}

    def timed(original):
        def hook(self, *args, **kwargs):
            started = time.perf_counter()
            original(self, *args, **kwargs)
            spent.append(time.perf_counter() - started)
        return hook

    try:
        for name, original in originals.items():
            setattr(callbacks.EpochMetricsCallback, name, timed(original))
        fit(config, split=split)  # warm-up
        shares = []
        for _ in range(reps):
            spent.clear()
            seconds = fit(config, split=split).seconds
            shares.append(sum(spent) / seconds)
    finally:
        for name, original in originals.items():
            setattr(callbacks.EpochMetricsCallback, name, original)
    return statistics.median(shares)


def summary(records: list[dict[str, Any]]) -> dict[str, float]:
    """The headline measures of one labelled set."""
    s = scores(predictions(records))
    lat = latencies(records)
    return {"runs": float(s["n"]), "accuracy": s["accuracy"], "healthy_called_unhealthy": s["healthy_called_unhealthy"],
            "latency_diverged": lat["diverged"]["median"],
            "latency_exploding_gradients": lat["exploding_gradients"]["median"],
            "latency_overfitting": lat["overfitting"]["median"]}


def print_details(records: list[dict[str, Any]], path: Path) -> None:
    pairs = predictions(records)
    s = scores(pairs)
    print(f"labelled runs: {s['n']} from {path}")
    print(f"\n{'verdict':<22}{'runs':>6}{'precision':>11}{'recall':>8}")
    for v, row in s["per_verdict"].items():
        print(f"{v:<22}{row['n']:>6}{row['precision']:>11.3f}{row['recall']:>8.3f}")
    print("\nconfusion (rows: label, columns: verdict)")
    print(f"{'':<22}" + "".join(f"{v[:6]:>8}" for v in VERDICTS))
    for label in (*VERDICTS, HEALTHY_BY_OUTCOME):
        print(f"{label:<22}" + "".join(f"{s['confusion'][(label, v)]:>8}" for v in VERDICTS))
    print("\nconfidence band        runs  mean conf  accuracy")
    for band, n, conf, acc in calibration(pairs):
        print(f"{band:<21}{n:>6}{conf:>11.2f}{acc:>10.2f}")
    print("\ndetection latency (epochs from onset to the first prefix diagnosed right)")
    for v, row in latencies(records).items():
        print(f"{v:<22} runs {row['runs']:>3}  detected {row['detected']:>3}  median {row['median']:.1f}  "
              f"p90 {row['p90']:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curves", type=Path, default=CURVES, help="the labelled runs the rules were tuned on")
    parser.add_argument("--holdout", type=Path, default=HOLDOUT,
                        help="labelled runs from other seeds, never looked at while tuning (skipped if absent)")
    parser.add_argument("--fit-reps", type=int, default=21, help="alternated pairs of fits (20 epochs each)")
    parser.add_argument("--skip-fit", action="store_true", help="leave out the fit-time measurement (slow)")
    args = parser.parse_args()

    records = load_records(args.curves)
    print_details(records, args.curves)
    sets = {"labelled": summary(records)}
    if args.holdout.exists():
        sets["held-out"] = summary(load_records(args.holdout))
    ms = max(ms_per_diagnosis().values())
    print(f"\nms per diagnosis of a 200-epoch history (worst of three shapes): {ms:.2f}")
    cost = None
    if not args.skip_fit:
        cost = collection_overhead(args.fit_reps)
        cost["share"] = collection_share()
        print(f"fit (20 epochs) with norms {cost['with_s']:.3f} s, without {cost['without_s']:.3f} s (fastest of "
              f"{args.fit_reps} alternated pairs); extra time: {cost['median_ratio']:+.1%} by the median of the "
              f"paired ratios, {cost['best_ratio']:+.1%} fastest against fastest")

    names = list(sets)
    print(f"\n{'measure':<40}" + "".join(f"{n:>12}" for n in names) + "  target")
    rows = [("runs", "runs", None, None), ("accuracy", "accuracy", ">=", TARGETS["accuracy"]),
            ("healthy runs called unhealthy", "healthy_called_unhealthy", "<=", TARGETS["healthy_called_unhealthy"]),
            ("median latency diverged (epochs)", "latency_diverged", "<=", TARGETS["latency_diverged"]),
            ("median latency exploding_gradients", "latency_exploding_gradients", "<=",
             TARGETS["latency_exploding_gradients"]),
            ("median latency overfitting (epochs)", "latency_overfitting", None, None)]
    for label, key, op, target in rows:
        values = "".join(f"{sets[n][key]:>12.3f}" if key != "runs" else f"{int(sets[n][key]):>12}" for n in names)
        print(f"{label:<40}{values}  {'' if op is None else f'{op} {target:g}'}")
    print(f"{'ms per diagnosis, 200 epochs':<40}{ms:>12.2f}  <= {TARGETS['ms_per_diagnosis']:g}")
    if cost is not None:
        print(f"{'metric collection, share of fit time':<40}{cost['share']:>12.3f}  "
              f"<= {TARGETS['collection_overhead']:g}  (time inside the callback's hooks)")
        print(f"{'  cross-check: fit with / without - 1':<40}{cost['overhead']:>12.3f}  "
              "(median of paired wall times; noisy)")


if __name__ == "__main__":
    main()
