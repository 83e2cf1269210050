"""How fast does the API answer a large study under concurrent load, next to optuna-dashboard?

A scratch PostgreSQL database gets one finished study of `--trials` trials (default 10,000) with
`--epochs` epochs each (default 50), submitted the normal way (`submit_study`) and then filled
fast: finished Optuna trials with the study's five params, the objective, one intermediate value
per epoch and the user attributes the objective sets, then Converge's per-epoch metric rows and
one final diagnosis row per trial. Optuna's rows are inserted many per statement through
Optuna's own table definitions and stored forms, then read back through Optuna's storage and
compared with the trials built (a test checks that these rows equal what `Study.add_trials`
stores; `--fill add_trials` uses it instead, but it makes about five queries per intermediate
value: about 0.13 s a 50-epoch trial on this machine, over 20 minutes for 10,000). Converge's
rows are bulk-inserted with SQLAlchemy Core; then `VACUUM ANALYZE`. The curves come from a pool of
synthetic histories of several shapes (converging, still improving, overfitting, slow, flat,
oscillating, diverging, exploding and vanishing gradients); each trial's metric rows are one of
those histories as it is, and its diagnosis is what `studies.diagnosis.diagnose` says of that
history (every column but `lr`, which is the trial's own constant lr and which the diagnosis
does not read). A diverging history fails its trial (NaN objective), some unhealthy ones are
pruned by their verdict, the rest complete.

Then a real `converge serve --workers 0` (uvicorn, the API and the dashboard on one port) runs in
a subprocess on a free loopback port, and a real `converge worker --devices cpu
--slots-per-device 2` trains a second study (a tiny MLP on sklearn:digits, many epochs per
trial) in the same database, so two slots write an epoch's metrics and diagnosis all through
the measurement; the epoch rows it wrote in each window are counted and printed. The API has a
`read` API token (created in the scratch database) and every request sends it, dashboard's
included, so the authenticated path is the one measured.

For each endpoint in turn, `--clients` concurrent clients (asyncio, one `httpx.AsyncClient` and
one keep-alive connection each, opened before the window) send requests for `--seconds`, in two
runs (`--modes`), each printed as its own table:

- saturation (closed loop): each client sends its next request as soon as the last one is
  answered, so the table shows the most requests/s the server manages;
- paced (open loop, `--rate` requests/s per client, 1 by default: 50 clients offer 50
  requests/s): each client sends on its own schedule, the next send time 1/rate after the last
  scheduled one, whatever the answer's time (the clients' schedules are spread over one
  interval). A client still waiting for an answer at its next send time sends right after it,
  and every latency counts from the request's scheduled send time, not from when it could be
  sent, so a server that falls behind shows it (no coordinated omission).

The targets are judged on the paced table. With closed-loop clients and no think time, Little's
law fixes the mean latency at clients / throughput (50 clients at 100 requests/s wait 500 ms on
average whatever the server does), so a p99 under 100 ms would take over 500 requests/s from one
server on the cores it shares with PostgreSQL, the training slots and the clients; real clients
of a REST API (a dashboard page, a script polling a trial) pause between requests, which the
paced run models. The saturation table gives the capacity behind those latencies.

The requests, for each endpoint in turn (the paced window, then the saturation one):

- `GET /v1/studies/{name}/trials?limit=100&cursor=...`: a page at a random cursor, cursors
  taken from walking the whole list once beforehand (just `?limit=100` if the endpoint returns
  a plain list instead of a page);
- `GET /v1/studies/{name}/trials/{number}` and `.../trials/{number}/metrics`: random trials;
- `GET /v1/studies/{name}/diagnosis`: the whole study's diagnosis;
- optuna-dashboard's `GET /api/studies/{study_id}` for the same study (what its page polls).

Latency is client-side, to having read the whole body (from sending the request in the
saturation run, from its scheduled send time in the paced one), so it includes the client's own
scheduling on the same machine. Non-2xx answers and transport errors (timeouts included) are
errors, counted apart from the latencies, and the output says so loudly. Each request has a
timeout (`--timeout`); no request is started (saturation) or scheduled (paced) after the window's
end, and whatever is still running or not yet sent `--timeout` + 1 s after it is cancelled and
reported as unfinished, counted as slower than the timeout. Before each window the server is
given up to `--timeout` s to finish requests an earlier window left running (until
`/v1/health` answers within 100 ms twice in a row), and one request of that endpoint is sent
and not counted (the first diagnosis in a process imports scikit-learn; the dashboard fills its
trial cache). Requests/s is 2xx answers over the time from the window's start until its last
request ended.

Everything (the server, PostgreSQL, the two training slots and this client) shares the
machine's cores, so the figures are for this machine as printed. Targets (issue 6): p99 <= 100
ms for the list and detail pages, <= 200 ms for metrics, judged on the paced table; the
diagnosis and the dashboard have none. The last column of each table is each endpoint's p99
over the dashboard's in the same run.

    .venv/bin/python benchmarks/api_load.py [--trials 10000] [--epochs 50] [--clients 50] [--seconds 20]
        [--rate 1] [--modes saturation paced] [--database-url URL]

Without `--database-url` it creates a scratch PostgreSQL database on 127.0.0.1:5432 and drops it;
with one, it upgrades that database and leaves its two studies (`load-<id>`, `writers-<id>`) and its
token there. `--endpoints` measures a subset, `--logs DIR` keeps the server's and the worker's logs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import optuna
import sqlalchemy as sa
from optuna.distributions import distribution_to_json
from optuna.storages._rdb import models as om
from scratch_db import free_port, scratch_database  # benchmarks/, on the path of a script run from it

from converge.core.db import repo
from converge.core.db.engine import get_engine
from converge.core.db.migrate import upgrade
from converge.core.db.models import METRIC_COLUMNS, Study, TrialDiagnosis, TrialMetric
from converge.core.db.optuna_tables import optuna_studies, optuna_trials
from converge.core.settings import Settings
from converge.service import auth
from converge.studies.diagnosis import diagnose
from converge.studies.lifecycle import submit_study
from converge.studies.search_space import PARAM_NAMES, suggest
from converge.studies.spec import parse_spec
from converge.studies.storage import storage_for

REPO = Path(__file__).resolve().parents[1]
PAGE = 100

ENDPOINTS = ("list", "detail", "metrics", "diagnosis", "dashboard")
LABELS = {
    "list": f"GET /v1/studies/{{name}}/trials?limit={PAGE}&cursor=...",
    "detail": "GET /v1/studies/{name}/trials/{number}",
    "metrics": "GET /v1/studies/{name}/trials/{number}/metrics",
    "diagnosis": "GET /v1/studies/{name}/diagnosis",
    "dashboard": "GET /api/studies/{id} (optuna-dashboard)",
}
TARGET_P99_MS = {"list": 100.0, "detail": 100.0, "metrics": 200.0}

# Shapes of the synthetic histories and how often each occurs; lr band: where in the study's lr
# range (log scale, 0..1) the trials of that shape sit, so that the study diagnosis has regions to find.
SHAPES = {
    "converging": (0.34, (0.2, 0.8)),
    "still_improving": (0.14, (0.0, 0.5)),
    "overfitting": (0.12, (0.3, 0.8)),
    "slow": (0.08, (0.0, 0.3)),
    "flat": (0.08, (0.0, 0.25)),
    "oscillating": (0.06, (0.7, 0.95)),
    "diverging": (0.08, (0.8, 1.0)),
    "exploding": (0.05, (0.75, 1.0)),
    "vanishing": (0.05, (0.0, 0.2)),
}
PRUNABLE = {"slow_convergence", "underfitting", "vanishing_gradients", "oscillating"}


# ---------------------------------------------------------------- the studies


def load_spec(name: str, trials: int, epochs: int) -> dict[str, Any]:
    """The measured study: every hyperparameter swept; `epochs` is the smallest epoch count, so
    every trial records exactly that many epochs (complete ones ran all of theirs; pruned and
    failed ones had more planned)."""
    return {
        "name": name,
        "task": {"model": "mlp", "dataset": "sklearn:digits"},
        "objective": {"metric": "val_loss", "direction": "minimize"},
        "search_space": {
            "lr": {"low": 1e-4, "high": 1.0, "log": True},
            "batch_size": {"choices": [32, 64, 128, 256]},
            "epochs": {"low": epochs, "high": 2 * epochs},
            "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
            "dropout": {"low": 0.0, "high": 0.5},
        },
        "n_trials": trials,
        "sampler": {"name": "tpe", "seed": 0},
        "pruner": {"name": "convergence"},
    }


def writer_spec(name: str) -> dict[str, Any]:
    """The study the worker trains during the measurement: small epochs, many of them, no pruning,
    no early stop, more trials than any run gets through."""
    return {
        "name": name,
        "task": {"model": "mlp", "dataset": "sklearn:digits", "params": {"width": 16, "depth": 1}},
        "search_space": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}, "batch_size": {"value": 256},
                         "epochs": {"value": 2000}, "weight_decay": 1e-4, "dropout": 0.0},
        "n_trials": 100,
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
    }


# ---------------------------------------------------------------- synthetic histories


@dataclass
class Template:
    shape: str
    epochs: list[dict[str, Any]]  # metric rows as record_epoch takes them (lr left out)
    diagnosis: dict[str, Any]

    @property
    def objective(self) -> list[float]:
        return [row["val_loss"] for row in self.epochs]


def history(shape: str, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """One synthetic training history of `n` epochs: a 10-class cross-entropy starting near ln 10."""
    t = np.arange(n) / max(n - 1, 1)
    start = math.log(10) * rng.uniform(0.95, 1.05)
    noise = lambda scale: 1 + scale * rng.standard_normal(n)  # noqa: E731
    grad = rng.uniform(0.8, 2.0) * np.exp(-1.5 * t) + 0.2
    floor, rate, gap = rng.uniform(0.05, 0.3), rng.uniform(5, 10), rng.uniform(1.03, 1.2)
    train = floor + (start - floor) * np.exp(-rate * t)
    val = train * gap
    if shape == "still_improving":
        train = floor + (start - floor) * np.exp(-rng.uniform(1.0, 1.8) * t)
        val = train * gap
    elif shape == "overfitting":
        onset = rng.uniform(0.3, 0.6)
        val = np.where(t < onset, val, val[int(onset * (n - 1))] * (1 + rng.uniform(0.8, 1.6) * (t - onset)))
        train = train * np.exp(-1.5 * t)
    elif shape == "slow":
        train = start * (1 - rng.uniform(0.25, 0.4) * t)
        val = train * gap
    elif shape == "flat":
        train = start * rng.uniform(0.85, 0.95) * noise(0.005)
        val = train * rng.uniform(0.98, 1.02)
    elif shape == "oscillating":
        swing = rng.uniform(0.2, 0.4) * (-1) ** np.arange(n)
        train = start * 0.7 * (1 + swing)
        val = train * gap
        grad = grad * (1 + np.abs(swing) * 3)
    elif shape == "diverging":
        onset = int(n * rng.uniform(0.3, 0.7))
        grow = np.exp(np.clip(np.arange(n) - onset, 0, None) * rng.uniform(0.3, 0.6))
        train = train * grow
        val = val * grow
        grad = grad * grow ** 2
        train[-1] = val[-1] = math.nan
    elif shape == "exploding":
        for spike in rng.choice(np.arange(n // 3, n), size=max(2, n // 10), replace=False):
            grad[spike] *= rng.uniform(300, 3000)
            train[spike] *= rng.uniform(1.3, 2.0)
    elif shape == "vanishing":
        train = start * (1 - 0.01 * t) * noise(0.001)
        val = train * 1.01
        grad = np.full(n, 1e-7) * noise(0.1)
    train, val = train * noise(0.01), val * noise(0.01)
    acc = np.clip(1 - val / start, 0.05, 0.995) if shape not in ("flat", "vanishing") else rng.uniform(0.1, 0.2, n)
    param_norm = 10 + 8 * np.sqrt(t) * rng.uniform(0.5, 1.5)
    seconds = rng.uniform(0.04, 0.12) * noise(0.05)
    rows = []
    for i in range(n):
        rows.append({"epoch": i, "train_loss": float(train[i]), "val_loss": float(val[i]),
                     "val_acc": float(acc[i]) if math.isfinite(val[i]) else 0.1, "grad_norm": float(grad[i]),
                     "param_norm": float(param_norm[i]), "epoch_seconds": float(seconds[i])})
    return rows


def templates(epochs: int, per_shape: int, rng: np.random.Generator) -> dict[str, list[Template]]:
    """`per_shape` histories of each shape, each with the diagnosis `diagnose` gives it."""
    pool: dict[str, list[Template]] = {}
    for shape in SHAPES:
        for _ in range(per_shape):
            rows = history(shape, epochs, rng)
            d = diagnose({"objective": {"metric": "val_loss", "direction": "minimize"}, "max_epochs": epochs,
                          "epochs": rows}).to_dict()
            pool.setdefault(shape, []).append(Template(shape, rows, d))
    return pool


# ---------------------------------------------------------------- the fill


@dataclass
class Fill:
    seconds: float
    optuna_seconds: float
    verify_seconds: float
    rows_seconds: float
    optuna_study_id: int
    counts: dict[str, int]
    states: dict[str, int]
    verdicts: dict[str, int]


def _sample(dist: optuna.distributions.BaseDistribution, rng: np.random.Generator, band: tuple[float, float] | None
            = None) -> Any:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return dist.choices[int(rng.integers(len(dist.choices)))]
    u = rng.uniform(*(band or (0.0, 1.0)))
    if isinstance(dist, optuna.distributions.FloatDistribution):
        if dist.log:
            return float(math.exp(math.log(dist.low) + u * (math.log(dist.high) - math.log(dist.low))))
        return float(dist.low + u * (dist.high - dist.low))
    assert isinstance(dist, optuna.distributions.IntDistribution)
    return int(dist.low + round(u * (dist.high - dist.low)))


def _distributions(spec: Any) -> dict[str, optuna.distributions.BaseDistribution]:
    """The distributions the objective's `suggest` records for this spec (asked of a throwaway study)."""
    trial = optuna.create_study().ask()
    suggest(trial, spec.search_space)
    return dict(trial.distributions)


