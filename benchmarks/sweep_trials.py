"""Does the diagnosis hold on the trials real sweeps produce? Every trial kept, labelled by outcome.

For each task, a random sweep over wide ranges (lr 1e-5..2 log, weight decay 1e-6..0.3 log,
dropout 0..0.8, epochs 5..40, batch size 16..256) is run as a Converge worker runs it: the
trial's params from the spec's search space (`studies.search_space.suggest`, Optuna's random
sampler), its diagnosis context as the live objective builds it (`trial_context`, with the
study's ended trials as `peers_context` summarises them at the trial's start), the trainer
(`train_config`, `trainers.fit`; a trial stops at a non-finite objective and fails, as a
worker's would), and the diagnosis of its whole history. No trial is dropped.

Each trial is then labelled by what happens, not by the diagnosis rules:
- called unhealthy: the trial trained again, same seed, with its first remedy applied the way
  `converge repair` applies it (`first_applicable_remedy`: the first one that changes a
  hyperparameter inside the search space; none applicable counts as no improvement);
  better by >= 2%, within, or worse by > 5% (a failed trial's rerun is better if it ends finite);
- near the study's best (within 10%) or called healthy: trained again with twice the epochs.

Figures, per task and overall, with the issue's targets:
- remedy efficacy: share of trials called unhealthy whose first remedy improves the objective by
  >= 2% (>= 0.8);
- harm: share of them whose first remedy makes it worse by > 5% (<= 5%);
- poor trials (failed, or worse than the study's best by more than half its magnitude) called
  `converged` (<= 5%);
- healthy trials (within 10% of the best, no better by 2% with twice the epochs, nor with the
  first remedy where one was given) called unhealthy (<= 5%).

Two parts (`PARTS`): `tune`, two sweeps per task (sampler seeds 0 and 1000, data split and init
seeds 0 and 1), is what the rules were looked at against; `held-out`, one sweep of 48 trials per
task (sampler seed 2000, task seed 2) generated after the last rule change, is never used for
tuning and is the part the targets are judged on. Fits are cached by (study, params) in `--cache`,
so a rerun after a change to the rules trains only the remedies it has not seen.

    .venv/bin/python benchmarks/sweep_trials.py [--trials 24] [--tasks ...] [--parts tune,held-out] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from converge.studies.diagnosis import diagnose
from converge.studies.objective import HISTORY_KEYS, train_config
from converge.studies.peers import peers_context
from converge.studies.repair import first_applicable_remedy
from converge.studies.search_space import suggest
from converge.studies.spec import StudySpec, parse_spec
from converge.studies.trial_context import trial_context

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]  # the plug-in tasks, for this process and its workers

SPACE = {"lr": {"low": 1e-5, "high": 2.0, "log": True}, "weight_decay": {"low": 1e-6, "high": 0.3, "log": True},
         "dropout": {"low": 0.0, "high": 0.8}, "epochs": {"low": 5, "high": 40},
         "batch_size": {"choices": [16, 32, 64, 128, 256]}}

TASKS: dict[str, dict[str, Any]] = {  # the spec's task and objective metric
    "digits-mlp": {"task": {"model": "mlp", "dataset": "sklearn:digits", "params": {"width": 64, "depth": 2}}},
    "cancer-mlp": {"task": {"model": "mlp", "dataset": "sklearn:breast_cancer", "params": {"width": 64, "depth": 2}}},
    "friedman1-mlp": {"task": {"model": "mlp", "dataset": "sklearn:friedman1", "params": {"width": 64, "depth": 2}}},
    "digits-cnn": {"task": {"model": "cnn", "dataset": "sklearn:digits", "params": {"channels": 8}}},
    "raw-diabetes": {"task": {"model": "sweep_task_plugins:build_regressor",
                              "data": "sweep_task_plugins:build_raw_diabetes"}},
    "many-classes": {"task": {"model": "sweep_task_plugins:build_classifier",
                              "data": "sweep_task_plugins:build_many_classes"}},
    "houses-plugin": {"task": {"model": "converge_examples.tabular:build_model",
                               "data": "converge_examples.tabular:build_data"}, "metric": "val_mae"},
}
@dataclass(frozen=True)
class Sweep:
    """One random sweep per task: its sampler's seed, the data split and init seed, and its trials."""

    sampler_seed: int
    task_seed: int
    n_trials: int


