"""Study spec validation: defaults, shorthands, and every problem named in one message."""

from __future__ import annotations

import pytest

from converge.studies.spec import FloatFixed, FloatRange, IntChoices, IntFixed, SpecError, load_spec_file, parse_spec


def problems_of(data: object) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    return caught.value.problems


def test_only_name_is_required_and_defaults_match_the_design() -> None:
    spec = parse_spec({"name": "digits-mlp"})
    assert spec.task.model == "mlp" and spec.task.dataset == "sklearn:digits"
    assert spec.objective.metric == "val_loss" and spec.objective.direction == "minimize"
    assert spec.search_space.lr == FloatRange(low=1e-5, high=1.0, log=True)
    assert spec.search_space.batch_size == IntChoices(choices=[16, 32, 64, 128, 256])
    assert spec.search_space.max_epochs() == 50
    assert spec.n_trials == 40 and spec.sampler.name == "tpe"


def test_a_bare_number_fixes_a_parameter() -> None:
    space = parse_spec({"name": "x", "search_space": {"lr": 0.01, "epochs": 7}}).search_space
    assert space.lr == FloatFixed(value=0.01)
    assert space.epochs == IntFixed(value=7)
    assert space.max_epochs() == 7


def test_every_problem_is_named_in_one_message() -> None:
    problems = problems_of({
        "name": "bad name!",
        "n_trials": 0,
        "task": {"model": "resnet", "dataset": "sklearn:mnist"},
        "sampler": {"name": "annealing"},
        "pruner": {"name": "wilcoxon"},
        "search_space": {
            "lr": {"low": 1.0, "high": 0.1, "log": True},
            "batch_size": {"choices": []},
            "weight_decay": {"low": 0.0, "high": 0.1, "log": True},
        },
    })
    text = "\n".join(problems)
    assert len(problems) == 9, text
    for expected in ("name: name 'bad name!'", "n_trials: n_trials must be between 1 and 10000",
                     "task.model: unknown model 'resnet'", "task.dataset: unknown dataset 'sklearn:mnist'",
                     "sampler.name: unknown sampler 'annealing'", "pruner.name: unknown pruner 'wilcoxon'",
                     "search_space.lr: low (1) must be below high (0.1)",
                     "search_space.batch_size.choices: choices must not be empty",
                     ):
        assert expected in text, text
    assert "search_space.weight_decay: a log scale needs positive bounds" in text


@pytest.mark.parametrize("n_trials", [0, -1, 10_001])
def test_n_trials_outside_range(n_trials: int) -> None:
    assert problems_of({"name": "x", "n_trials": n_trials}) == [
        f"n_trials: n_trials must be between 1 and 10000, got {n_trials}"]


@pytest.mark.parametrize("name", ["", "a" * 101, "has space", "slash/name", "ümlaut"])
def test_bad_names(name: str) -> None:
    assert problems_of({"name": name})[0].startswith("name: ")


def test_values_a_trainer_cannot_use() -> None:
    text = "\n".join(problems_of({"name": "x", "search_space": {
        "lr": {"value": -0.1}, "dropout": {"low": 0.0, "high": 1.0}, "batch_size": {"choices": [0, 32]},
        "epochs": {"low": 0, "high": 5}}}))
    assert "lr values must be > 0" in text
    assert "dropout values must be < 1" in text
    assert "batch_size values must be >= 1" in text
    assert "epochs values must be >= 1" in text


def test_unknown_fields_and_wrong_types_are_reported() -> None:
    text = "\n".join(problems_of({"name": "x", "n_trails": 3, "search_space": {"epochs": {"low": "a", "high": 3}}}))
    assert "n_trails: Extra inputs are not permitted" in text
    assert "search_space.epochs.low:" in text


def test_cnn_needs_images_and_csv_refs_are_checked() -> None:
    assert problems_of({"name": "x", "task": {"model": "cnn", "dataset": "sklearn:wine"}}) == [
        "task: model 'cnn' needs an image dataset (sklearn:digits)"]
    assert "bad CSV dataset" in problems_of({"name": "x", "task": {"dataset": "csv:data.csv"}})[0]
    parse_spec({"name": "x", "task": {"dataset": "csv:/data/houses.csv?target=price&task=regression"}})


def test_model_params_are_checked() -> None:
    text = "\n".join(problems_of({"name": "x", "task": {"model": "mlp", "params": {"channels": 8, "width": 0}}}))
    assert "model 'mlp' has no param 'channels'; it takes depth, width" in text
    assert "params.width must be an integer in 1..65,536, got 0" in text
    parse_spec({"name": "x", "task": {"model": "mlp", "params": {"width": 8, "depth": 0}}})


def test_not_a_mapping() -> None:
    assert problems_of([1, 2]) == ["spec: expected a mapping of fields, got list"]


def test_spec_files(tmp_path) -> None:
    (tmp_path / "s.yaml").write_text("name: from-yaml\nn_trials: 3\n")
    assert load_spec_file(tmp_path / "s.yaml").n_trials == 3
    (tmp_path / "s.json").write_text('{"name": "from-json"}')
    assert load_spec_file(tmp_path / "s.json").name == "from-json"
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec_file(tmp_path / "bad.yaml")
    with pytest.raises(SpecError, match="No such file"):
        load_spec_file(tmp_path / "missing.yaml")


def test_the_training_seed_is_the_tasks_or_else_the_samplers() -> None:
    assert parse_spec({"name": "a", "sampler": {"seed": 7}}).training_seed() == 7
    assert parse_spec({"name": "a", "sampler": {"seed": None}}).training_seed() == 0
    assert parse_spec({"name": "a", "sampler": {"seed": 7}, "task": {"seed": 3}}).training_seed() == 3


def test_diabetes_is_a_regression_dataset_so_val_acc_is_refused() -> None:
    with pytest.raises(SpecError, match="val_acc needs a classification dataset"):
        parse_spec({"name": "a", "task": {"dataset": "sklearn:diabetes"}, "objective": {"metric": "val_acc"}})


@pytest.mark.parametrize("space", [
    {"lr": {"low": float("nan"), "high": 1.0}},
    {"lr": {"low": 1e-5, "high": float("inf")}},
    {"lr": float("nan")},
    {"dropout": float("-inf")},
    {"weight_decay": {"choices": [1e-4, float("nan")]}},
])
def test_nan_and_infinity_are_never_a_bound_value_or_choice(space: dict) -> None:
    assert problems_of({"name": "x", "search_space": space})
