"""Does the convergence pruner reach a good study for fewer epochs than Hyperband? A paired panel.

For each task of the panel and each sampler seed, real Converge studies run on a scratch SQLite
database, trial after trial in this process the way `converge sweep` runs them (claim a slot,
`run_slot`: train, record, diagnose, prune), once per arm, every arm on the same seeds:

    tpe                 TPE, no pruning                                  (sets the target)
    tpe+hyperband       TPE + Optuna's Hyperband over epochs             (the ratios' reference)
    tpe+sha             TPE + successive halving
    tpe+convergence     TPE + Converge's default pruner (Hyperband, the diagnosis rules, the
                        learning-curve extrapolation, early stop)
    tpe+first-epoch     train every trial one epoch, continue it only if that epoch ranks in the
                        top quarter of the first epochs so far (`FirstEpochTopK`): a strong simple
                        baseline from the literature

and, when named in `--arms`, ablations of the default pruner: `tpe+convergence-no-early-stop` and
`tpe+convergence-no-extrapolation` (what its early stop and its extrapolation each buy).

Tasks: `digits` (MLP), `friedman1` (MLP, a regression), `slow-starter` (an MLP plug-in on an
unscaled 4-class tabular set, 2,400 rows: its loss barely moves for the first epochs), `cnn` (the
CNN on the digits images) and `plugin` (the examples' tabular regression plug-in, objective
`val_mae`). Each task's epochs are fixed (the resource the pruners share); the rest of the search
space is wide. The data split and initial weights are the same in every run (`task.seed`); seeds vary
the sampler only. Every arm runs `--trials` N trials, then, if it has trained fewer epochs than
`tpe`'s median total, more trials until it has.

Per task, for every arm (medians over seeds): the seeds whose best reached the target (`tpe`'s
median best after N trials, 2% worse), the epochs until then as a ratio to `tpe+hyperband`'s (0
where only Hyperband's median run never got there), the best after N trials against Hyperband's
(equal trial budget), the best within `tpe`'s epochs (equal epoch budget), and the convergence
pruner's wrong prunes, each pruned trial trained again in full: a diagnosis rule's prune is wrong
when the rerun is healthy (the rule said it was not); an extrapolation prune is wrong when the rerun
ends better than the k-th best completed value it was judged against (the forecast said it would
not; a healthy trial that is merely not competitive is what this rule is for). Then the panel: the
medians over tasks and the issue's targets for the default pruner, met or not.

    .venv/bin/python benchmarks/sweep_efficiency.py [--seeds 8] [--first-seed 0] [--trials 24]
        [--tasks digits,friedman1,slow-starter,cnn,plugin] [--arms ...] [--threads 1]

One task alone: `--tasks slow-starter`. Keep seeds you look at while changing the pruner apart from
the seeds you report (`--first-seed`): a panel tuned on the seeds it reports flatters the pruner.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.db.migrate import upgrade
from converge.core.settings import Settings
from converge.studies.diagnosis import diagnose
from converge.studies.lifecycle import submit_study
from converge.studies.objective import HISTORY_KEYS, train_config
from converge.studies.pruning import CONVERGENCE_RULES, EXTRAPOLATION, PRUNED_BY_ATTR, STOPPED_EARLY_ATTR, kth_best
from converge.studies.runner import run_slot, study_for
from converge.studies.spec import MAX_TRIALS, StudySpec, parse_spec

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]  # the plug-in tasks

REFERENCE, RATIO_TO = "tpe", "tpe+hyperband"
TARGET_SLACK = 0.02  # the target: tpe's median best, 2% worse

PLUGIN = "sweep_task_plugins"
TASKS: dict[str, dict[str, Any]] = {  # the task, its fixed epochs and batch sizes, and its objective metric
    "digits": {"task": {"model": "mlp", "dataset": "sklearn:digits", "params": {"width": 64, "depth": 1}},
               "epochs": 20, "batch_size": [32, 64, 128]},
    "friedman1": {"task": {"model": "mlp", "dataset": "sklearn:friedman1", "params": {"width": 64, "depth": 2}},
                  "epochs": 30, "batch_size": [16, 32, 64]},
    "slow-starter": {"task": {"model": f"{PLUGIN}:build_four_classes", "data": f"{PLUGIN}:build_slow_starter"},
                     "epochs": 40, "batch_size": [32, 64, 128]},
    "cnn": {"task": {"model": "cnn", "dataset": "sklearn:digits", "params": {"channels": 8}},
            "epochs": 15, "batch_size": [32, 64, 128]},
    "plugin": {"task": {"model": "converge_examples.tabular:build_model",
                        "data": "converge_examples.tabular:build_data"},
               "epochs": 30, "batch_size": [32, 64, 128], "metric": "val_mae"},
}

ARMS: dict[str, dict[str, Any]] = {  # the spec's pruner (first-epoch: the study's pruner is replaced)
    "tpe": {"name": "none"},
    "tpe+hyperband": {"name": "hyperband"},
    "tpe+sha": {"name": "sha"},
    "tpe+convergence": {"name": "convergence"},
    "tpe+first-epoch": {"name": "median"},
}
# Ablations of the default pruner, run only when named (`--arms`): what each of its parts buys.
ABLATIONS: dict[str, dict[str, Any]] = {
    "tpe+convergence-no-early-stop": {"name": "convergence", "early_stop": False},
    "tpe+convergence-no-extrapolation": {"name": "convergence", "extrapolation": False},
}
UNPRUNED = ("tpe",)


class FirstEpochTopK(optuna.pruners.BasePruner):
    """After a trial's first epoch, prune it unless that epoch ranks in the best `keep` share of the
    first epochs of the study's trials so far (once `startup` of them exist); never prune later."""

    def __init__(self, keep: float = 0.25, startup: int = 4):
        self.keep, self.startup = keep, startup

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if trial.last_step != 0:
            return False
        value = trial.intermediate_values[0]
        others = [t.intermediate_values[0] for t in study.get_trials(deepcopy=False, states=(
            TrialState.COMPLETE, TrialState.PRUNED)) if 0 in t.intermediate_values]
        if len(others) < self.startup:
            return False
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        better = sum((v > value) if maximize else (v < value) for v in others)
        return better >= self.keep * (len(others) + 1)