def build_trials(spec: Any, trials: int, epochs: int, rng: np.random.Generator, start: datetime | None = None
                 ) -> tuple[list[optuna.trial.FrozenTrial], list[Template]]:
    """The study's finished trials as Optuna would hold them, and the history each one follows; the first
    starts at `start` (naive UTC, as Optuna keeps it; two days ago by default)."""
    dists = _distributions(spec)
    pool = templates(epochs, 16, rng)
    shapes = list(SHAPES)
    weights = np.array([w for w, _ in SHAPES.values()])
    picks = rng.choice(len(shapes), size=trials, p=weights / weights.sum())
    chosen: list[Template] = []
    frozen: list[optuna.trial.FrozenTrial] = []
    clock = start or datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(days=2)
    pid = os.getpid()
    for number, pick in enumerate(picks):
        shape = shapes[pick]
        template = pool[shape][int(rng.integers(len(pool[shape])))]
        chosen.append(template)
        verdict = template.diagnosis["verdict"]
        params = {p: _sample(dists[p], rng, SHAPES[shape][1] if p == "lr" else None) for p in PARAM_NAMES}
        objective = template.objective
        intermediate = {i: v for i, v in enumerate(objective) if math.isfinite(v)}  # as the objective reports
        attrs: dict[str, Any] = {"converge_worker_pid": pid}
        if not math.isfinite(objective[-1]):
            state, value = optuna.trial.TrialState.FAIL, None
            attrs["error"] = (f"ObjectiveNotFinite: val_loss became {objective[-1]} at epoch {epochs - 1}: "
                              "the trial diverged")
        elif verdict in PRUNABLE and rng.random() < 0.7:
            state, value = optuna.trial.TrialState.PRUNED, objective[-1]
            attrs["converge_pruned_by"] = {"rule": verdict, "epoch": epochs - 1,
                                           "reason": f"{verdict} (confidence {template.diagnosis['confidence']:.2f})"}
        else:
            state, value = optuna.trial.TrialState.COMPLETE, objective[-1]
        # Complete trials ran all their epochs; pruned and failed ones had more planned.
        params["epochs"] = epochs if state == optuna.trial.TrialState.COMPLETE else int(
            rng.integers(epochs + 1, 2 * epochs + 1))
        duration = sum(row["epoch_seconds"] for row in template.epochs) + rng.uniform(0.1, 0.5)
        clock += timedelta(seconds=duration / 2)  # two slots
        frozen.append(optuna.trial.FrozenTrial(
            number=number, state=state, value=value, datetime_start=clock,
            datetime_complete=clock + timedelta(seconds=duration), params=params, distributions=dists,
            user_attrs=attrs, system_attrs={}, intermediate_values=intermediate, trial_id=number))
    return frozen, chosen