# `tune` is what the rules were looked at against: sampler seed 0, and seeds 1000 and 2000, each the held-out
# part until the rules were mended after its figures were seen. `held-out` was generated after the last change.
PARTS = {"tune": (Sweep(0, 0, 24), Sweep(1000, 1, 24), Sweep(2000, 2, 48)), "held-out": (Sweep(3000, 3, 48),)}
TARGETS = {"efficacy": 0.8, "harm": 0.05, "poor_called_converged": 0.05, "healthy_called_unhealthy": 0.05}
BETTER, WORSE, NEAR_BEST, POOR = 0.02, 0.05, 0.10, 0.5


def study_spec(task: str, sweep: Sweep, n_trials: int | None = None) -> StudySpec:
    fixed = TASKS[task]
    return parse_spec({
        "name": f"{task}-seed{sweep.sampler_seed}", "task": {**fixed["task"], "seed": sweep.task_seed},
        "objective": {"metric": fixed.get("metric", "val_loss"), "direction": "minimize"},
        "search_space": SPACE, "n_trials": n_trials or sweep.n_trials,
        "sampler": {"name": "random", "seed": sweep.sampler_seed}, "pruner": {"name": "none"}})


# ---------------------------------------------------------------- fits, cached

def _key(spec: StudySpec, params: dict[str, Any]) -> str:
    return json.dumps([spec.name, {k: params[k] for k in sorted(params)}])