@dataclass
class TrialOutcome:
    number: int
    state: str
    value: float | None  # complete trials only: a pruned trial has no final value
    epochs: int
    params: dict[str, Any]
    pruned_by: dict[str, Any] | None
    stopped_early: dict[str, Any] | None = None


@dataclass
class Run:
    task: str
    arm: str
    seed: int
    spec: StudySpec
    trials: list[TrialOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def maximize(self) -> bool:
        return self.spec.objective.direction == "maximize"

    @property
    def epochs(self) -> int:
        return sum(t.epochs for t in self.trials)

    def _better(self, a: float, b: float | None) -> bool:
        return b is None or (a > b if self.maximize else a < b)

    def best_of_first(self, n_trials: int) -> float | None:
        """The best complete value of the first `n_trials` trials (the equal trial budget)."""
        best = None
        for t in self.trials[:n_trials]:
            if t.value is not None and self._better(t.value, best):
                best = t.value
        return best

    def best_within(self, epoch_budget: float) -> float | None:
        """The best complete value among the trials that ended within `epoch_budget` epochs."""
        spent, best = 0, None
        for t in self.trials:
            spent += t.epochs
            if spent > epoch_budget:
                break
            if t.value is not None and self._better(t.value, best):
                best = t.value
        return best

    def to_target(self, target: float) -> int | None:
        """Epochs trained until the best value first reached `target`; None if it never did."""
        spent = 0
        for t in self.trials:
            spent += t.epochs
            if t.value is not None and (t.value >= target if self.maximize else t.value <= target):
                return spent
        return None


def study_spec(task: str, arm: str, seed: int, n_trials: int) -> StudySpec:
    fixed = TASKS[task]
    return parse_spec({
        # One name for every arm: Hyperband puts a trial in a bracket by a hash of the study's name and the
        # trial number, so the pruned arms differ by their rules, not by their luck.
        "name": f"{task}-{seed}",
        "task": {**fixed["task"], "seed": 0},
        "objective": {"metric": fixed.get("metric", "val_loss"), "direction": "minimize"},
        "search_space": {"lr": {"low": 1e-5, "high": 1.0, "log": True}, "batch_size": {"choices": fixed["batch_size"]},
                         "epochs": fixed["epochs"], "weight_decay": {"low": 1e-6, "high": 1e-1, "log": True},
                         "dropout": {"low": 0.0, "high": 0.5}},
        "n_trials": n_trials,
        "sampler": {"name": "tpe", "seed": seed},
        "pruner": {**ARMS, **ABLATIONS}[arm],
    })


def run_study(workdir: Path, spec: StudySpec, task: str, arm: str, seed: int, n_trials: int,
              epoch_budget: float | None) -> Run:
    """Run the study's trials one by one: `n_trials`, then more until `epoch_budget` epochs were trained."""
    url = f"sqlite:///{workdir / arm.replace('+', '-')}-{spec.name}.db"
    upgrade(url)
    settings = Settings(database_url=url)
    submit_study(settings, spec)
    engine = get_engine(url)
    run = Run(task, arm, seed, spec)
    epochs_seen: list[int] = []
    started = time.perf_counter()
    while len(run.trials) < n_trials or (epoch_budget is not None and run.epochs < epoch_budget):
        with session_scope(engine) as session:
            slot = repo.claim_trial_slot(session, study_name=spec.name)
        if slot is None:
            break
        if arm == "tpe+first-epoch":  # the process's study object, with the baseline's pruner in place of median
            study_for(settings, spec, slot).pruner = FirstEpochTopK()
        epochs_seen.clear()
        trial = run_slot(settings, slot, on_epoch=lambda _trial, metrics: epochs_seen.append(metrics["epoch"]))
        assert trial is not None
        run.trials.append(TrialOutcome(
            number=trial.number, state=trial.state.name.lower(),
            value=trial.value if trial.state == TrialState.COMPLETE else None,
            epochs=len(epochs_seen), params=dict(trial.params),
            pruned_by=trial.user_attrs.get(PRUNED_BY_ATTR), stopped_early=trial.user_attrs.get(STOPPED_EARLY_ATTR)))
    run.seconds = time.perf_counter() - started
    engine.dispose()
    return run


def full_rerun(run: Run, trial: TrialOutcome) -> tuple[bool, float | None]:
    """Train the pruned trial again to its last epoch, unpruned: whether the whole history's diagnosis is
    healthy, and the objective at its last epoch (None where it is not finite)."""
    from converge.trainers import fit

    spec = run.spec
    config = train_config(spec, trial.params, device="cpu")
    result = fit(config)
    metric = spec.objective.metric
    history = {"objective": {"metric": metric, "direction": spec.objective.direction},
               "max_epochs": config.epochs,
               "epochs": [{key: epoch.get(key) for key in (*HISTORY_KEYS, metric)} for epoch in result.epochs]}
    final = result.epochs[-1].get(metric) if result.epochs else None
    return bool(diagnose(history).healthy), final if final is not None and math.isfinite(final) else None


def kth_best_before(run: Run, trial: TrialOutcome) -> float | None:
    """The study's k-th best completed value when `trial` ran (the trials before it; one process runs them in order)."""
    return kth_best((t.value for t in run.trials if t.number < trial.number and t.value is not None),
                    run.spec.pruner.extrapolation_top_k, run.spec.objective.direction)


def wrong_prunes(run: Run) -> tuple[int, int, int, int]:
    """(trials a diagnosis rule pruned, those healthy on a full rerun, trials the extrapolation pruned, those
    whose full rerun ends better than the k-th best they were judged against: the forecast's mistakes)."""
    diagnosed = healthy = extrapolated = mistaken = 0
    for t in run.trials:
        rule = (t.pruned_by or {}).get("rule")
        if rule not in CONVERGENCE_RULES:
            continue
        is_healthy, final = full_rerun(run, t)
        if rule == EXTRAPOLATION:
            extrapolated += 1
            kth = kth_best_before(run, t)
            mistaken += final is not None and kth is not None and (final > kth if run.maximize else final < kth)
        else:
            diagnosed += 1
            healthy += is_healthy
    return diagnosed, healthy, extrapolated, mistaken


def _ratio(epochs: float, reference: float) -> float | None:
    """Epochs to the target over the reference's: 0 where only the reference's median run never got there
    (the arm did better than any finite ratio), None where the arm's never did."""
    if not math.isfinite(epochs):
        return None
    return epochs / reference if math.isfinite(reference) else 0.0


def _median(values: list[float]) -> float:
    """The median, where a run that never got there counts as infinitely far."""
    return statistics.median(values) if values else math.inf


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _gap(value: float | None, reference: float | None, maximize: bool) -> float | None:
    """How much worse `value` is than `reference`, as a share (negative: better)."""
    if value is None or reference is None or not reference:
        return None
    return (reference - value) / abs(reference) if maximize else (value - reference) / abs(reference)


def report(task: str, runs: dict[str, list[Run]], n_trials: int) -> dict[str, Any]:
    """Print the task's table and return its figures."""
    reference = runs[REFERENCE]
    maximize = reference[0].maximize
    best = statistics.median(b for r in reference if (b := r.best_of_first(n_trials)) is not None)
    target = best - TARGET_SLACK * abs(best) if maximize else best + TARGET_SLACK * abs(best)
    budget = statistics.median(r.epochs for r in reference)
    to_target = {arm: _median([math.inf if (e := r.to_target(target)) is None else e for r in arm_runs])
                 for arm, arm_runs in runs.items()}
    at_trials = {arm: statistics.median(b for r in arm_runs if (b := r.best_of_first(n_trials)) is not None)
                 for arm, arm_runs in runs.items()}
    at_epochs = {arm: [b for r in arm_runs if (b := r.best_within(budget)) is not None]
                 for arm, arm_runs in runs.items()}
    metric = reference[0].spec.objective.metric
    print(f"\n{task}: target {metric} {target:.4g} (tpe's median best after {n_trials} trials, {TARGET_SLACK:.0%} "
          f"slack); equal epoch budget {budget:.0f} (tpe's median)")
    header = ["arm", "reached", "epochs to target", f"/ {RATIO_TO}", f"best at {n_trials} trials", f"vs {RATIO_TO}",
              f"best at {budget:.0f} epochs", "trials", "epochs", "diagnosis prunes", "healthy on rerun",
              "extrapolation prunes", "would have beaten", "minutes"]
    rows, figures = [header], {"target": target, "budget": budget, "arms": {}}
    for arm, arm_runs in runs.items():
        reached = sum(r.to_target(target) is not None for r in arm_runs)
        ratio = _ratio(to_target[arm], to_target[RATIO_TO]) if RATIO_TO in runs else None
        vs = _gap(at_trials[arm], at_trials.get(RATIO_TO), maximize)
        diagnosed, healthy, extrapolated, mistaken = (sum(c) for c in zip(*(wrong_prunes(r) for r in arm_runs)))
        figures["arms"][arm] = {"reached": reached, "seeds": len(arm_runs), "epochs_to_target": to_target[arm],
                                "ratio_to_hyperband": ratio, "best_at_trials": at_trials[arm], "vs_hyperband": vs,
                                "best_at_epochs": _median(at_epochs[arm]), "diagnosis_pruned": diagnosed,
                                "healthy_on_rerun": healthy, "extrapolation_pruned": extrapolated,
                                "would_have_beaten": mistaken}
        rows.append([arm, f"{reached}/{len(arm_runs)}", _fmt(to_target[arm], ".0f"), _fmt(ratio, ".2f"),
                     _fmt(at_trials[arm]), _fmt(vs, "+.1%"), _fmt(_median(at_epochs[arm])),
                     _fmt(statistics.median(len(r.trials) for r in arm_runs), ".0f"),
                     _fmt(statistics.median(r.epochs for r in arm_runs), ".0f"),
                     *((str(diagnosed), str(healthy), str(extrapolated), str(mistaken)) if arm not in UNPRUNED
                       else ("-",) * 4),
                     _fmt(sum(r.seconds for r in arm_runs) / 60, ".1f")])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    if RATIO_TO in runs and not math.isfinite(to_target[RATIO_TO]):
        print(f"  (/ {RATIO_TO} 0: the arm's median run reached the target, {RATIO_TO}'s did not)")
    return figures


def print_summary(figures: dict[str, dict[str, Any]]) -> None:
    """One line per arm, one column per task: seeds that reached the target, epochs to it over
    Hyperband's, and the best at equal trial budget against Hyperband's (the README's table)."""
    tasks = list(figures)
    arms = list(dict.fromkeys(arm for t in tasks for arm in figures[t]["arms"]))
    rows = [["arm", *tasks]]
    for arm in arms:
        cells = []
        for t in tasks:
            f = figures[t]["arms"].get(arm)
            cells.append("" if f is None else f"{f['reached']}/{f['seeds']} · {_fmt(f['ratio_to_hyperband'], '.2f')} · "
                                              f"{_fmt(f['vs_hyperband'], '+.1%')}")
        rows.append([arm, *cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"\nsummary: seeds reaching tpe's median best · epochs to it / {RATIO_TO}'s · best at equal trials vs "
          f"{RATIO_TO}'s")
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def print_panel(figures: dict[str, dict[str, Any]], arm: str = "tpe+convergence") -> dict[str, Any]:
    """The medians over tasks and the issue's four targets for `arm` (the default pruner), met or not."""
    print_summary(figures)
    tasks = [t for t in figures if arm in figures[t]["arms"] and RATIO_TO in figures[t]["arms"]]
    if not tasks:
        return {}
    ratios = [figures[t]["arms"][arm]["ratio_to_hyperband"] for t in tasks]
    ratio = statistics.median(math.inf if r is None else r for r in ratios)
    worst_gap = max((g for t in tasks if (g := figures[t]["arms"][arm]["vs_hyperband"]) is not None), default=None)
    healthy = sum(figures[t]["arms"][arm]["healthy_on_rerun"] for t in tasks)
    mistaken = sum(figures[t]["arms"][arm]["would_have_beaten"] for t in tasks)
    fewer_seeds = [t for t in tasks if figures[t]["arms"][arm]["reached"] < figures[t]["arms"][RATIO_TO]["reached"]]
    met = {"epochs": ratio <= 0.6, "trial_budget": worst_gap is not None and worst_gap <= 0.01,
           "wrong_prunes": healthy + mistaken == 0, "seeds": not fewer_seeds}

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(f"\npanel ({', '.join(tasks)}), {arm}:")
    print(f"  epochs to tpe's median best / {RATIO_TO}'s, median over tasks: {_fmt(ratio, '.2f')} "
          f"(<= 0.6: {verdict(met['epochs'])}); per task: "
          + ", ".join(f"{t} {_fmt(r, '.2f')}" for t, r in zip(tasks, ratios)))
    print(f"  best at equal trial budget, worst task vs {RATIO_TO}: {_fmt(worst_gap, '+.1%')} "
          f"(<= +1%: {verdict(met['trial_budget'])})")
    print(f"  wrong prunes: {healthy} healthy trials pruned by a diagnosis rule, {mistaken} trials the extrapolation "
          f"pruned that would have beaten the k-th best (0: {verdict(met['wrong_prunes'])})")
    print(f"  tasks where it reached the target in fewer seeds than {RATIO_TO}: "
          f"{', '.join(fewer_seeds) or 'none'} ({verdict(met['seeds'])})")
    return {"ratio": ratio, "worst_gap": worst_gap, "healthy": healthy, "mistaken": mistaken,
            "fewer_seeds": fewer_seeds, "met": met}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="sampler seeds, the same in every arm")
    parser.add_argument("--first-seed", type=int, default=0, help="the first sampler seed (keep tuned seeds apart)")
    parser.add_argument("--trials", type=int, default=24, help="N: every arm's trial budget")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"of {','.join(TASKS)}")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"of {','.join(ARMS)}; ablations of the default "
                        f"pruner: {','.join(ABLATIONS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    tasks, arms = args.tasks.split(","), args.arms.split(",")
    unknown = [t for t in tasks if t not in TASKS] + [a for a in arms if a not in ARMS and a not in ABLATIONS]
    if unknown or REFERENCE not in arms:
        parser.error(f"unknown task or arm {unknown}; the arms must include {REFERENCE!r}")
    import torch

    # One thread, as a worker's slot on a shared machine: torch's threads spin-wait when the cores are
    # busy, which makes trials many times slower at random; one thread also makes a run repeat exactly.
    torch.set_num_threads(args.threads)
    os.environ.setdefault("CONVERGE_PLUGIN_MODULES", f"{PLUGIN},converge_examples")
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="converge-sweep-bench-") as scratch:
        for task in tasks:
            runs: dict[str, list[Run]] = {}
            for arm in [REFERENCE] + [a for a in arms if a != REFERENCE]:  # the reference sets the epoch budget
                budget = None if arm in UNPRUNED else statistics.median(r.epochs for r in runs[REFERENCE])
                n_trials = args.trials if arm in UNPRUNED else min(MAX_TRIALS, args.trials * 20)
                runs[arm] = []
                for seed in seeds:
                    spec = study_spec(task, arm, seed, n_trials)
                    done = run_study(Path(scratch), spec, task, arm, seed, args.trials, budget)
                    runs[arm].append(done)
                    print(f"  {task} {arm} seed {seed}: {len(done.trials)} trials, {done.epochs} epochs, "
                          f"{done.seconds:.1f} s", file=sys.stderr, flush=True)
            figures[task] = report(task, runs, args.trials)
    figures["panel"] = print_panel({t: f for t, f in figures.items()})
    return figures


if __name__ == "__main__":
    main()