def store_optuna_bulk(engine: sa.Engine, optuna_id: int, frozen: list[optuna.trial.FrozenTrial],
                      batch: int = 2000) -> None:
    """The trials into Optuna's tables, many rows per statement, through Optuna's own table definitions
    and stored forms: what `add_trial` writes (numbers in trial-id order, as Optuna counts them),
    without its five queries per intermediate value."""
    trials_table = om.TrialModel.__table__
    returning = sa.insert(trials_table).returning(trials_table.c.trial_id, sort_by_parameter_order=True)
    for first in range(0, len(frozen), batch):
        chunk = frozen[first:first + batch]
        with engine.begin() as conn:
            ids = conn.execute(returning, [
                {"study_id": optuna_id, "number": t.number, "state": t.state, "datetime_start": t.datetime_start,
                 "datetime_complete": t.datetime_complete} for t in chunk]).scalars().all()
            params, values, intermediate, attrs = [], [], [], []
            for trial_id, t in zip(ids, chunk):
                for name, value in t.params.items():
                    dist = t.distributions[name]
                    params.append({"trial_id": trial_id, "param_name": name, "param_value":
                                   dist.to_internal_repr(value), "distribution_json": distribution_to_json(dist)})
                if t.value is not None:
                    stored, kind = om.TrialValueModel.value_to_stored_repr(t.value)
                    values.append({"trial_id": trial_id, "objective": 0, "value": stored, "value_type": kind})
                for step, value in t.intermediate_values.items():
                    stored, kind = om.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
                    intermediate.append({"trial_id": trial_id, "step": step, "intermediate_value": stored,
                                         "intermediate_value_type": kind})
                for key, value in t.user_attrs.items():
                    attrs.append({"trial_id": trial_id, "key": key, "value_json": json.dumps(value)})
            for model, rows in ((om.TrialParamModel, params), (om.TrialValueModel, values),
                                (om.TrialIntermediateValueModel, intermediate), (om.TrialUserAttributeModel, attrs)):
                if rows:
                    conn.execute(sa.insert(model.__table__), rows)
        print(f"  optuna trials: {first + len(chunk)} of {len(frozen)}", flush=True)


