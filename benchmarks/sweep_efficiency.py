"""Does diagnosis-aware pruning buy the same study for fewer epochs?

For each task (the digits MLP, a classification; an MLP on Friedman #1, a regression; and, with
`--tasks`, an MLP on sklearn's diabetes, a regression whose 88 validation rows make its target
a matter of noise) and each seed, real Converge studies run on a scratch SQLite database, trial
after trial in this process the way `converge sweep` runs them (claim a slot, `run_slot`: train,
record, diagnose, prune, auto-repair), under six configurations:

    random                   random sampler, no pruning, N trials
    tpe                      TPE, no pruning, N trials            (the reference)
    tpe+hyperband            TPE + Optuna's Hyperband over epochs
    tpe+convergence          TPE + Converge's convergence pruner (Hyperband + diagnosis rules)
    tpe+convergence+repair   the same, with auto_repair: {max: 5}
    tpe+convergence+sha      the convergence pruner over successive halving (`base: sha`)

The target is the median over seeds of `tpe`'s final best at its full budget. The pruned
configurations run until they have trained as many epochs as `tpe` did (median over seeds),
so each has had the same compute. For every run the table gives the epochs and the wall time
until its best value first reached the target, and its best value within that equal epoch
budget; ratios are to `tpe`. The data split and initial weights are the same in every run
(`task.seed`); seeds vary the sampler only.

"Stopped early" counts the trials the convergence pruner completed early because their diagnosis
said they were done (converged or overfitting). Each trial that a diagnosis rule pruned is then
trained again in full, unpruned, with the same
parameters and seed, and diagnosed: "healthy on rerun" counts the rule's mistakes.

    .venv/bin/python benchmarks/sweep_efficiency.py [--seeds 10] [--trials 30] [--tasks digits,friedman1] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.db.migrate import upgrade
from converge.core.settings import Settings
from converge.studies.diagnosis import diagnose
from converge.studies.lifecycle import submit_study
from converge.studies.objective import HISTORY_KEYS, train_config
from converge.studies.pruning import CONVERGENCE_RULES, PRUNED_BY_ATTR, STOPPED_EARLY_ATTR
from converge.studies.runner import run_slot
from converge.studies.spec import MAX_TRIALS, StudySpec, parse_spec

REFERENCE = "tpe"

TASKS: dict[str, dict[str, Any]] = {  # the task and the search space's fixed parts
    "digits": {"task": {"model": "mlp", "dataset": "sklearn:digits", "params": {"width": 64, "depth": 1}, "seed": 0},
               "epochs": 20, "batch_size": [32, 64, 128]},
    "diabetes": {"task": {"model": "mlp", "dataset": "sklearn:diabetes", "params": {"width": 64, "depth": 2},
                          "seed": 0},
                 "epochs": 30, "batch_size": [16, 32, 64]},
    "friedman1": {"task": {"model": "mlp", "dataset": "sklearn:friedman1", "params": {"width": 64, "depth": 2},
                           "seed": 0},
                  "epochs": 30, "batch_size": [16, 32, 64]},
}

CONFIGS: dict[str, dict[str, Any]] = {  # sampler, pruner, auto_repair
    "random": {"sampler": "random", "pruner": {"name": "none"}},
    "tpe": {"sampler": "tpe", "pruner": {"name": "none"}},
    "tpe+hyperband": {"sampler": "tpe", "pruner": {"name": "hyperband"}},
    "tpe+convergence": {"sampler": "tpe", "pruner": {"name": "convergence"}},
    "tpe+convergence+repair": {"sampler": "tpe", "pruner": {"name": "convergence"}, "auto_repair": {"max": 5}},
    "tpe+convergence+sha": {"sampler": "tpe", "pruner": {"name": "convergence", "base": "sha"}},
}
UNPRUNED = ("random", "tpe")


@dataclass
class TrialOutcome:
    number: int
    state: str
    value: float | None  # complete trials only: a pruned trial has no final value
    epochs: int
    seconds: float  # since the run started, when the trial ended
    params: dict[str, Any]
    pruned_by: dict[str, Any] | None
    stopped_early: dict[str, Any] | None = None  # completed early by the convergence pruner (converged, overfitting)


@dataclass
class Run:
    task: str
    config: str
    seed: int
    spec: StudySpec
    trials: list[TrialOutcome] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return sum(t.epochs for t in self.trials)

    def best_within(self, epoch_budget: float) -> float | None:
        """The best complete value among the trials that ended within the budget."""
        spent, best = 0, None
        for t in self.trials:
            spent += t.epochs
            if spent > epoch_budget:
                break
            if t.value is not None and (best is None or t.value < best):
                best = t.value
        return best

    def to_target(self, target: float) -> tuple[int, float] | None:
        """Epochs and seconds until the best value first reached `target`; None if it never did."""
        spent = 0
        for t in self.trials:
            spent += t.epochs
            if t.value is not None and t.value <= target:
                return spent, t.seconds
        return None


def study_spec(task: str, config: str, seed: int, n_trials: int) -> StudySpec:
    fixed, chosen = TASKS[task], CONFIGS[config]
    spec = {
        # One name for every configuration: Hyperband puts a trial in a bracket by a hash of the study's
        # name and the trial number, so the pruned configurations differ by their rules, not by their luck.
        "name": f"{task}-{seed}",
        "task": fixed["task"],
        "objective": {"metric": "val_loss", "direction": "minimize"},
        "search_space": {"lr": {"low": 1e-5, "high": 1.0, "log": True}, "batch_size": {"choices": fixed["batch_size"]},
                         "epochs": fixed["epochs"], "weight_decay": {"low": 1e-6, "high": 1e-1, "log": True},
                         "dropout": {"low": 0.0, "high": 0.5}},
        "n_trials": n_trials,
        "sampler": {"name": chosen["sampler"], "seed": seed},
        "pruner": chosen["pruner"],
        "auto_repair": chosen.get("auto_repair"),
    }
    return parse_spec(spec)


def run_study(workdir: Path, spec: StudySpec, task: str, config: str, seed: int,
              epoch_budget: float | None) -> Run:
    """Run the study's trials one by one until its n_trials, or until `epoch_budget` epochs were trained."""
    url = f"sqlite:///{workdir / config.replace('+', '-')}-{spec.name}.db"
    upgrade(url)
    settings = Settings(database_url=url)
    submit_study(settings, spec)
    engine = get_engine(url)
    run = Run(task, config, seed, spec)
    epochs_seen: list[int] = []
    started = time.perf_counter()
    while epoch_budget is None or run.epochs < epoch_budget:
        with session_scope(engine) as session:
            slot = repo.claim_trial_slot(session, study_name=spec.name)
        if slot is None:
            break
        epochs_seen.clear()
        trial = run_slot(settings, slot, on_epoch=lambda _trial, metrics: epochs_seen.append(metrics["epoch"]))
        assert trial is not None
        run.trials.append(TrialOutcome(
            number=trial.number, state=trial.state.name.lower(),
            value=trial.value if trial.state == optuna.trial.TrialState.COMPLETE else None,
            epochs=len(epochs_seen), seconds=time.perf_counter() - started, params=dict(trial.params),
            pruned_by=trial.user_attrs.get(PRUNED_BY_ATTR), stopped_early=trial.user_attrs.get(STOPPED_EARLY_ATTR)))
    engine.dispose()
    return run


