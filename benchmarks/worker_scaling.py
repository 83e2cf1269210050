"""Trials per minute of one `converge worker` with 1 CPU slot against the same worker with 2.

Each configuration runs the same study (the reference MLP, width 128, depth 2, on
sklearn:digits, 10 epochs, batch 64, random sampler, no pruning) on a fresh SQLite database,
with a real worker process: `converge worker --devices cpu --slots-per-device K --exit-when-idle`.
Throughput counts from the first trial's start to the last trial's end (Optuna's own
timestamps), so the slot processes' start-up (importing torch once per slot) is left out; the
worker's whole wall time is printed beside it. The CPU slots split the machine's cores
(`torch.set_num_threads`), so on 2 cores one slot trains with 2 threads and two with 1 each.

    .venv/bin/python benchmarks/worker_scaling.py [--trials 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from converge.core.db.migrate import upgrade
from converge.core.settings import Settings
from converge.studies.lifecycle import submit_study
from converge.studies.spec import StudySpec
from converge.studies.storage import storage_for

REPO = Path(__file__).resolve().parents[1]


def spec(n_trials: int) -> StudySpec:
    return StudySpec.model_validate({
        "name": "scaling",
        "task": {"model": "mlp", "dataset": "sklearn:digits", "params": {"width": 128, "depth": 2}},
        "search_space": {"epochs": {"value": 10}, "batch_size": {"value": 64}, "dropout": {"value": 0.1}},
        "n_trials": n_trials,
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
    })


def run(slots: int, n_trials: int) -> tuple[float, float]:
    """(trials per minute from first start to last end, the worker's whole wall seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/scaling.db"
        upgrade(url)
        settings = Settings(database_url=url)
        submit_study(settings, spec(n_trials))
        env = {**os.environ, "CONVERGE_DATABASE_URL": url, "CONVERGE_WORKER_POLL_S": "0.1"}
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "converge.service.cli", "worker", "--devices", "cpu",
                        "--slots-per-device", str(slots), "--exit-when-idle"],
                       cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        trials = optuna.load_study(study_name="scaling", storage=storage_for(settings)).get_trials()
        assert len(trials) == n_trials and all(t.state.name == "COMPLETE" for t in trials), trials
        first = min(t.datetime_start for t in trials)
        last = max(t.datetime_complete for t in trials)
        return n_trials / (last - first).total_seconds() * 60, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="alternated runs of each configuration")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"{args.trials} trials of the reference MLP per run, {os.cpu_count()} cores, SQLite")
    print(f"{'round':>5}  {'1 slot trials/min':>17} {'wall s':>7}   {'2 slots trials/min':>18} {'wall s':>7}   ratio")
    ratios = []
    for round_ in range(1, args.rounds + 1):
        one, one_wall = run(1, args.trials)
        two, two_wall = run(2, args.trials)
        ratios.append(two / one)
        print(f"{round_:>5}  {one:17.1f} {one_wall:7.1f}   {two:18.1f} {two_wall:7.1f}   {two / one:5.2f}")
    print(f"median ratio (2 slots / 1 slot): {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