def store_optuna_add_trials(study: optuna.Study, frozen: list[optuna.trial.FrozenTrial], batch: int = 500) -> None:
    """The same trials through `Study.add_trials` (one transaction per trial; about 5 queries per intermediate
    value)."""
    for first in range(0, len(frozen), batch):
        study.add_trials(frozen[first:first + batch])
        print(f"  optuna trials: {min(first + batch, len(frozen))} of {len(frozen)}", flush=True)


def verify_optuna(storage: optuna.storages.BaseStorage, optuna_id: int, frozen: list[optuna.trial.FrozenTrial]
                  ) -> float:
    """Read the trials back through Optuna's storage and check they are the trials built; the seconds it took."""
    started = time.perf_counter()
    stored = storage.get_all_trials(optuna_id, deepcopy=False)
    assert len(stored) == len(frozen), f"Optuna reads {len(stored)} trials, {len(frozen)} were added"
    for got, want in zip(stored, frozen):
        same = (got.number == want.number and got.state == want.state and got.value == want.value
                and got.params == want.params and got.distributions == want.distributions
                and got.user_attrs == want.user_attrs and got.intermediate_values == want.intermediate_values
                and got.datetime_start == want.datetime_start and got.datetime_complete == want.datetime_complete)
        assert same, f"Optuna reads trial {want.number} back as\n{got}\nnot as built:\n{want}"
    return time.perf_counter() - started


def store_converge_rows(engine: sa.Engine, study_id: int, ids: dict[int, int], frozen: list[optuna.trial.FrozenTrial],
                        chosen: list[Template], epochs: int) -> None:
    """Per trial, its history's metric rows (`record_epoch`'s columns) and its final diagnosis row
    (`save_diagnosis`'s), many rows per statement."""
    metric_insert, diagnosis_insert = sa.insert(TrialMetric.__table__), sa.insert(TrialDiagnosis.__table__)
    metrics: list[dict[str, Any]] = []
    diagnoses: list[dict[str, Any]] = []
    for number, (template, trial) in enumerate(zip(chosen, frozen)):
        trial_id, lr = ids[number], trial.params["lr"]
        at = trial.datetime_start.replace(tzinfo=timezone.utc)
        for row in template.epochs:
            at += timedelta(seconds=row["epoch_seconds"])
            metrics.append({"study_id": study_id, "trial_id": trial_id, "trial_number": number, "epoch": row["epoch"],
                            "recorded_at": at, "lr": lr, **{c: row[c] for c in METRIC_COLUMNS if c != "lr"}})
        d = template.diagnosis
        diagnoses.append({"study_id": study_id, "trial_id": trial_id, "trial_number": number, "epoch": epochs - 1,
                          "verdict": d["verdict"], "healthy": d["healthy"], "confidence": d["confidence"],
                          "onset_epoch": d["onset_epoch"], "final": True, "diagnosis": repo._json_safe(d),
                          "updated_at": trial.datetime_complete.replace(tzinfo=timezone.utc)})
        if len(metrics) >= 20_000 or number == len(frozen) - 1:
            with engine.begin() as conn:
                conn.execute(metric_insert, metrics)
                conn.execute(diagnosis_insert, diagnoses)
            metrics, diagnoses = [], []


