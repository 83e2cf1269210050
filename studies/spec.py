"""The study spec: what a user submits, validated in full before anything is stored.

Pure pydantic: the API validates specs with this module and must not import torch,
so the names of built-in models and datasets are listed here (a test keeps them
equal to `trainers`' own registries).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from converge.core.errors import Invalid
from converge.studies.registry import BASE_PRUNERS, PRUNERS, SAMPLERS

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,100}$"
# Each built-in model and the integer params it takes, with their (minimum, maximum); depth 0 is linear.
# The maxima keep one trial inside what a worker can hold: a spec cannot ask for a billion-unit layer.
MODEL_PARAMS: dict[str, dict[str, tuple[int, int]]] = {
    "mlp": {"width": (1, 65_536), "depth": (0, 64)},
    "cnn": {"channels": (1, 4_096)},
}
MODELS = frozenset(MODEL_PARAMS)
SKLEARN_DATASETS = frozenset({"digits", "wine", "breast_cancer", "iris", "diabetes", "friedman1"})
# Besides CSV files that say &task=regression:
REGRESSION_DATASETS = frozenset({"sklearn:diabetes", "sklearn:friedman1"})
IMAGE_DATASETS = frozenset({"sklearn:digits"})
MAX_TRIALS = 10_000
BUILTIN_METRICS = frozenset({"val_loss", "val_acc", "train_loss"})
# The user's own factories, "package.module:attribute" (as trainers.plugin_contract.IMPORT_PATH).
IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]{0,99}$")
MAX_RETRIES = 10
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 65_536
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds are 32-bit

_CSV_REF = re.compile(r"^csv:(?P<path>[^?]+)\?target=(?P<target>[^&]+)(&task=(classification|regression))?$")


def _shown(value: float) -> str:
    """A number for a message: `:g` for floats, digits for integers (too large for a float, `:g` would
    raise), named by its length past 40 characters."""
    if isinstance(value, int) and not isinstance(value, bool):
        text = f"{value:,}"
        return text if len(text) <= 40 else f"an integer of {len(str(abs(value)))} digits"
    return f"{value:g}"


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere in a JSON-like value (a plug-in's params are free-form)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


class _Strict(BaseModel):
    # NaN and infinities are never a valid bound, value or option: refused here, not by a worker later.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Range(_Strict):
    """An interval [low, high]; `log` samples it on a log scale."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> _Range:
        problems = []
        if self.low >= self.high:
            problems.append(f"low ({_shown(self.low)}) must be below high ({_shown(self.high)}); "
                            "use {value: x} to fix a value")
        if self.log and self.low <= 0:
            problems.append(f"a log scale needs positive bounds, got low={_shown(self.low)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def values(self) -> list[float]:
        return [self.low, self.high]


class FloatRange(_Range):
    pass


class IntRange(_Range):
    low: int
    high: int


class IntChoices(_Strict):
    choices: list[int]

    @field_validator("choices")
    @classmethod
    def _not_empty(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("choices must not be empty")
        if len(set(v)) != len(v):
            raise ValueError(f"choices must not repeat a value: {v}")
        return v

    def values(self) -> list[int]:
        return list(self.choices)


class FloatFixed(_Strict):
    value: float

    def values(self) -> list[float]:
        return [self.value]


class IntFixed(_Strict):
    value: int

    def values(self) -> list[int]:
        return [self.value]


def _param_kind(v: Any) -> str:
    """Pick the union member from the keys given, so errors name one shape, not all three.

    A bare number is shorthand for a fixed value.
    """
    if isinstance(v, BaseModel):
        return {FloatFixed: "Fixed", IntFixed: "Fixed", IntChoices: "Choices"}.get(type(v), "Range")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return "Number"
    if isinstance(v, dict) and "value" in v:
        return "Fixed"
    if isinstance(v, dict) and "choices" in v:
        return "Choices"
    return "Range"


def _number_as_fixed(v: Any) -> Any:
    return {"value": v}


FloatParam = Annotated[
    Union[
        Annotated[FloatRange, Tag("Range")],
        Annotated[FloatFixed, Tag("Fixed")],
        Annotated[Annotated[FloatFixed, BeforeValidator(_number_as_fixed)], Tag("Number")],
    ],
    Discriminator(_param_kind),
]
IntParam = Annotated[
    Union[
        Annotated[IntRange, Tag("Range")],
        Annotated[IntChoices, Tag("Choices")],
        Annotated[IntFixed, Tag("Fixed")],
        Annotated[Annotated[IntFixed, BeforeValidator(_number_as_fixed)], Tag("Number")],
    ],
    Discriminator(_param_kind),
]
AnyParam = Union[FloatRange, IntRange, IntChoices, FloatFixed, IntFixed]


def _check_bounds(name: str, param: AnyParam, minimum: float, *, inclusive: bool = True,
                  maximum: float | None = None, most: int | None = None) -> None:
    """Reject values a trainer cannot use (negative lr, dropout of 1, zero batch) or hold
    (`most`, inclusive: a hundred million epochs)."""
    for value in param.values():
        too_low = value < minimum if inclusive else value <= minimum
        if too_low:
            bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
            raise ValueError(f"{name} values must be {bound}, got {_shown(value)}")
        if maximum is not None and value >= maximum:
            raise ValueError(f"{name} values must be < {maximum:g}, got {_shown(value)}")
        if most is not None and value > most:
            raise ValueError(f"{name} values must be at most {most:,}, got {_shown(value)}")


class SearchSpace(_Strict):
    """The five swept hyperparameters; each may be narrowed, fixed or left at its default."""

    lr: FloatParam = Field(default_factory=lambda: FloatRange(low=1e-5, high=1.0, log=True))
    batch_size: IntParam = Field(default_factory=lambda: IntChoices(choices=[16, 32, 64, 128, 256]))
    epochs: IntParam = Field(default_factory=lambda: IntRange(low=5, high=50))
    weight_decay: FloatParam = Field(default_factory=lambda: FloatRange(low=1e-6, high=1e-1, log=True))
    dropout: FloatParam = Field(default_factory=lambda: FloatRange(low=0.0, high=0.7))

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: FloatParam) -> FloatParam:
        _check_bounds("lr", v, 0.0, inclusive=False)
        return v

    @field_validator("batch_size", "epochs")
    @classmethod
    def _positive_int(cls, v: IntParam, info: Any) -> IntParam:
        _check_bounds(info.field_name, v, 1, most=MAX_BATCH_SIZE if info.field_name == "batch_size" else MAX_EPOCHS)
        return v

    @field_validator("weight_decay")
    @classmethod
    def _weight_decay(cls, v: FloatParam) -> FloatParam:
        _check_bounds("weight_decay", v, 0.0)
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, v: FloatParam) -> FloatParam:
        _check_bounds("dropout", v, 0.0, maximum=1.0)
        return v

    def max_epochs(self) -> int:
        """The largest epoch count a trial may get: the budget axis for pruning."""
        return max(self.epochs.values())