def _fit(job: tuple[dict[str, Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """One trial's training, as a worker's slot runs it: stopped after the first non-finite objective."""
    import torch

    from converge.trainers import fit

    torch.set_num_threads(1)
    spec, params = parse_spec(job[0]), job[1]
    metric = spec.objective.metric
    result = fit(train_config(spec, params, device="cpu"),
                 on_epoch_end=lambda m: m.get(metric) is None or not math.isfinite(m[metric]))
    keys = HISTORY_KEYS + ((metric,) if metric not in HISTORY_KEYS else ())
    return [{k: row.get(k) for k in keys} for row in result.epochs]


class Fits:
    """Training histories by (study, params), kept in a JSON-lines file between runs."""

    def __init__(self, path: Path, jobs: int):
        self.path, self.jobs = path, jobs
        self.known: dict[str, list[dict[str, Any]]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.known[row["key"]] = row["epochs"]

    def run(self, wanted: Iterable[tuple[StudySpec, dict[str, Any]]]) -> None:
        """Train what is not known yet, `jobs` at a time, appending each to the file as it ends."""
        todo = {_key(spec, params): (spec.model_dump(mode="json"), params) for spec, params in wanted}
        todo = {k: v for k, v in todo.items() if k not in self.known}
        if not todo:
            return
        print(f"training {len(todo)} runs on {self.jobs} process(es)", file=sys.stderr, flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with ProcessPoolExecutor(self.jobs) as pool, self.path.open("a") as out:
            for n, (key, epochs) in enumerate(zip(todo, pool.map(_fit, todo.values())), 1):
                self.known[key] = epochs
                out.write(json.dumps({"key": key, "epochs": epochs}) + "\n")
                out.flush()
                if n % 10 == 0 or n == len(todo):
                    print(f"  {n}/{len(todo)}", file=sys.stderr, flush=True)

    def value(self, spec: StudySpec, params: dict[str, Any]) -> float | None:
        """The objective at the last epoch; None where it was not finite (the trial failed)."""
        last = self.known[_key(spec, params)][-1].get(spec.objective.metric)
        return float(last) if last is not None and math.isfinite(last) else None


# ---------------------------------------------------------------- the sweep and its labels

@dataclass
class Trial:
    task: str
    study: str
    number: int
    params: dict[str, Any]
    value: float | None
    verdict: str = ""
    healthy: bool = False
    remedy: dict[str, Any] | None = None
    repaired_params: dict[str, Any] | None = None
    repaired: float | None = None
    longer: float | None = None  # the value with twice the epochs
    history: dict[str, Any] = field(default_factory=dict)


def sweep_params(spec: StudySpec) -> list[dict[str, Any]]:
    """The params the random sampler gives the study's trials, in order (they depend on its seed only)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.sampler.seed))
    out = []
    for _ in range(spec.n_trials):
        trial = study.ask()
        out.append(suggest(trial, spec.search_space))
        study.tell(trial, 0.0)
    return out


def replay(task: str, spec: StudySpec, fits: Fits) -> list[Trial]:
    """The study again, trial by trial, each diagnosed with the context a worker gives it."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.sampler.seed))
    trials = []
    for number in range(spec.n_trials):
        optuna_trial = study.ask()
        params = suggest(optuna_trial, spec.search_space)
        context = trial_context(spec, params, peers_context(study, "minimize", optuna_trial._trial_id))
        epochs = fits.known[_key(spec, params)]
        history = {"objective": {"metric": spec.objective.metric, "direction": "minimize"},
                   "max_epochs": int(params["epochs"]), "epochs": epochs, "context": context}
        result = diagnose(history).to_dict()
        value = fits.value(spec, params)
        trial = Trial(task, spec.name, number, params, value, result["verdict"], result["healthy"], history=history)
        trial.remedy, repaired = first_applicable_remedy(result["remedies"], params, spec.search_space)
        trial.repaired_params = repaired if trial.remedy is not None else None
        trials.append(trial)
        if value is None:
            study.tell(optuna_trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(optuna_trial, value)
    return trials


def best_of(trials: list[Trial]) -> float:
    return min(t.value for t in trials if t.value is not None)


def gain(before: float | None, after: float | None) -> float:
    """The relative improvement of `after` over `before` (minimised); a failed run is infinitely bad."""
    if before is None:
        return 0.0 if after is None else math.inf
    if after is None:
        return -math.inf
    return (before - after) / abs(before) if before else 0.0


def near_best(trial: Trial, best: float) -> bool:
    return trial.value is not None and trial.value <= best + NEAR_BEST * abs(best)


def poor(trial: Trial, best: float) -> bool:
    return trial.value is None or trial.value > best + POOR * abs(best)


def longer_params(trial: Trial) -> dict[str, Any]:
    return {**trial.params, "epochs": 2 * int(trial.params["epochs"])}


def wants_longer(trial: Trial, best: float) -> bool:
    """Rerun with twice the epochs: a trial called healthy, or near its study's best."""
    return trial.healthy or near_best(trial, best)


def outcome_runs(spec: StudySpec, trials: list[Trial]) -> list[tuple[StudySpec, dict[str, Any]]]:
    """The reruns that label the trials: first remedies of those called unhealthy, twice the epochs of
    those `wants_longer` picks."""
    best = best_of(trials)
    runs = [(spec, t.repaired_params) for t in trials if not t.healthy and t.repaired_params is not None]
    runs += [(spec, longer_params(t)) for t in trials if wants_longer(t, best)]
    return runs


def label(spec: StudySpec, trials: list[Trial], fits: Fits) -> None:
    best = best_of(trials)
    for t in trials:
        if not t.healthy:
            t.repaired = fits.value(spec, t.repaired_params) if t.repaired_params is not None else t.value
        if wants_longer(t, best):
            t.longer = fits.value(spec, longer_params(t))


def healthy_by_outcome(t: Trial, best: float) -> bool:
    """Near the best, no better with twice the epochs, and, where it was called unhealthy, no better with its
    remedy either (a trial its remedy improves by 2% or more was not healthy, whatever its rank)."""
    remedied = not t.healthy and t.remedy is not None and gain(t.value, t.repaired) >= BETTER
    return near_best(t, best) and gain(t.value, t.longer) < BETTER and not remedied


def outcome_label(t: Trial, best: float) -> str | None:
    """The verdict a trial's outcome settles, for the labelled sets (`--curves`); None where it settles none:
    `diverged` when it failed (its objective became non-finite), `healthy` when healthy by outcome (either
    healthy verdict is right: whether its curve still fell at the end, the outcome cannot say)."""
    if t.value is None:
        return "diverged"
    if healthy_by_outcome(t, best):
        return "healthy"
    return None


def curve_records(spec: StudySpec, trials: list[Trial]) -> list[dict[str, Any]]:
    """The trials whose outcome settles a verdict, as records of the labelled sets (tests/data/curves*.jsonl)."""
    best = best_of(trials)
    out = []
    for t in trials:
        label_ = outcome_label(t, best)
        if label_ is None:
            continue
        onset = None
        if label_ == "diverged":
            onset = next(e["epoch"] for e in t.history["epochs"]
                         if any(e.get(k) is not None and not math.isfinite(e[k])
                                for k in ("train_loss", "val_loss", spec.objective.metric)))
        out.append({"id": f"sweep-{t.study}-t{t.number}", "label": label_, "onset_epoch": onset,
                    "cause": f"random sweep trial, labelled by outcome ({_outcome_text(t)})",
                    "dataset": t.task, "task": t.history["context"].get("task", "plug-in"), "optimizer": "adamw",
                    "config": t.params, "history": t.history})
    return out


def _outcome_text(t: Trial) -> str:
    if t.value is None:
        return "its objective became non-finite"
    return f"{t.value:.4g}; with twice the epochs {_fmt(t.longer)}"


def figures(studies: list[list[Trial]]) -> dict[str, Any]:
    """The four shares over the trials of `studies` (each a list of one study's trials)."""
    unhealthy, poor_ones, healthy_ones = [], [], []
    for trials in studies:
        best = best_of(trials)
        unhealthy += [t for t in trials if not t.healthy]
        poor_ones += [t for t in trials if poor(t, best)]
        healthy_ones += [t for t in trials if healthy_by_outcome(t, best)]
    improved = [t for t in unhealthy if t.remedy is not None and gain(t.value, t.repaired) >= BETTER]
    harmed = [t for t in unhealthy if t.remedy is not None and gain(t.value, t.repaired) < -WORSE]
    return {
        "trials": sum(len(trials) for trials in studies), "unhealthy": len(unhealthy),
        "efficacy": _share(len(improved), len(unhealthy)), "harm": _share(len(harmed), len(unhealthy)),
        "poor": len(poor_ones),
        "poor_called_converged": _share(sum(t.verdict == "converged" for t in poor_ones), len(poor_ones)),
        "healthy": len(healthy_ones),
        "healthy_called_unhealthy": _share(sum(not t.healthy for t in healthy_ones), len(healthy_ones)),
    }


def _share(n: int, d: int) -> float:
    return n / d if d else float("nan")


def _met(name: str, value: float) -> str:
    if math.isnan(value):
        return "-"
    ok = value >= TARGETS[name] if name == "efficacy" else value <= TARGETS[name]
    return "" if ok else " !"


def print_table(part: str, by_task: dict[str, list[list[Trial]]]) -> dict[str, Any]:
    rows = [["task", "trials", "unhealthy", "efficacy", "harm", "poor", "poor->converged", "healthy",
             "healthy->unhealthy"]]
    out = {}
    everything = [trials for studies in by_task.values() for trials in studies]
    for name, studies in [*by_task.items(), ("overall", everything)]:
        f = figures(studies)
        out[name] = f
        rows.append([name, str(f["trials"]), str(f["unhealthy"]),
                     f"{f['efficacy']:.2f}{_met('efficacy', f['efficacy'])}",
                     f"{f['harm']:.2f}{_met('harm', f['harm'])}", str(f["poor"]),
                     f"{f['poor_called_converged']:.2f}{_met('poor_called_converged', f['poor_called_converged'])}",
                     str(f["healthy"]),
                     f"{f['healthy_called_unhealthy']:.2f}"
                     f"{_met('healthy_called_unhealthy', f['healthy_called_unhealthy'])}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\n{part}: targets efficacy >= {TARGETS['efficacy']}, harm <= {TARGETS['harm']}, poor->converged <= "
          f"{TARGETS['poor_called_converged']}, healthy->unhealthy <= {TARGETS['healthy_called_unhealthy']} "
          f"(! = not met)")
    for row in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return out


def print_misses(part: str, by_task: dict[str, list[list[Trial]]]) -> None:
    """Each trial that counts against a target, with what the diagnosis said: what to look at (tune part only)."""
    print(f"\n{part}: the trials that count against a target")
    for trials in (trials for studies in by_task.values() for trials in studies):
        best = best_of(trials)
        for t in trials:
            why = []
            if not t.healthy and (t.remedy is None or gain(t.value, t.repaired) < BETTER):
                why.append(f"remedy {_remedy_text(t)}: {_fmt(t.value)} -> {_fmt(t.repaired)}")
            if poor(t, best) and t.verdict == "converged":
                why.append(f"poor ({_fmt(t.value)}, best {best:.4g}) called converged")
            if healthy_by_outcome(t, best) and not t.healthy:
                why.append(f"healthy (x2 epochs {_fmt(t.longer)}) called {t.verdict}")
            if why:
                p = t.params
                print(f"  {t.study} #{t.number} lr {p['lr']:.3g} wd {p['weight_decay']:.2g} do {p['dropout']:.2f} "
                      f"bs {p['batch_size']} ep {p['epochs']}: {t.verdict}; " + "; ".join(why))


def _remedy_text(t: Trial) -> str:
    if t.remedy is None:
        return "none applicable"
    changed = {k: v for k, v in (t.repaired_params or {}).items() if t.params.get(k) != v}
    return f"{t.remedy['param']} {t.remedy['action']} {changed}"


def _fmt(value: float | None) -> str:
    return "failed" if value is None else f"{value:.4g}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, help="trials per sweep (default: 24 per tune sweep, 48 held-out)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"of {','.join(TASKS)}")
    parser.add_argument("--parts", default=",".join(PARTS), help="tune, held-out")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="training processes (one thread each)")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache" / "sweep_trials.jsonl",
                        help="the fits kept between runs (delete it to train everything again)")
    parser.add_argument("--misses", action="store_true", help="list the tune part's trials that miss a target")
    parser.add_argument("--dump", type=Path, help="write every trial (history, verdict, labels) as JSON lines here")
    parser.add_argument("--curves", type=Path, help="write the trials whose outcome settles a verdict, as labelled "
                        "runs, to DIR/curves_sweeps.jsonl (tune) and DIR/curves_sweeps_holdout.jsonl (held-out)")
    args = parser.parse_args(argv)
    tasks, parts = args.tasks.split(","), args.parts.split(",")
    unknown = [t for t in tasks if t not in TASKS] + [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown task or part {unknown}")
    os.environ.setdefault("CONVERGE_PLUGIN_MODULES", "sweep_task_plugins,converge_examples")
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    fits = Fits(args.cache, args.jobs)
    specs = {(part, task): [study_spec(task, sweep, args.trials) for sweep in PARTS[part]]
             for part in parts for task in tasks}
    every = [spec for group in specs.values() for spec in group]
    fits.run((spec, params) for spec in every for params in sweep_params(spec))
    swept = {spec.name: replay(spec.name.rsplit("-seed", 1)[0], spec, fits) for spec in every}
    fits.run(run for spec in every for run in outcome_runs(spec, swept[spec.name]))
    for spec in every:
        label(spec, swept[spec.name], fits)
    results = {}
    for part in parts:
        by_task = {task: [swept[spec.name] for spec in specs[(part, task)]] for task in tasks}
        results[part] = print_table(part, by_task)
        if args.misses and part == "tune":
            print_misses(part, by_task)
        if args.curves:
            name = "curves_sweeps.jsonl" if part == "tune" else "curves_sweeps_holdout.jsonl"
            with (args.curves / name).open("w") as out:
                for task in tasks:
                    for spec in specs[(part, task)]:
                        for record in curve_records(spec, swept[spec.name]):
                            out.write(json.dumps(record) + "\n")
        if args.dump:
            with args.dump.open("a") as out:
                for trials in (trials for studies in by_task.values() for trials in studies):
                    for t in trials:
                        out.write(json.dumps({"part": part, **t.__dict__}) + "\n")
    return results


if __name__ == "__main__":
    main()