def fill_study(url: str, name: str, trials: int, epochs: int, *, seed: int = 0, how: str = "bulk",
               start: datetime | None = None) -> Fill:
    """Submit the measured study and fill it with `trials` finished trials of `epochs` epochs each.

    `how`: Optuna's rows in bulk (`store_optuna_bulk`) or through `Study.add_trials`; either way they
    are then read back through Optuna's storage and compared with the trials built.
    """
    started = time.perf_counter()
    settings = Settings(database_url=url)
    spec = parse_spec(load_spec(name, trials, epochs))
    submit_study(settings, spec)
    engine = get_engine(url)
    storage = storage_for(settings, patient=False)
    with engine.connect() as conn:
        study_id = conn.scalar(sa.select(Study.id).where(Study.name == name))
    optuna_id = storage.get_study_id_from_name(name)
    frozen, chosen = build_trials(spec, trials, epochs, np.random.default_rng(seed), start)
    optuna_started = time.perf_counter()
    if how == "bulk":
        store_optuna_bulk(engine, optuna_id, frozen)
    else:
        store_optuna_add_trials(optuna.load_study(study_name=name, storage=storage), frozen)
    optuna_seconds = time.perf_counter() - optuna_started
    verify_seconds = verify_optuna(storage, optuna_id, frozen)

    rows_started = time.perf_counter()
    with engine.connect() as conn:
        ids = dict(conn.execute(sa.select(optuna_trials.c.number, optuna_trials.c.trial_id)
                                .where(optuna_trials.c.study_id == optuna_id)).all())
    store_converge_rows(engine, study_id, ids, frozen, chosen, epochs)
    with engine.begin() as conn:  # the study has ended, so no worker claims its slots
        conn.execute(sa.update(Study).where(Study.id == study_id).values(
            state="done", n_claimed=trials, started_at=frozen[0].datetime_start.replace(tzinfo=timezone.utc),
            finished_at=frozen[-1].datetime_complete.replace(tzinfo=timezone.utc)))
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            # What autovacuum does soon after half a million inserts on a default server (its insert
            # threshold): planner statistics, and the visibility map that lets the per-trial epoch
            # counts be index-only scans. (This machine's server runs with autovacuum off.)
            conn.execute(sa.text("VACUUM ANALYZE"))
    rows_seconds = time.perf_counter() - rows_started
    states: dict[str, int] = {}
    verdicts: dict[str, int] = {}
    for trial, template in zip(frozen, chosen):
        states[trial.state.name.lower()] = states.get(trial.state.name.lower(), 0) + 1
        verdicts[template.diagnosis["verdict"]] = verdicts.get(template.diagnosis["verdict"], 0) + 1
    return Fill(time.perf_counter() - started, optuna_seconds, verify_seconds, rows_seconds, optuna_id,
                count_rows(url, name), dict(sorted(states.items())), dict(sorted(verdicts.items())))


def count_rows(url: str, name: str) -> dict[str, int]:
    """The study's rows as stored: Optuna trials and intermediate values, Converge metric and diagnosis rows."""
    with get_engine(url).connect() as conn:
        study_id = conn.scalar(sa.select(Study.id).where(Study.name == name))
        optuna_id = conn.scalar(sa.select(optuna_studies.c.study_id).where(optuna_studies.c.study_name == name))
        trial_ids = sa.select(optuna_trials.c.trial_id).where(optuna_trials.c.study_id == optuna_id)
        return {
            "trials": conn.scalar(sa.select(sa.func.count()).select_from(optuna_trials)
                                  .where(optuna_trials.c.study_id == optuna_id)),
            "intermediate_values": conn.scalar(sa.text(
                "SELECT count(*) FROM trial_intermediate_values WHERE trial_id IN "
                "(SELECT trial_id FROM trials WHERE study_id = :s)"), {"s": optuna_id}),
            "params": conn.scalar(sa.text("SELECT count(*) FROM trial_params WHERE trial_id IN "
                                          "(SELECT trial_id FROM trials WHERE study_id = :s)"), {"s": optuna_id}),
            "metric_rows": conn.scalar(sa.select(sa.func.count()).select_from(TrialMetric)
                                       .where(TrialMetric.study_id == study_id,
                                              TrialMetric.trial_id.in_(trial_ids))),
            "diagnosis_rows": conn.scalar(sa.select(sa.func.count()).select_from(TrialDiagnosis)
                                          .where(TrialDiagnosis.study_id == study_id)),
        }


def metric_rows_of(url: str, name: str) -> int:
    with get_engine(url).connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(TrialMetric).join(Study, Study.id ==
                           TrialMetric.study_id).where(Study.name == name)) or 0


# ---------------------------------------------------------------- processes