# The five swept hyperparameters in the order Converge shows them: the search space's fields.
PARAM_NAMES: tuple[str, ...] = tuple(SearchSpace.model_fields)


class Task(_Strict):
    """What to train: a built-in model on a built-in or CSV dataset, or the user's own
    LightningModule and data: `model` and `data` both import paths "package.module:factory"
    (the contract: `trainers.plugin_contract`; only their form is checked here, a worker imports them)."""

    model: str = Field(default="mlp", description="a built-in model (mlp, cnn) or the user's model factory, "
                       "'package.module:factory'")
    data: str | None = Field(default=None, description="the user's data factory, 'package.module:factory' "
                             "(with a `model` import path); `dataset` and `val_fraction` are then unused")
    dataset: str = "sklearn:digits"
    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    params: dict[str, Any] = Field(default_factory=dict, description="model parameters, e.g. width, depth; for "
                                   "the user's own factories, fixed keywords passed to them")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="the data split's and the weights' "
                             f"initial seed, the same for every trial (0..{MAX_SEED}); the sampler's seed (or 0) when "
                             "absent")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in MODELS and not IMPORT_PATH.match(v):
            raise ValueError(f"unknown model {v!r}; known models: {', '.join(sorted(MODELS))}, or an import path "
                             "'package.module:factory' (with `data`)")
        return v

    @field_validator("data")
    @classmethod
    def _data_path(cls, v: str | None) -> str | None:
        if v is not None and not IMPORT_PATH.match(v):
            raise ValueError(f"data {v!r} is not an import path 'package.module:factory'")
        return v

    @field_validator("params")
    @classmethod
    def _finite_params(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = sorted(name for name, value in v.items() if not _finite(value))
        if bad:
            raise ValueError(f"params {bad}: every number must be finite (no NaN or infinity)")
        return v

    @property
    def is_plugin(self) -> bool:
        """The user's own model and data (import paths), not a built-in model."""
        return self.data is not None

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v.startswith("sklearn:"):
            if v.removeprefix("sklearn:") not in SKLEARN_DATASETS:
                known = ", ".join(f"sklearn:{n}" for n in sorted(SKLEARN_DATASETS))
                raise ValueError(f"unknown dataset {v!r}; known: {known}, or csv:PATH?target=COLUMN")
            return v
        if v.startswith("csv:"):
            if not _CSV_REF.match(v):
                raise ValueError(
                    f"bad CSV dataset {v!r}; expected csv:PATH?target=COLUMN[&task=classification|regression]"
                )
            return v
        raise ValueError(f"unknown dataset {v!r}; use sklearn:NAME or csv:PATH?target=COLUMN")

    @model_validator(mode="after")
    def _model_fits_dataset_and_params(self) -> Task:
        if self.model not in MODELS or self.data is not None:
            if self.model in MODELS:
                raise ValueError(f"data {self.data!r} needs a model import path 'package.module:factory', "
                                 f"not the built-in {self.model!r}")
            if self.data is None:
                raise ValueError(f"model {self.model!r} is an import path: name the data factory too, "
                                 "data: 'package.module:factory'")
            return self  # params go to the user's factories as they are
        problems = []
        if self.model == "cnn" and self.dataset not in IMAGE_DATASETS:
            problems.append(f"model 'cnn' needs an image dataset ({', '.join(sorted(IMAGE_DATASETS))})")
        known = MODEL_PARAMS[self.model]
        for name, value in self.params.items():
            if name not in known:
                problems.append(f"model {self.model!r} has no param {name!r}; it takes {', '.join(sorted(known))}")
                continue
            low, high = known[name]
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                shown = _shown(value) if isinstance(value, int) and not isinstance(value, bool) else repr(value)[:40]
                problems.append(f"params.{name} must be an integer in {low}..{high:,}, got {shown}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Objective(_Strict):
    metric: str = "val_loss"
    direction: Literal["minimize", "maximize"] = "minimize"

    @field_validator("metric")
    @classmethod
    def _metric_name(cls, v: str) -> str:
        if not METRIC_NAME.match(v):
            raise ValueError(f"objective metric {v!r} is not a metric name (letters, digits, _ . / -, up to 100)")
        return v


def _registered(kind: str, name: str, registry: Mapping[str, Any]) -> str:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; known {kind}s: {', '.join(registry)}")
    return name


class Sampler(_Strict):
    name: str = "tpe"
    seed: int | None = Field(default=0, ge=0, le=MAX_SEED, description=f"0..{MAX_SEED}; null: a random seed")
    grid_points: int = Field(default=3, ge=2, le=20, description="grid sampler: points per continuous axis")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return _registered("sampler", v, SAMPLERS)


class Pruner(_Strict):
    """`convergence` (the default): the `base` pruner over epochs, plus stopping a trial whose live
    diagnosis is diverged (unless its training loss is back under its first epoch's),
    exploding_gradients or vanishing_gradients, or slow_convergence, underfitting, oscillating (or
    that diverged) with at least `min_confidence` once `min_fraction` of its epochs have run, its
    loss no longer falling at a rate that would read as improving by its last epoch, and its best
    objective so far behind the median of the study's ended trials' best by that epoch; the
    learning-curve extrapolation (`extrapolation`); and (`early_stop`) completing early a trial
    whose diagnosis says it is done: converged or overfitting, past `early_stop_fraction` of its
    epochs."""

    name: str = "convergence"
    base: str = Field(default="hyperband", description="convergence only: the multi-fidelity pruner it wraps")
    min_fraction: float = Field(default=0.25, gt=0, le=1, description="convergence only: the share of a trial's "
                                "epochs before slow_convergence, underfitting or oscillating may prune it")
    min_confidence: float = Field(default=0.9, ge=0, le=1, description="convergence only: the diagnosis' "
                                  "confidence needed to prune a slow, underfitting or oscillating trial, or to stop "
                                  "one early")
    early_stop: bool = Field(default=True, description="convergence only: end a trial early, complete with its "
                             "objective at that epoch, once its diagnosis is converged or overfitting with at least "
                             "`min_confidence` after `early_stop_fraction` of its epochs: more epochs would not "
                             "improve it")
    early_stop_fraction: float = Field(default=0.5, gt=0, le=1, description="convergence only: the share of a "
                                       "trial's epochs before it may stop early: an early plateau is often a pause")
    extrapolation: bool = Field(default=True, description="convergence only: past `min_fraction` of its epochs, "
                                "prune a trial whose objective curve, extrapolated to its last epoch, would very "
                                "probably not beat the study's `extrapolation_top_k`-th best completed trial")
    extrapolation_top_k: int = Field(default=3, ge=1, description="convergence only: the completed trial to beat "
                                     "is the k-th best")
    extrapolation_probability: float = Field(default=0.95, gt=0, lt=1, description="convergence only: how sure the "
                                             "extrapolation must be that the trial ends no better than that trial")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return _registered("pruner", v, PRUNERS)

    @field_validator("base")
    @classmethod
    def _known_base(cls, v: str) -> str:
        return _registered("base pruner", v, BASE_PRUNERS)

    @model_validator(mode="after")
    def _options_need_convergence(self) -> Pruner:
        # Compared with the defaults, not with what was given: a stored spec carries every field.
        misplaced = [name for name in type(self).model_fields if name != "name"
                     and getattr(self, name) != type(self).model_fields[name].default]
        if misplaced and self.name != "convergence":
            raise ValueError(f"{', '.join(misplaced)}: only the convergence pruner takes these, not {self.name!r}")
        return self


class AutoRepair(_Strict):
    """Repair unhealthy trials without a user asking: each gets one new trial with its first remedy,
    at most `max` per study (each adds one trial to the study's n_trials)."""

    max: int = Field(ge=1, le=MAX_TRIALS, description="the most automatic repairs in the study")


class Checkpoints(_Strict):
    """Which trials' trained checkpoints are kept as Optuna artifacts: `best` (the best trial's),
    `top_k` (the `top_k` best completed trials'), or `none`. Pruned, failed and no-longer-kept
    trials' checkpoints are removed."""

    keep: Literal["none", "best", "top_k"] = "best"
    top_k: int = Field(default=3, ge=1, le=100, description="with keep: top_k, how many to keep")

    def count(self) -> int:
        """How many of the best completed trials keep their checkpoint."""
        return {"none": 0, "best": 1, "top_k": self.top_k}[self.keep]


class StudySpec(_Strict):
    """A study as submitted. Every field but `name` has a default."""

    name: Annotated[str, Field(description="unique, [A-Za-z0-9._-]{1,100}")]
    task: Task = Field(default_factory=Task)
    objective: Objective = Field(default_factory=Objective)
    search_space: SearchSpace = Field(default_factory=SearchSpace)
    n_trials: int = Field(default=40, description=f"1..{MAX_TRIALS}")
    sampler: Sampler = Field(default_factory=Sampler)
    pruner: Pruner = Field(default_factory=Pruner)
    retries: int = Field(default=2, ge=0, le=MAX_RETRIES,
                         description="how many times a trial whose process died is rerun with its parameters")
    auto_repair: AutoRepair | None = Field(default=None, description="repair unhealthy trials automatically, "
                                           "at most `max` per study; off when absent")
    checkpoints: Checkpoints | None = Field(default=None, description="which trials' trained checkpoints are kept "
                                            "as artifacts (keep: best | top_k | none); when absent, the best "
                                            "trial's for a model of your own (task.data set), none for a built-in")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "digits-mlp",
                    "task": {"model": "mlp", "dataset": "sklearn:digits"},
                    "search_space": {"epochs": {"low": 3, "high": 10}},
                    "n_trials": 12,
                }
            ]
        },
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(NAME_PATTERN, v):
            raise ValueError(f"name {v!r} must be 1-100 characters of A-Z a-z 0-9 . _ -")
        return v

    @field_validator("n_trials")
    @classmethod
    def _n_trials(cls, v: int) -> int:
        if not 1 <= v <= MAX_TRIALS:
            raise ValueError(f"n_trials must be between 1 and {MAX_TRIALS}, got {v}")
        return v

    def kept_checkpoints(self) -> int:
        """How many of the best completed trials keep their checkpoint (0: none is saved)."""
        if self.checkpoints is not None:
            return self.checkpoints.count()
        return 1 if self.task.is_plugin else 0

    def training_seed(self) -> int:
        """One split and one initialisation for every trial of the study, so their values compare."""
        if self.task.seed is not None:
            return self.task.seed
        return self.sampler.seed or 0

    @model_validator(mode="after")
    def _metric_fits_task(self) -> StudySpec:
        if self.task.is_plugin:
            return self  # the user's module logs what it logs: a worker's dry run checks the metric is there
        if self.objective.metric not in BUILTIN_METRICS:
            raise ValueError(f"objective.metric: unknown objective metric {self.objective.metric!r} for a built-in "
                             f"model; known: {', '.join(sorted(BUILTIN_METRICS))} (a model of your own may log any)")
        regression = self.task.dataset in REGRESSION_DATASETS or self.task.dataset.endswith("&task=regression")
        if self.objective.metric == "val_acc" and regression:
            raise ValueError("objective val_acc needs a classification dataset")
        return self


