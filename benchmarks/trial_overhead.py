"""What does a trial cost outside its fit, and does that grow with the study?

Runs studies of tiny trials (MLP width 16 on sklearn:digits, 2 epochs, TPE, median pruner)
trial after trial in this process, set up as a worker's slot process is (`runner.prepare_slot_process`:
one torch thread, the slot's lower CPU priority, the startup heap frozen) and running each trial
as it does (claim the slot, `runner.run_claim`: ask, train, write each epoch's metrics and
diagnosis, report, prune check, tell, the slot's memory step; then the study's finish check), and
times each trial whole and its training alone (`trainers.fit` less the objective's per-epoch hook,
whose metric writes, diagnosis, report and prune check are overhead). Overhead is the difference.

Around trial 100 and around trial 1,000 (one study filled to each size first, untimed), the
timed trials take turns across both studies and two ways of running, so a change in the
machine's speed during the run weighs on all four windows alike. The two ways: Converge's slot
process as it is (the Optuna study object, with its trial cache and its sampler, kept for the
process's life: `runner.study_for`), and the study
loaded afresh for the trial, as before (which re-reads every trial of the study and rebuilds
TPE's search space over all of them at every claim). Medians per way and window.

    .venv/bin/python benchmarks/trial_overhead.py [--window 20] [--database-url URL]

Without `--database-url` it creates a scratch PostgreSQL database on 127.0.0.1:5432 and drops it.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from types import SimpleNamespace
from typing import Any

import optuna
import sqlalchemy as sa
from scratch_db import scratch_database  # benchmarks/, on the path of a script run from it

from converge import trainers
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.db.migrate import upgrade
from converge.core.settings import Settings
from converge.studies import runner as slot_runner
from converge.studies.lifecycle import submit_study
from converge.studies.runner import TRIAL_ENDED, prepare_slot_process, run_claim, trial_recorder
from converge.studies.spec import StudySpec


def spec(name: str, n_trials: int) -> StudySpec:
    return StudySpec.model_validate({
        "name": name,
        "task": {"model": "mlp", "dataset": "sklearn:digits", "params": {"width": 16, "depth": 1}},
        "search_space": {"epochs": {"value": 2}, "batch_size": {"choices": [128, 256]}},
        "n_trials": n_trials,
        "sampler": {"name": "tpe", "seed": 0},
        "pruner": {"name": "median"},
    })


RECORD_TRIAL = trial_recorder(SimpleNamespace(value=-1))  # the slot's on_trial_start (its pid attribute)


class FitTimer:
    """Wraps `trainers.fit` (which the objective imports at call time) to add up the time spent
    training: its wall time less the time in its `on_epoch_end` hook, which is the objective's
    per-epoch work (metric and diagnosis writes, report, prune check) and so overhead."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.original = trainers.fit

    def __call__(self, *args: Any, on_epoch_end: Any = None, **kwargs: Any) -> Any:
        in_hook = 0.0

        def timed_hook(metrics: dict[str, Any]) -> bool:
            nonlocal in_hook
            started = time.perf_counter()
            try:
                return on_epoch_end(metrics)
            finally:
                in_hook += time.perf_counter() - started

        started = time.perf_counter()
        try:
            return self.original(*args, on_epoch_end=timed_hook if on_epoch_end else None, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started - in_hook


def run_trial(settings: Settings, name: str, timer: FitTimer, *, loaded_afresh: bool) -> tuple[float, float]:
    """(trial seconds, fit seconds) of the study's next trial, claim and finish check included.

    `loaded_afresh`: the process's kept study objects are set aside for this one trial.
    """
    kept = dict(slot_runner._STUDIES)
    if loaded_afresh:
        slot_runner._STUDIES.clear()
    engine = get_engine(settings.database_url)
    fit_before = timer.seconds
    started = time.perf_counter()
    with session_scope(engine) as session:
        claim = repo.claim_trial_slot(session, name)
    assert claim is not None
    answer = run_claim(settings, claim, "cpu", RECORD_TRIAL, lambda: False)  # as a worker's slot process runs it
    assert answer == TRIAL_ENDED, answer
    with session_scope(engine) as session:
        repo.finish_study_if_complete(session, claim.study_id)
    seconds = time.perf_counter() - started
    if loaded_afresh:
        slot_runner._STUDIES.clear()
        slot_runner._STUDIES.update(kept)
    return seconds, timer.seconds - fit_before


def run_study(settings: Settings, centers: list[int], size: int) -> dict[tuple[int, bool], list[tuple[float, float]]]:
    """Times per (window center, loaded afresh) of `size` trials each around `centers`.

    One study per center is first filled, untimed, to `size` trials short of its center; then
    the timed trials take turns (each study, each way, round and round), so a machine that
    speeds up or slows down during the run weighs on every window alike.
    """
    timer = FitTimer()
    trainers.fit = timer
    names = {center: f"overhead-{center}" for center in centers}
    for center, name in names.items():
        submit_study(settings, spec(name, center + size))
    times: dict[tuple[int, bool], list[tuple[float, float]]] = {}
    try:
        for center, name in names.items():
            for number in range(center - size):
                run_trial(settings, name, timer, loaded_afresh=False)
                if number % 100 == 0:
                    print(f"  filling {name}: trial {number}", flush=True)
        for _ in range(size):
            for center, name in names.items():
                for afresh in (False, True):
                    times.setdefault((center, afresh), []).append(
                        run_trial(settings, name, timer, loaded_afresh=afresh))
    finally:
        trainers.fit = timer.original
    return times


def medians(chunk: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Median total, fit and overhead milliseconds."""
    return (statistics.median(t for t, _ in chunk) * 1e3, statistics.median(f for _, f in chunk) * 1e3,
            statistics.median((t - f) for t, f in chunk) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=20, help="trials of each way around each center")
    parser.add_argument("--centers", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with scratch_database(args.database_url) as url:
        upgrade(url)
        settings = Settings(database_url=url)
        prepare_slot_process(settings, torch_threads=1)  # as a slot process starts: one CPU slot's share of 2 cores
        print(f"database: {sa.make_url(url).get_backend_name()}; one study per center: {args.centers}, "
              f"{args.window} timed trials of each way around each")
        times = run_study(settings, args.centers, args.window)

    print(f"\nmedian ms, {args.window} trials each   study kept (now)            study loaded per trial (before)")
    print(f"{'around trial':>12}  {'total':>7} {'fit':>7} {'overhead':>8}   {'total':>7} {'fit':>7} {'overhead':>8}")
    overhead = {}
    for center in args.centers:
        now, before = medians(times[(center, False)]), medians(times[(center, True)])
        overhead[center] = (now[2], before[2])
        print(f"{center:>12}  {now[0]:7.1f} {now[1]:7.1f} {now[2]:8.1f}   {before[0]:7.1f} {before[1]:7.1f} "
              f"{before[2]:8.1f}")
    first, last = args.centers[0], args.centers[-1]
    if first != last:
        (n0, b0), (n1, b1) = overhead[first], overhead[last]
        print(f"\noverhead growth, trial {last} / trial {first}:   now {n1 / n0:.2f}x   before {b1 / b0:.2f}x")
        print(f"overhead at trial {last}, before / now:      {b1 / n1:.2f}x")


if __name__ == "__main__":
    main()