@contextlib.contextmanager
def process(args: list[str], url: str, log: Path, stop_timeout_s: float = 45.0) -> Iterator[subprocess.Popen[bytes]]:
    """A `converge` subprocess on this database, its output in `log`; SIGTERM at the end, waited for."""
    env = {**os.environ, "CONVERGE_DATABASE_URL": url, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "converge.service.cli", *args], cwd=REPO, env=env, stdout=out,
                             stderr=subprocess.STDOUT)
        try:
            yield p
        finally:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=stop_timeout_s)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_until(check: Callable[[], bool], what: str, timeout_s: float, proc: subprocess.Popen[bytes],
               log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with status {proc.returncode}:\n{tail(log)}")
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not within {timeout_s:.0f} s:\n{tail(log)}")


def healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/v1/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def settle(base: str, max_wait_s: float, quick_s: float = 0.1) -> float:
    """Give the server time to finish what an earlier window left running (a request cancelled at a window's
    hard end keeps running on the server): until `/v1/health` answers within `quick_s` twice in a row, at
    most `max_wait_s`. Returns the seconds waited."""
    started = time.perf_counter()
    quick = 0
    with httpx.Client(base_url=base, timeout=max_wait_s) as client:
        while quick < 2 and time.perf_counter() - started < max_wait_s:
            sent = time.perf_counter()
            try:
                ok = client.get("/v1/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            quick = quick + 1 if ok and time.perf_counter() - sent <= quick_s else 0
            if not quick:
                time.sleep(0.2)
    return time.perf_counter() - started


# ---------------------------------------------------------------- load


@dataclass
class Window:
    endpoint: str
    clients: int
    seconds: float
    timeout_s: float
    rate: float | None = None  # paced: requests/s per client; None: closed loop (saturation)
    latencies: list[float] = field(default_factory=list)  # 2xx answers, seconds
    errors: dict[str, int] = field(default_factory=dict)  # "HTTP 500", "ReadTimeout", ...
    timeouts: int = 0  # of the errors, requests that ran into their timeout
    unfinished: int = 0  # cancelled at the window's hard end (paced: also those scheduled but never sent)
    scheduled: int = 0  # paced: the requests the clients' schedules held within the window
    idle_clients: int = 0  # clients that got no answer at all
    elapsed: float = 0.0
    writer_rows: int = 0  # epoch rows the worker wrote during the window
    note: str = ""

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())

    def percentile_ms(self, p: float) -> float | None:
        """Nearest rank over the 2xx answers and the requests that timed out or were still unanswered
        at the hard end, the latter as infinitely slow: `inf` means "slower than the timeout"."""
        ordered = sorted(self.latencies) + [math.inf] * (self.timeouts + self.unfinished)
        if not ordered:
            return None
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * 1e3

    @property
    def rps(self) -> float:
        """2xx answers per second, from the window's start until its last request ended."""
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def offered_rps(self) -> float | None:
        return None if self.rate is None else self.rate * self.clients

    def figures(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.n_errors, "error_kinds": dict(self.errors),
                "timeouts": self.timeouts, "unfinished": self.unfinished, "idle_clients": self.idle_clients,
                "rps": self.rps, "offered_rps": self.offered_rps, "scheduled": self.scheduled,
                "p50_ms": self.percentile_ms(50), "p99_ms": self.percentile_ms(99), "elapsed_s": self.elapsed,
                "writer_rows": self.writer_rows}


def schedule(start: float, deadline: float, rate: float, clients: int, i: int) -> Iterator[float]:
    """Client `i`'s send times in a paced window: every 1/rate s from its phase, the clients' phases spread
    over one interval, up to the window's end."""
    interval = 1.0 / rate
    first = start + i * interval / clients
    k = 0
    while (at := first + k * interval) < deadline:  # from the schedule, never from an answer's time
        yield at
        k += 1


async def load_window(base: str, headers: dict[str, str], endpoint: str, path: Callable[[random.Random], str],
                      clients: int, seconds: float, timeout_s: float, seed: int,
                      writes: Callable[[], int] = lambda: 0, rate: float | None = None) -> Window:
    """`clients` clients sending `path(rng)` requests for `seconds`; see the module docstring.

    `rate` None: closed loop, each client's requests back to back, latency from sending each one.
    `rate` R: open loop, each client on its own schedule of R requests/s (`schedule`), latency from
    each request's scheduled send time, however late it could be sent. `writes()` counts the
    writers' rows; it is read just before the window and just after it.
    """
    window = Window(endpoint, clients, seconds, timeout_s, rate)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    sessions = [httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=timeout_s)
                for _ in range(clients)]
    answered = [0] * clients
    try:
        # One connection each, open before the clock starts; then one uncounted request of the endpoint.
        await asyncio.gather(*(s.get("/v1/health") for s in sessions))
        try:
            warm = await sessions[0].get(path(random.Random(seed)))
            if not warm.is_success:
                window.note = f"the uncounted first request answered HTTP {warm.status_code}: {warm.text[:200]}"
        except httpx.HTTPError as exc:
            window.note = f"the uncounted first request failed: {type(exc).__name__}: {exc}"

        async def client(i: int, start: float, deadline: float) -> None:
            rng = random.Random(seed * 1000 + i)
            session = sessions[i]
            paced = schedule(start, deadline, rate, clients, i) if rate is not None else None
            while True:
                if paced is not None:
                    sent = next(paced, None)  # latency counts from here, whenever the request goes out
                    if sent is None:
                        return
                    if sent > time.perf_counter():
                        await asyncio.sleep(sent - time.perf_counter())
                    url = path(rng)
                else:
                    if time.perf_counter() >= deadline:
                        return
                    url = path(rng)
                    sent = time.perf_counter()
                try:
                    response = await session.get(url)  # the whole body is read before it returns
                except httpx.HTTPError as exc:
                    kind = type(exc).__name__
                    window.errors[kind] = window.errors.get(kind, 0) + 1
                    window.timeouts += isinstance(exc, httpx.TimeoutException)
                    continue
                took = time.perf_counter() - sent
                if response.is_success:
                    window.latencies.append(took)
                    answered[i] += 1
                else:
                    kind = f"HTTP {response.status_code}"
                    window.errors[kind] = window.errors.get(kind, 0) + 1
                    if not window.note:
                        window.note = f"{kind} for {url}: {response.text[:200]}"

        written = writes()
        started = time.perf_counter()
        deadline = started + seconds
        tasks = [asyncio.create_task(client(i, started, deadline)) for i in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=seconds + timeout_s + 1.0)
        window.elapsed = time.perf_counter() - started
        window.writer_rows = writes() - written
        for task in pending:  # still waiting on an answer (or, paced, behind its schedule) at the hard end
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if rate is None:
            window.unfinished = len(pending)
        else:  # every scheduled request that got no answer and no error: in flight or never sent
            window.scheduled = sum(1 for i in range(clients) for _ in schedule(started, deadline, rate, clients, i))
            window.unfinished = window.scheduled - window.requests - window.n_errors
        for task in done:
            task.result()
        window.idle_clients = sum(1 for n in answered if n == 0)
    finally:
        await asyncio.gather(*(s.aclose() for s in sessions), return_exceptions=True)
    return window


def walk_cursors(base: str, headers: dict[str, str], name: str) -> tuple[list[str | None], bool]:
    """Every page's cursor (None: the first page), and whether the endpoint returns pages at all."""
    cursors: list[str | None] = [None]
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        while True:
            params = {"limit": PAGE} | ({"cursor": cursors[-1]} if cursors[-1] else {})
            response = client.get(f"/v1/studies/{name}/trials", params=params)
            response.raise_for_status()
            body = response.json()
            if isinstance(body, list):
                return [None], False
            if not body.get("next_cursor"):
                return cursors, True
            cursors.append(body["next_cursor"])


