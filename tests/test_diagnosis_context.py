"""The live objective gives every trial's diagnosis its context: task, params, bounds and peers.

The peers summary (`studies.peers.PeerSummary`) folds the study's ended trials in as they end,
never re-reading the study per epoch; the context (`studies.trial_context`) is built once at
the trial's start and goes into every epoch's history (`studies.objective.TrialDiagnoser`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from conftest import tiny_spec
from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.db.migrate import upgrade
from converge.core.settings import Settings
from converge.studies import objective
from converge.studies.diagnosis import HistoryError, diagnose
from converge.studies.peers import ENDED, PeerSummary, peers_context, study_peers
from converge.studies.search_space import PARAM_NAMES, suggest
from converge.studies.spec import REGRESSION_DATASETS, SKLEARN_DATASETS, Task, parse_spec
from converge.studies.trial_context import DATASET_TASKS, bounds_context, params_context, task_context, trial_context

optuna.logging.set_verbosity(optuna.logging.WARNING)

DISTRIBUTIONS = {"lr": FloatDistribution(1e-5, 1.0, log=True), "epochs": IntDistribution(1, 50),
                 "batch_size": CategoricalDistribution([32, 64])}


def is_plain_json(value: Any) -> bool:
    """Only dicts with string keys, lists, str, bool, int, finite float and None: no numpy, no Optuna objects."""
    if value is None or type(value) in (bool, int, str):
        return True
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is dict:
        return all(type(k) is str and is_plain_json(v) for k, v in value.items())
    if type(value) is list:
        return all(is_plain_json(v) for v in value)
    return False


def _add(study: optuna.Study, value: float, *, state: TrialState = TrialState.COMPLETE, lr: float = 0.01,
         epochs_run: int = 3, epochs: int = 10) -> None:
    curve = {e: value + 0.1 * (epochs_run - 1 - e) for e in range(epochs_run)}  # ends at `value`
    study.add_trial(create_trial(state=state, value=value, params={"lr": lr, "epochs": epochs, "batch_size": 32},
                                 distributions=DISTRIBUTIONS, intermediate_values=curve))


def _ended(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=ENDED)


class CountingList(list):
    """A list that counts how often it is walked."""

    walks = 0

    def __iter__(self) -> Iterator[Any]:
        CountingList.walks += 1
        return super().__iter__()


# ------------------------------------------------------------------ the peers summary


def test_the_summary_folds_in_only_the_trials_it_has_not_seen() -> None:
    study = optuna.create_study()
    summary = PeerSummary("minimize")
    values = [0.7, 0.3, 0.9, 0.5, 0.1, 0.8, 0.4, 0.6]
    for n, value in enumerate(values, start=1):
        _add(study, value, lr=value / 10)
        trials = CountingList(_ended(study))
        assert summary.update(trials) == 1  # only the new one is folded in
        walks = CountingList.walks
        assert summary.update(trials) == 0  # the same list again: nothing new, and not even walked
        assert CountingList.walks == walks
        assert summary.ended == n

    once = PeerSummary("minimize")
    once.update(_ended(study))
    assert summary.to_dict() == once.to_dict()  # as if built from the whole study at once
    got = summary.to_dict()
    assert got is not None and got["ended"] == 8
    assert [p["value"] for p in got["top"]] == [0.1, 0.3, 0.4, 0.5, 0.6]  # the best 5, best first
    assert got["best"] == {"value": 0.1, "epochs": 3, "params": {"lr": 0.01, "epochs": 10, "batch_size": 32}}
    assert got["top"][0] == {"value": 0.1, "params": {"lr": 0.01, "epochs": 10, "batch_size": 32}}
    assert is_plain_json(got)


def test_the_summary_follows_the_studys_direction() -> None:
    study = optuna.create_study(direction="maximize")
    for value in (0.7, 0.95, 0.2, 0.9):
        _add(study, value)
    summary = PeerSummary("maximize")
    summary.update(_ended(study))
    got = summary.to_dict()
    assert got is not None and got["best"]["value"] == 0.95
    assert [p["value"] for p in got["top"]] == [0.95, 0.9, 0.7, 0.2]
    with pytest.raises(ValueError):
        PeerSummary("sideways")


def test_pruned_trials_are_ended_but_never_best() -> None:
    study = optuna.create_study()
    _add(study, 0.01, state=TrialState.PRUNED)  # stopped early at a value better than any complete one's
    summary = PeerSummary("minimize")
    summary.update(_ended(study))
    assert summary.ended == 1 and summary.to_dict() is None  # no trial has completed: no peers
    _add(study, 0.5, epochs_run=7)
    _add(study, 0.02, state=TrialState.PRUNED)
    summary.update(_ended(study))
    got = summary.to_dict()
    assert got is not None and got["ended"] == 3
    assert got["best"]["value"] == 0.5 and got["best"]["epochs"] == 7
    assert [p["value"] for p in got["top"]] == [0.5]


def test_best_epochs_falls_back_to_the_epochs_param_without_intermediate_values() -> None:
    study = optuna.create_study()
    study.add_trial(create_trial(value=0.4, params={"lr": 0.1, "epochs": 6, "batch_size": 64},
                                 distributions=DISTRIBUTIONS))
    got = peers_context(study, "minimize", trial_id=-1)
    assert got is not None and got["best"]["epochs"] == 6


def test_a_trials_context_never_includes_itself() -> None:
    study = optuna.create_study()
    for value in (0.6, 0.5, 0.4, 0.3, 0.2, 0.1):
        _add(study, value)
    best = _ended(study)[-1]  # value 0.1
    summary = PeerSummary("minimize")
    summary.update(_ended(study))
    got = summary.to_dict(exclude=best._trial_id)
    assert got is not None and got["ended"] == 5
    assert got["best"]["value"] == 0.2
    assert [p["value"] for p in got["top"]] == [0.2, 0.3, 0.4, 0.5, 0.6]  # still 5 without it
    assert summary.to_dict()["top"][0]["value"] == 0.1  # type: ignore[index]

    running = study.ask()  # at its start a trial is running: it is not among the ended ones anyway
    assert peers_context(study, "minimize", running._trial_id)["ended"] == 6  # type: ignore[index]


def test_the_process_keeps_one_summary_per_study_and_folds_in_what_ended_since(
        monkeypatch: pytest.MonkeyPatch) -> None:
    study = optuna.create_study()
    other = optuna.create_study(storage=study._storage)  # the same storage, another study
    _add(study, 0.5)
    first = study_peers(study, "minimize")
    assert study_peers(study, "minimize") is first and study_peers(other, "minimize") is not first

    folded: list[int] = []
    real_update = PeerSummary.update

    def spy(self: PeerSummary, trials: Any) -> int:
        new = real_update(self, trials)
        folded.append(new)
        return new

    monkeypatch.setattr(PeerSummary, "update", spy)
    _add(study, 0.4)
    _add(study, 0.3, state=TrialState.PRUNED)
    assert study_peers(study, "minimize") is first and folded == [2]
    assert study_peers(study, "minimize").ended == 3 and folded == [2, 0]


# ------------------------------------------------------------------ task, params and bounds


def test_every_built_in_dataset_has_its_task_and_class_count() -> None:
    from converge.trainers.data import load_dataset

    assert set(DATASET_TASKS) == {f"sklearn:{name}" for name in SKLEARN_DATASETS}
    assert {ref for ref, (kind, _) in DATASET_TASKS.items() if kind == "regression"} == REGRESSION_DATASETS
    for ref, (kind, n_classes) in DATASET_TASKS.items():
        loaded = load_dataset(ref, 0.2, 0)
        assert loaded.task == kind, ref
        if kind == "classification":
            assert loaded.n_classes == n_classes, ref
            assert task_context(Task(dataset=ref)) == {"task": "classification", "n_classes": n_classes}
        else:
            assert task_context(Task(dataset=ref)) == {"task": "regression"}


def test_a_csv_or_the_users_own_data_says_only_what_is_known() -> None:
    assert task_context(Task(dataset="csv:data.csv?target=y&task=regression")) == {"task": "regression"}
    assert task_context(Task(dataset="csv:data.csv?target=y&task=classification")) == {"task": "classification"}
    assert task_context(Task(dataset="csv:data.csv?target=y")) == {}  # inferred from the data by the trainer
    plugin = Task(model="converge_test_plugins:model", data="converge_test_plugins:data")
    assert plugin.dataset == "sklearn:digits" and task_context(plugin) == {}  # its unused default says nothing


def test_bounds_take_the_specs_own_form_for_every_kind_of_entry() -> None:
    ranges = parse_spec({"name": "b1", "search_space": {
        "lr": {"low": 1e-4, "high": 0.5, "log": True}, "batch_size": {"choices": [32, 64, 128]},
        "epochs": {"low": 5, "high": 50}, "weight_decay": 7e-4, "dropout": {"low": 0.0, "high": 0.5}}})
    assert bounds_context(ranges.search_space) == {
        "lr": {"low": 1e-4, "high": 0.5, "log": True},
        "batch_size": {"choices": [32, 64, 128]},
        "epochs": {"low": 5, "high": 50, "log": False},
        "weight_decay": {"value": 7e-4},
        "dropout": {"low": 0.0, "high": 0.5, "log": False},
    }
    others = parse_spec({"name": "b2", "search_space": {
        "lr": 0.01, "batch_size": {"low": 16, "high": 256, "log": True}, "epochs": {"value": 4},
        "weight_decay": {"low": 0.0, "high": 0.1}, "dropout": {"value": 0.1}}})
    bounds = bounds_context(others.search_space)
    assert bounds == {
        "lr": {"value": 0.01},
        "batch_size": {"low": 16, "high": 256, "log": True},
        "epochs": {"value": 4},
        "weight_decay": {"low": 0.0, "high": 0.1, "log": False},
        "dropout": {"value": 0.1},
    }
    assert type(bounds["batch_size"]["low"]) is int and type(bounds["epochs"]["value"]) is int
    assert type(bounds["lr"]["value"]) is float
    assert is_plain_json(bounds) and is_plain_json(bounds_context(ranges.search_space))


@pytest.mark.parametrize("space", [
    {"lr": {"low": 1e-4, "high": 0.5, "log": True}, "batch_size": {"choices": [32, 64]},
     "epochs": {"low": 2, "high": 9}, "weight_decay": 7e-4, "dropout": {"low": 0.0, "high": 0.5}},
    {"lr": 0.01, "batch_size": {"low": 16, "high": 64}, "epochs": 4,
     "weight_decay": {"low": 1e-6, "high": 0.1, "log": True}, "dropout": 0.2},
])
def test_params_are_the_five_as_suggested(space: dict[str, Any]) -> None:
    spec = parse_spec({"name": "p", "search_space": space})
    trial = optuna.create_study().ask()
    params = suggest(trial, spec.search_space)
    got = params_context(params)
    assert got == params and list(got) == list(PARAM_NAMES)
    assert all(type(got[name]) is int for name in ("batch_size", "epochs"))
    assert is_plain_json(got)


def test_the_context_is_built_once_at_the_trials_start_with_its_peers() -> None:
    spec = parse_spec(tiny_spec("ctx"))
    study = optuna.create_study()
    obj = objective.Objective(spec, study_id=1, engine=None)  # type: ignore[arg-type]
    trial = study.ask()
    params = suggest(trial, spec.search_space)
    context = obj._context(trial, params)
    assert context == {"task": "classification", "n_classes": 10, "params": params_context(params),
                       "bounds": bounds_context(spec.search_space)}  # nothing ended: no peers
    study.tell(trial, 0.42)
    nxt = study.ask()
    context = obj._context(nxt, suggest(nxt, spec.search_space))
    assert context["peers"]["ended"] == 1 and context["peers"]["best"]["value"] == 0.42
    assert is_plain_json(context)
    assert trial_context(spec, params, None).keys() == {"task", "n_classes", "params", "bounds"}


# ------------------------------------------------------------------ the diagnoser


def test_every_epochs_history_carries_the_same_context_and_the_diagnosis_takes_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse_spec(tiny_spec("unit"))
    study = optuna.create_study()
    _add(study, 0.3, epochs_run=3)
    trial = study.ask()
    params = suggest(trial, spec.search_space)
    context = trial_context(spec, params, peers_context(study, "minimize", trial._trial_id))
    seen: list[dict[str, Any]] = []

    def spy(history: dict[str, Any]) -> Any:
        seen.append(history)
        return diagnose(history)

    monkeypatch.setattr(objective, "diagnose", spy)
    diagnoser = objective.TrialDiagnoser(spec, trial.number, max_epochs=int(params["epochs"]), context=context)
    for epoch in range(int(params["epochs"])):
        result = diagnoser.add_epoch({"epoch": epoch, "train_loss": 2.0 / (epoch + 1), "val_loss": 2.1 / (epoch + 1),
                                      "val_acc": 0.3 + 0.1 * epoch})
        assert result is not None
    assert all(h["context"] is context for h in seen)  # built once, handed on as it is
    assert diagnoser.context is context and seen[-1]["context"]["peers"]["ended"] == 1
    assert set(seen[-1]) == {"objective", "max_epochs", "epochs", "context"}
    assert "context" not in objective.TrialDiagnoser(spec, 0, max_epochs=3).history()


def test_a_plug_in_objective_rides_along_in_the_history_rows() -> None:
    """A user's objective outside the standard metrics (`val_mae`) goes into each epoch's row, so the diagnosis
    can read its level against the peers'; a standard one adds nothing."""
    spec = parse_spec(tiny_spec("plug", task={"model": "converge_test_plugins:build_model",
                                              "data": "converge_test_plugins:build_datamodule"},
                                objective={"metric": "val_mae", "direction": "minimize"}))
    diagnoser = objective.TrialDiagnoser(spec, 0, max_epochs=3)
    diagnoser.add_epoch({"epoch": 0, "train_loss": 1.0, "val_loss": 1.1, "val_mae": 0.8, "other": 5.0})
    assert diagnoser.history()["epochs"][-1]["val_mae"] == 0.8 and "other" not in diagnoser.history()["epochs"][-1]
    plain = objective.TrialDiagnoser(parse_spec(tiny_spec("plain")), 0, max_epochs=3)
    plain.add_epoch({"epoch": 0, "train_loss": 1.0, "val_loss": 1.1, "val_mae": 0.8})
    assert set(plain.history()["epochs"][-1]) == set(objective.HISTORY_KEYS)


