"""What does a trial cost outside its fit, and does that grow with the study?

Runs one study of tiny trials (MLP width 16 on sklearn:digits, 2 epochs, TPE, median pruner)
trial after trial in this process, the way a worker's slot process does (claim the slot,
`run_slot`: load the study, ask, train, write each epoch's metrics and diagnosis, tell; then
the study's finish check), and times each trial whole and its `trainers.fit` alone. Overhead
is the difference. Medians are taken over windows around trial 100 and trial 1,000.

Two studies run side by side: Converge's slot process as it is (Optuna's trial cache kept for
the process's life), and the same with a fresh cache per trial, as before the cache was kept
(`load_study` on a bare RDBStorage re-reads every trial of the study at every claim).

    .venv/bin/python benchmarks/trial_overhead.py [--trials 1010] [--window 20] [--database-url URL]

Without `--database-url` it creates a scratch PostgreSQL database on 127.0.0.1:5432 and drops it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
import uuid
from collections.abc import Iterator
from typing import Any

import optuna
import sqlalchemy as sa

import studies.runner
import trainers
from service.db import repo
from service.db.engine import get_engine, session_scope
from service.db.migrate import upgrade
from service.settings import Settings
from studies.lifecycle import submit_study
from studies.runner import run_slot
from studies.spec import StudySpec

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def spec(name: str, n_trials: int) -> StudySpec:
    return StudySpec.model_validate({
        "name": name,
        "task": {"model": "mlp", "dataset": "sklearn:digits", "params": {"width": 16, "depth": 1}},
        "search_space": {"epochs": {"value": 2}, "batch_size": {"choices": [128, 256]}},
        "n_trials": n_trials,
        "sampler": {"name": "tpe", "seed": 0},
        "pruner": {"name": "median"},
    })


class FitTimer:
    """Wraps `trainers.fit` (which the objective imports at call time) to add up its wall time."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.original = trainers.fit

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.original(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


@contextlib.contextmanager
def fresh_cache_per_trial() -> Iterator[None]:
    """The behaviour before: every claim wraps the storage in a new, empty Optuna cache."""
    kept = studies.runner._cached
    studies.runner._cached = optuna.storages.get_storage  # type: ignore[assignment]
    try:
        yield
    finally:
        studies.runner._cached = kept


def run_study(settings: Settings, name: str, n_trials: int) -> list[tuple[float, float]]:
    """(trial seconds, fit seconds) of each trial, claim and finish check included."""
    submit_study(settings, spec(name, n_trials))
    engine = get_engine(settings.database_url)
    timer = FitTimer()
    trainers.fit = timer
    times: list[tuple[float, float]] = []
    try:
        for number in range(n_trials):
            fit_before = timer.seconds
            started = time.perf_counter()
            with session_scope(engine) as session:
                claim = repo.claim_trial_slot(session, name)
            assert claim is not None
            run_slot(settings, claim, device="cpu")
            with session_scope(engine) as session:
                repo.finish_study_if_complete(session, claim.study_id)
            times.append((time.perf_counter() - started, timer.seconds - fit_before))
            if number % 100 == 0:
                print(f"  {name}: trial {number}", flush=True)
    finally:
        trainers.fit = timer.original
    return times


def window(times: list[tuple[float, float]], center: int, size: int) -> tuple[float, float, float]:
    """Median total, fit and overhead milliseconds of the trials around `center`."""
    chunk = times[max(0, center - size // 2): center + size // 2]
    return (statistics.median(t for t, _ in chunk) * 1e3, statistics.median(f for _, f in chunk) * 1e3,
            statistics.median((t - f) for t, f in chunk) * 1e3)


@contextlib.contextmanager
def scratch_database(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"converge_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1010)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import torch

    torch.set_num_threads(1)  # one CPU slot's share on this 2-core machine

    with scratch_database(args.database_url) as url:
        upgrade(url)
        settings = Settings(database_url=url)
        print(f"database: {sa.make_url(url).get_backend_name()}; {args.trials} trials per study")
        kept = run_study(settings, "overhead-kept-cache", args.trials)
        with fresh_cache_per_trial():
            fresh = run_study(settings, "overhead-fresh-cache", args.trials)

    centers = [c for c in (100, 1000) if c < args.trials]
    print(f"\nmedian ms over {args.window} trials     Optuna cache kept (now)     fresh cache per trial (before)")
    print(f"{'around trial':>12}  {'total':>7} {'fit':>7} {'overhead':>8}   {'total':>7} {'fit':>7} {'overhead':>8}")
    rows = {}
    for center in centers:
        k, f = window(kept, center, args.window), window(fresh, center, args.window)
        rows[center] = (k[2], f[2])
        print(f"{center:>12}  {k[0]:7.1f} {k[1]:7.1f} {k[2]:8.1f}   {f[0]:7.1f} {f[1]:7.1f} {f[2]:8.1f}")
    if len(centers) == 2:
        (k100, f100), (k1000, f1000) = rows[100], rows[1000]
        print(f"\noverhead growth, trial 1000 / trial 100:   kept {k1000 / k100:.2f}x   fresh {f1000 / f100:.2f}x")
        print(f"overhead at trial 1000, fresh / kept:      {f1000 / k1000:.2f}x")


if __name__ == "__main__":
    main()