def warm_up() -> None:
    """Import and run the trainer once, so the first timed run pays no import or first-call cost."""
    from converge.trainers import TrainConfig, fit

    fit(TrainConfig(epochs=1, device="cpu", params={"width": 8, "depth": 1}))


def healthy_on_full_rerun(run: Run, trial: TrialOutcome) -> bool:
    """Train the pruned trial again to its last epoch, unpruned, and diagnose the whole history."""
    from converge.trainers import fit

    spec = run.spec
    config = train_config(spec, trial.params, device="cpu")
    result = fit(config)
    history = {"objective": {"metric": spec.objective.metric, "direction": spec.objective.direction},
               "max_epochs": config.epochs,
               "epochs": [{key: epoch.get(key) for key in HISTORY_KEYS} for epoch in result.epochs]}
    return bool(diagnose(history).healthy)


def _to_target(runs: list[Run], target: float) -> tuple[float, float]:
    """Median epochs and seconds to the target; a run that never reached it counts as infinity."""
    hits = [r.to_target(target) for r in runs]
    return (statistics.median(h[0] if h else math.inf for h in hits),
            statistics.median(h[1] if h else math.inf for h in hits))


def _ratio(value: float, reference: float) -> float | None:
    """value / reference; None where either is infinite (a median run that never reached the target)."""
    return value / reference if math.isfinite(value) and math.isfinite(reference) and reference else None


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def report(task: str, runs: dict[str, list[Run]]) -> dict[str, Any]:
    """Print the task's table and return its figures."""
    reference = runs[REFERENCE]
    target = statistics.median(r.best_within(math.inf) for r in reference)
    budget = statistics.median(r.epochs for r in reference)
    ref_to_target, ref_seconds = _to_target(reference, target)
    ref_best = statistics.median(r.best_within(budget) for r in reference)
    print(f"\n{task}: target val_loss {target:.4f} (median final best of {REFERENCE}); "
          f"equal budget {budget:.0f} epochs")
    header = ["config", "reached", "epochs to target", f"/ {REFERENCE} budget", f"/ {REFERENCE} to target",
              "seconds to target", f"/ {REFERENCE}", "best at budget", f"vs {REFERENCE}", "vs tpe+hyperband",
              "trials", "stopped early", "pruned by rule", "healthy on rerun"]
    rows = [header]
    figures: dict[str, Any] = {"target": target, "budget": budget}
    hyperband_best = statistics.median(r.best_within(budget) for r in runs["tpe+hyperband"]) \
        if "tpe+hyperband" in runs else None
    for config, config_runs in runs.items():
        hits = [r.to_target(target) for r in config_runs]
        epochs, seconds = _to_target(config_runs, target)
        bests = [b for r in config_runs if (b := r.best_within(budget)) is not None]
        best = statistics.median(bests) if bests else None
        rule_pruned = [(r, t) for r in config_runs for t in r.trials
                       if t.pruned_by and t.pruned_by.get("rule") in CONVERGENCE_RULES]
        healthy = sum(healthy_on_full_rerun(r, t) for r, t in rule_pruned)
        figures[config] = {"epochs_to_target": epochs, "ratio_budget": _ratio(epochs, budget),
                           "ratio_to_target": _ratio(epochs, ref_to_target),
                           "seconds_to_target": seconds, "best_at_budget": best,
                           "vs_hyperband": (best - hyperband_best) / abs(hyperband_best)
                           if best is not None and hyperband_best else None,
                           "rule_pruned": len(rule_pruned), "healthy_on_rerun": healthy}
        f = figures[config]
        rows.append([config, f"{sum(h is not None for h in hits)}/{len(hits)}", _fmt(epochs, ".0f"),
                     _fmt(f["ratio_budget"], ".2f"), _fmt(f["ratio_to_target"], ".2f"), _fmt(seconds, ".1f"),
                     _fmt(_ratio(seconds, ref_seconds), ".2f"), _fmt(best),
                     _fmt((best - ref_best) / abs(ref_best) if best is not None else None, "+.1%"),
                     _fmt(f["vs_hyperband"], "+.1%"),
                     _fmt(statistics.median(len(r.trials) for r in config_runs), ".0f"),
                     str(sum(t.stopped_early is not None for r in config_runs for t in r.trials))
                     if config not in UNPRUNED else "-",
                     str(len(rule_pruned)) if config not in UNPRUNED else "-",
                     str(healthy) if config not in UNPRUNED else "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print_targets(figures)
    return figures


def print_targets(figures: dict[str, Any]) -> None:
    """The issue's three targets for TPE + the convergence pruner, met or not."""
    conv = figures.get("tpe+convergence")
    if conv is None:
        return

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    ratio, gap = conv["ratio_budget"], conv["vs_hyperband"]
    healthy = sum(figures[c]["healthy_on_rerun"] for c in figures if c.startswith("tpe+convergence"))
    print(f"targets, tpe+convergence: epochs to target / {REFERENCE}'s budget {_fmt(ratio, '.2f')} (<= 0.25: "
          f"{verdict(ratio is not None and ratio <= 0.25)}); best at equal budget vs tpe+hyperband "
          f"{_fmt(gap, '+.1%')} (<= +2%: {verdict(gap is not None and gap <= 0.02)}); healthy trials pruned by "
          f"a rule {healthy} (0: {verdict(healthy == 0)})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="sampler seeds per configuration: with 5, the medians "
                        "swung by 10-20%% from one run to the next")
    parser.add_argument("--trials", type=int, default=30, help="N: the unpruned configurations' trials")
    parser.add_argument("--tasks", default="digits,friedman1", help=f"of {','.join(TASKS)}")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    tasks, configs = args.tasks.split(","), args.configs.split(",")
    unknown = [t for t in tasks if t not in TASKS] + [c for c in configs if c not in CONFIGS]
    if unknown or REFERENCE not in configs:
        parser.error(f"unknown task or config {unknown}; the configs must include {REFERENCE!r}")
    import torch

    # One thread, as a worker's slot on a shared machine: torch's threads spin-wait when the cores are
    # busy, which makes trials many times slower at random and the wall times meaningless.
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warm_up()
    figures = {}
    with tempfile.TemporaryDirectory(prefix="converge-sweep-bench-") as scratch:
        for task in tasks:
            runs: dict[str, list[Run]] = {}
            for config in [REFERENCE] + [c for c in configs if c != REFERENCE]:  # the reference sets the budget
                budget = None if config in UNPRUNED else statistics.median(r.epochs for r in runs[REFERENCE])
                n_trials = args.trials if config in UNPRUNED else min(MAX_TRIALS, args.trials * 20)
                runs[config] = []
                for seed in range(args.seeds):
                    spec = study_spec(task, config, seed, n_trials)
                    runs[config].append(run_study(Path(scratch), spec, task, config, seed, budget))
                    done = runs[config][-1]
                    print(f"  {task} {config} seed {seed}: {len(done.trials)} trials, {done.epochs} epochs, "
                          f"{done.trials[-1].seconds:.1f} s", file=sys.stderr, flush=True)
            figures[task] = report(task, runs)
    return figures


if __name__ == "__main__":
    main()