def request_paths(name: str, optuna_id: int, trials: int, cursors: list[str | None]
                  ) -> dict[str, Callable[[random.Random], str]]:
    def page(rng: random.Random) -> str:
        cursor = rng.choice(cursors)
        return f"/v1/studies/{name}/trials?limit={PAGE}" + (f"&cursor={cursor}" if cursor else "")

    return {
        "list": page,
        "detail": lambda rng: f"/v1/studies/{name}/trials/{rng.randrange(trials)}",
        "metrics": lambda rng: f"/v1/studies/{name}/trials/{rng.randrange(trials)}/metrics",
        "diagnosis": lambda rng: f"/v1/studies/{name}/diagnosis",
        "dashboard": lambda rng: f"/api/studies/{optuna_id}",
    }


# ---------------------------------------------------------------- output


def _ms(value: float | None, timeout_s: float) -> str:
    if value is None:
        return "-"
    return f">{timeout_s * 1e3:.0f}" if math.isinf(value) else f"{value:.1f}"


def _ratio(p99: float | None, dash: float | None, timeout_s: float) -> str:
    """p99 over the dashboard's; a bound where one of them is only known to exceed the timeout."""
    if p99 is None or dash is None or (math.isinf(p99) and math.isinf(dash)):
        return "-"
    if math.isinf(dash):
        return f"<{p99 / (timeout_s * 1e3):.3f}x"
    if math.isinf(p99):
        return f">{timeout_s * 1e3 / dash:.3f}x"
    return f"{p99 / dash:.3f}x"


MODES = ("saturation", "paced")


def title(mode: str, args: argparse.Namespace) -> str:
    if mode == "saturation":
        return (f"SATURATION: closed loop, {args.clients} clients each sending its next request as soon as the last "
                "one is answered: the most requests/s the server manages (latency from each send)")
    return (f"PACED: open loop, {args.clients} clients x {args.rate:g} requests/s each = {args.clients * args.rate:g} "
            "requests/s offered (latency from each request's scheduled send time); the targets are judged here")


def table(mode: str, windows: dict[str, Window], args: argparse.Namespace) -> None:
    """One run's table: per endpoint, answers, errors, requests/s, p50 and p99; paced, also what was offered
    and the targets."""
    paced = mode == "paced"
    dash = windows["dashboard"].percentile_ms(99) if "dashboard" in windows else None
    header = (f"{'endpoint':<52} " + (f"{'offered/s':>9} " if paced else "") + f"{'requests':>8} {'errors':>6} "
              f"{'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} " + (f"{'target':>8}  {'met':<7} " if paced else "")
              + f"{'p99/dashboard':>13}")
    print(f"\n{title(mode, args)}\n{header}\n{'-' * len(header)}")
    for key, w in windows.items():
        p99 = w.percentile_ms(99)
        columns = f"{LABELS[key]:<52} " + (f"{w.offered_rps:>9.1f} " if paced else "")
        columns += (f"{w.requests:>8} {w.n_errors:>6} {w.rps:>7.1f} {_ms(w.percentile_ms(50), args.timeout):>8} "
                    f"{_ms(p99, args.timeout):>8} ")
        if paced:
            target = TARGET_P99_MS.get(key)
            met = "-" if target is None else ("NO DATA" if p99 is None else "met" if p99 <= target else "NOT met")
            columns += f"{f'<= {target:.0f}' if target else '-':>8}  {met:<7} "
        print(columns + f"{_ratio(p99, dash, args.timeout):>13}")
    if not paced:
        print(f"(no targets here: with {args.clients} clients and no pause, mean latency is {args.clients} / (req/s) "
              "by Little's law; the targets are judged on the paced table)")


def report(runs: dict[str, dict[str, Window]], args: argparse.Namespace, pages: bool, n_cursors: int) -> None:
    for mode, windows in runs.items():
        table(mode, windows, args)
    print(f"\nwindows: {args.seconds:g} s each, {args.clients} clients; elapsed (last request ended) and epoch rows "
          f"the 2 worker slots wrote:")
    for mode, windows in runs.items():
        for key, w in windows.items():
            extra = []
            if w.unfinished:
                what = "requests unfinished or never sent" if mode == "paced" else "requests unfinished"
                extra.append(f"{w.unfinished} {what} at the hard end ({args.seconds + args.timeout + 1:g} s), counted "
                             "as slower than the timeout")
            if w.idle_clients:
                extra.append(f"{w.idle_clients} of {w.clients} clients got no answer within the window")
            if w.requests and w.requests < 100:
                extra.append(f"p99 of only {w.requests} requests is their slowest")
            print(f"  {mode:<10} {key:<10} {w.elapsed:6.1f} s, {w.writer_rows:5d} epoch rows written" +
                  (f"; {'; '.join(extra)}" if extra else ""))
    if not pages:
        print(f"  NOTE: the trial list returned a plain list, not pages: the list requests were ?limit={PAGE} only")
    else:
        print(f"  list cursors: {n_cursors} pages of {PAGE}, chosen at random")
    every = [(mode, key, w) for mode, windows in runs.items() for key, w in windows.items()]
    for mode, key, w in every:
        if w.n_errors or w.note:
            print(f"\n!!! {mode} {key}: {w.n_errors} ERRORS {w.errors}" + (f"; {w.note}" if w.note else ""))
    if any(w.n_errors for _, _, w in every):
        print("!!! THIS RUN HAD ERRORS: the latencies leave failed answers out, except timeouts, which count as "
              f"slower than the {args.timeout:g} s timeout (a figure shown as >{args.timeout * 1e3:.0f})")
    if any(w.writer_rows == 0 for _, _, w in every):
        print("!!! the worker wrote no epoch row during at least one window: not measured under writes")