class SpecError(Invalid):
    """A spec with problems; `problems` lists each as 'field.path: what is wrong'."""

    what = "study spec"


def describe_errors(errors: Iterable[Mapping[str, Any]], skip_prefix: str | None = None) -> list[str]:
    """Turn pydantic's error items into one readable line per problem.

    `skip_prefix` drops a leading location part such as FastAPI's "body".
    """
    problems: list[str] = []
    for item in errors:
        loc = [str(part) for part in item["loc"]]
        if skip_prefix and loc[:1] == [skip_prefix]:
            loc = loc[1:]
        # Union members appear in `loc` (e.g. lr.FloatRange.low); keep the user's own path.
        path = ".".join(p for p in loc if not p[:1].isupper() and not p.startswith("function-"))
        message = item["msg"].removeprefix("Value error, ")
        line = f"{path or 'spec'}: {message}"
        if line not in problems:
            problems.append(line)
    return problems


def parse_spec(data: Any) -> StudySpec:
    """Validate a spec mapping; raise SpecError naming every problem at once."""
    if not isinstance(data, dict):
        raise SpecError([f"spec: expected a mapping of fields, got {type(data).__name__}"])
    try:
        return StudySpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(describe_errors(exc.errors())) from None


def load_spec_file(path: str | Path) -> StudySpec:
    """Read a JSON or YAML spec file (YAML is a superset of JSON)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SpecError([f"spec file {path}: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text) if not str(path).endswith(".json") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SpecError([f"spec file {path}: not valid YAML/JSON ({exc})"]) from None
    except ValueError:  # Python refuses to parse an integer of more than 4,300 digits
        raise SpecError([f"spec file {path}: a number is too long to read (more than 4,300 digits)"]) from None
    except RecursionError:
        raise SpecError([f"spec file {path}: nested too deeply to read"]) from None
    return parse_spec(data)
