"""What does the convergence pruner's learning-curve extrapolation cost per decision?

Times `studies.pruning.extrapolation_rule` (fit the curve families, forecast, compare with the
k-th best) on noisy power-law curves of several lengths, side by side with what the live
diagnosis of the same history costs per epoch (`studies.diagnosis.diagnose`), which runs at every
epoch already. The issue's bar: at most 2 ms a decision.

    .venv/bin/python benchmarks/extrapolation_cost.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np

from converge.studies.diagnosis import diagnose
from converge.studies.pruning import extrapolation_rule

LENGTHS = (10, 40, 200, 1000, 10000)


def history(epochs: int, seed: int = 0) -> tuple[dict[int, float], dict[str, object]]:
    rng = np.random.default_rng(seed)
    values = {e: float(0.3 + 2.0 * (e + 1) ** -0.6 + 0.01 * rng.standard_normal()) for e in range(epochs)}
    rows = [{"epoch": e, "train_loss": v * 0.9, "val_loss": v} for e, v in values.items()]
    return values, {"epochs": rows, "max_epochs": epochs * 2}


def median_ms(call, repeats: int) -> float:  # type: ignore[no-untyped-def]
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    print(f"{'epochs so far':>14} {'extrapolation ms':>17} {'diagnosis ms':>13} {'ratio':>6}")
    for epochs in LENGTHS:
        values, data = history(epochs)
        decide = functools.partial(extrapolation_rule, values, epochs - 1, epochs * 2, lambda: [0.31, 0.32, 0.33],
                                   direction="minimize", top_k=3, probability=0.95, min_fraction=0.25)
        repeats = max(5, args.repeats // max(1, epochs // 200))
        extrapolate = median_ms(decide, repeats)
        diagnosed = median_ms(functools.partial(diagnose, data), repeats)
        print(f"{epochs:>14} {extrapolate:>17.3f} {diagnosed:>13.3f} {extrapolate / diagnosed:>6.2f}")

if __name__ == "__main__":
    main()