def print_server_errors(log: Path) -> None:
    """The exceptions the server logged, each distinct one with how often."""
    exceptions = Counter(line.strip()[:300] for line in log.read_text(errors="replace").splitlines()
                         if re.match(r"^[\w.]+(Error|Exception|Timeout)\w*: ", line.strip()))
    print(f"\nthe server logged {sum(exceptions.values())} exceptions" + (":" if exceptions else ""))
    for line, n in exceptions.most_common(8):
        print(f"  {n:5d} x {line}")


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per endpoint")
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logs", type=Path, default=None,
                        help="keep the server's and the worker's logs in this folder (default: a temporary one)")
    parser.add_argument("--rate", type=float, default=1.0,
                        help="paced run: requests per second per client, each client on its own schedule (default 1)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="saturation (closed loop: the most requests/s) and/or paced (open loop at --rate: the "
                             "targets); default both")
    parser.add_argument("--endpoints", nargs="+", choices=ENDPOINTS, default=list(ENDPOINTS),
                        help="measure only these (the ratio column needs the dashboard)")
    parser.add_argument("--fill", choices=("bulk", "add_trials"), default="bulk",
                        help="Optuna's rows many per statement (default), or through Study.add_trials (about 0.13 s "
                             "a 50-epoch trial on PostgreSQL here: over 20 minutes for 10,000)")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.epochs < 2 or args.clients < 1 or args.seconds <= 0 or args.timeout <= 0:
        parser.error("--trials and --clients must be >= 1, --epochs >= 2, --seconds and --timeout > 0")
    if not args.rate > 0 or not math.isfinite(args.rate):
        parser.error("--rate must be > 0")
    args.modes = [mode for mode in MODES if mode in args.modes]  # saturation first in the output
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print its tables; returns the figures (per run, `saturation` and `paced`: per
    endpoint; the fill, the names)."""
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_id = uuid.uuid4().hex[:8]
    name, writers = f"load-{run_id}", f"writers-{run_id}"
    with scratch_database(args.database_url) as url, tempfile.TemporaryDirectory(prefix="api_load_") as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        print(f"machine: {os.cpu_count()} cores, {platform.platform()}, python {platform.python_version()}; "
              "load average now: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
        print(f"database: {sa.make_url(url).get_backend_name()}; study {name!r}: {args.trials} trials x "
              f"{args.epochs} epochs", flush=True)
        upgrade(url)
        fill = fill_study(url, name, args.trials, args.epochs, seed=args.seed, how=args.fill)
        print(f"fill: {fill.seconds:.1f} s ({fill.optuna_seconds:.1f} s Optuna's rows ({args.fill}), "
              f"{fill.verify_seconds:.1f} s reading them back through Optuna's storage to check them, "
              f"{fill.rows_seconds:.1f} s Converge's metric and diagnosis rows); stored: "
              + ", ".join(f"{k} {v}" for k, v in fill.counts.items()))
        print("  states: " + ", ".join(f"{k} {v}" for k, v in fill.states.items()))
        print("  verdicts: " + ", ".join(f"{k} {v}" for k, v in fill.verdicts.items()), flush=True)

        token, _ = auth.create_token(get_engine(url), "read", "api_load benchmark")
        headers = {"Authorization": f"Bearer {token}"}
        submit_study(Settings(database_url=url), parse_spec(writer_spec(writers)))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server_log, worker_log = logs / "serve.log", logs / "worker.log"
        with process(["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "0"], url,
                     server_log) as server, \
                process(["worker", "--devices", "cpu", "--slots-per-device", "2"], url, worker_log) as worker:
            wait_until(lambda: healthy(base), "the API server's /v1/health", 60, server, server_log)
            wait_until(lambda: metric_rows_of(url, writers) >= 4, "the worker's first epochs", 180, worker,
                       worker_log)
            cursors, pages = walk_cursors(base, headers, name)
            paths = request_paths(name, fill.optuna_study_id, args.trials, cursors)
            print(f"server: converge serve --workers 0 on {base}; worker: converge worker --devices cpu "
                  f"--slots-per-device 2 on study {writers!r}; a read token on every request")
            modes = ", ".join(f"paced at {args.rate:g} requests/s per client" if m == "paced" else m
                              for m in args.modes)
            print(f"load: {args.clients} clients, {args.seconds:g} s per endpoint and run ({modes}), request timeout "
                  f"{args.timeout:g} s, hard end {args.seconds + args.timeout + 1:g} s", flush=True)
            runs: dict[str, dict[str, Window]] = {mode: {} for mode in args.modes}
            for i, key in enumerate(args.endpoints):
                for mode in sorted(args.modes, key=lambda m: m != "paced"):  # per endpoint, the paced window first
                    waited = settle(base, args.timeout)
                    w = runs[mode][key] = asyncio.run(load_window(
                        base, headers, key, paths[key], args.clients, args.seconds, args.timeout,
                        args.seed + 2 * i + (mode == "paced"), writes=lambda: metric_rows_of(url, writers),
                        rate=args.rate if mode == "paced" else None))
                    print(f"  {mode} {key}: {w.requests} requests, {w.n_errors} errors, "
                          f"p99 {_ms(w.percentile_ms(99), args.timeout)} ms"
                          + (f" (waited {waited:.1f} s before it for the server to finish earlier requests)"
                             if waited >= 1 else ""), flush=True)
                    if worker.poll() is not None:
                        raise RuntimeError(f"the worker exited during the load:\n{tail(worker_log)}")
        report(runs, args, pages, len(cursors))
        if any(w.n_errors for windows in runs.values() for w in windows.values()):
            print_server_errors(server_log)
        return {"study": name, "optuna_study_id": fill.optuna_study_id, "fill_seconds": fill.seconds,
                "counts": fill.counts, "states": fill.states, "verdicts": fill.verdicts, "pages": pages,
                "cursors": len(cursors), "rate": args.rate,
                **{mode: {k: w.figures() for k, w in windows.items()} for mode, windows in runs.items()}}


if __name__ == "__main__":
    main()