def test_a_refused_context_is_dropped_and_the_history_diagnosed_without_it(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def refusing(history: dict[str, Any]) -> Any:
        if "context" in history:
            raise HistoryError(["context.task 'regression' contradicts the history, which has val_acc"])
        return diagnose(history)

    monkeypatch.setattr(objective, "diagnose", refusing)
    diagnoser = objective.TrialDiagnoser(parse_spec(tiny_spec("unit")), 5, max_epochs=3,
                                         context={"task": "regression"})
    with caplog.at_level(logging.WARNING, logger="converge.objective"):
        assert diagnoser.add_epoch({"epoch": 0, "train_loss": 1.0, "val_acc": 0.5}) is not None
    assert diagnoser.context is None and "context is refused" in caplog.text
    assert diagnoser.add_epoch({"epoch": 1, "train_loss": 0.9, "val_acc": 0.6}) is not None


# ------------------------------------------------------------------ a real sweep


@pytest.mark.slow
def test_a_sweeps_trials_get_their_peers_without_rereading_the_study_per_epoch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from converge.studies.storage import ThrottledReads, storage_for
    from converge.studies.sweep import run_sweep

    url = f"sqlite:///{tmp_path / 'context.db'}"
    upgrade(url)
    settings = Settings(database_url=url, heartbeat_interval_s=1, grace_period_s=5, worker_poll_s=0.2)
    histories: list[tuple[int, dict[str, Any]]] = []
    contexts: dict[int, set[int]] = {}
    real_history = objective.TrialDiagnoser.history

    def history_spy(self: objective.TrialDiagnoser) -> dict[str, Any]:
        history = real_history(self)
        assert is_plain_json(history["context"])
        contexts.setdefault(self.trial_number, set()).add(id(history["context"]))
        histories.append((self.trial_number, json.loads(json.dumps(history))))
        return history

    ended_reads: list[int] = []
    real_get_all_trials = ThrottledReads.get_all_trials

    def reads_spy(self: ThrottledReads, study_id: int, deepcopy: bool = True, states: Any = None) -> Any:
        if states == ENDED:
            ended_reads.append(study_id)
        return real_get_all_trials(self, study_id, deepcopy=deepcopy, states=states)

    updates: list[int] = []
    real_update = PeerSummary.update

    def update_spy(self: PeerSummary, trials: Any) -> int:
        updates.append(real_update(self, trials))
        return updates[-1]

    monkeypatch.setattr(objective.TrialDiagnoser, "history", history_spy)
    monkeypatch.setattr(ThrottledReads, "get_all_trials", reads_spy)
    monkeypatch.setattr(PeerSummary, "update", update_spy)
    spec: dict[str, Any] = tiny_spec("ctx-sweep", n_trials=3)
    spec["search_space"]["epochs"] = 3
    with caplog.at_level(logging.WARNING, logger="converge.objective"):
        assert run_sweep(settings, parse_spec(spec), progress=False) == "done"

    trials = optuna.load_study(study_name="ctx-sweep", storage=storage_for(settings)).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert [n for n, _ in histories] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # every epoch diagnosed with its context
    # One summary update and one cached read of the ended trials per trial, at its start: none per epoch.
    assert len(updates) == len(ended_reads) == 3 and updates == [0, 1, 1]
    assert all(len(ids) == 1 for ids in contexts.values())  # one context object per trial, for all its epochs

    by_trial = {n: h["context"] for n, h in histories}
    assert "peers" not in by_trial[0]
    assert by_trial[0]["task"] == "classification" and by_trial[0]["n_classes"] == 10
    for number in (1, 2):
        context = by_trial[number]
        assert context["params"] == trials[number].params
        assert context["bounds"] == {"lr": {"low": 1e-3, "high": 1e-1, "log": True},
                                     "batch_size": {"choices": [64, 128]}, "epochs": {"value": 3},
                                     "weight_decay": {"value": 1e-4}, "dropout": {"value": 0.0}}
        before = sorted(trials[:number], key=lambda t: t.value)
        got = context["peers"]
        assert got["ended"] == number >= 1
        assert got["best"] == {"value": pytest.approx(before[0].value), "epochs": 3, "params": before[0].params}
        assert [p["value"] for p in got["top"]] == pytest.approx([t.value for t in before])
    assert "context is refused" not in caplog.text and "no diagnosis" not in caplog.text
    with session_scope(get_engine(url)) as session:
        stored = repo.diagnoses_by_trial(session, repo.get_study(session, "ctx-sweep").id)
    assert sorted(stored) == [0, 1, 2] and all(d.final for d in stored.values())

