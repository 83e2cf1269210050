"""Datasets as ready-to-train tensors: a deterministic split, standardised with train statistics only."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import torch
from sklearn import datasets
from sklearn.model_selection import train_test_split

from converge.trainers.config import DEFAULT_DATA_DIR, DEFAULT_MAX_DATA_BYTES

_SKLEARN_LOADERS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "digits": datasets.load_digits,
    "wine": datasets.load_wine,
    "breast_cancer": datasets.load_breast_cancer,
    "iris": datasets.load_iris,
    "diabetes": datasets.load_diabetes,
    "friedman1": lambda return_X_y=True: _friedman1(),
}
SKLEARN_DATASETS = frozenset(_SKLEARN_LOADERS)
SKLEARN_REGRESSION = frozenset({"diabetes", "friedman1"})  # the others are classification
TASKS = frozenset({"classification", "regression"})
MAX_INFERRED_CLASSES = 20  # an integer target with more distinct values is taken as regression
_IMAGE_SHAPES = {"sklearn:digits": (1, 8, 8)}
_REF_FORMS = "expected 'sklearn:NAME' or 'csv:PATH?target=COLUMN[&task=classification|regression]'"
# What an error may show of a CSV file's header (never its data): names cut to 40 characters, at most 20.
_SHOWN_NAME_CHARS = 40
_SHOWN_COLUMNS = 20


def _friedman1() -> tuple[np.ndarray, np.ndarray]:
    """Friedman's nonlinear regression (5 informative features of 10, noise sd 1), generated with a
    fixed seed: the same 1,000 rows everywhere. Unlike diabetes' 442 rows, it leaves a validation
    set large enough that one configuration's loss is told from another's beyond the noise."""
    return datasets.make_friedman1(n_samples=1000, n_features=10, noise=1.0, random_state=0)


@dataclass
class DataSplit:
    """Train and validation tensors plus what a model needs to size itself."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    task: str
    n_classes: int | None
    n_features: int
    image_shape: tuple[int, int, int] | None = None


def load_dataset(ref: str, val_fraction: float, seed: int, *, data_dir: str | Path = DEFAULT_DATA_DIR,
                 max_bytes: int = DEFAULT_MAX_DATA_BYTES) -> DataSplit:
    """Load `ref` ("sklearn:NAME" or "csv:PATH?target=COL[&task=...]") and split it by `seed`.

    A CSV path resolves inside `data_dir` (relative to it; an absolute one must lie in it), checked
    on the real path after symlinks, and a file larger than `max_bytes` is refused unread."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    kind, _, rest = ref.partition(":")
    if kind == "sklearn":
        if rest not in _SKLEARN_LOADERS:
            raise ValueError(f"unknown sklearn dataset {rest!r} in {ref!r}; expected one of {sorted(SKLEARN_DATASETS)}")
        x, y = _SKLEARN_LOADERS[rest](return_X_y=True)
        task = "regression" if rest in SKLEARN_REGRESSION else "classification"
        return _split(x.astype(np.float64), y, task, val_fraction, seed, _IMAGE_SHAPES.get(ref))
    if kind == "csv" and rest:
        x, y, task = _read_csv(ref, rest, Path(data_dir), max_bytes)
        return _split(x, y, task, val_fraction, seed, None)
    raise ValueError(f"bad dataset ref {ref!r}; {_REF_FORMS}")


def resolve_data_path(path_text: str, data_dir: Path) -> Path:
    """The real path of a CSV file named by a spec, refused (ValueError) when it leaves `data_dir`:
    an absolute path elsewhere, `..`, or a symlink pointing out. Mirrored by `studies.policy` at submission."""
    root = data_dir.resolve()
    try:
        path = (root / path_text).resolve()  # an absolute `path_text` replaces `root` in the join
    except (OSError, ValueError):  # a NUL byte, a symlink loop
        path = None
    if path is None or not path.is_relative_to(root):
        raise ValueError(f"CSV path {path_text!r} is outside the data folder {root} (CONVERGE_DATA_DIR): refused")
    return path


def _shown(name: str) -> str:
    return repr(name if len(name) <= _SHOWN_NAME_CHARS else name[:_SHOWN_NAME_CHARS] + "...")


def _read_rows(path: Path, max_bytes: int) -> list[list[str]]:
    """Every row of the file, refused without reading when it is over `max_bytes`."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"CSV file {path} has {size:,} bytes, more than the {max_bytes:,} a worker reads "
                         "(CONVERGE_MAX_DATA_BYTES)")
    with path.open("rb") as f:
        raw = f.read(max_bytes + 1)  # a file that grew since stat() is still capped
    if len(raw) > max_bytes:
        raise ValueError(f"CSV file {path} is larger than the {max_bytes:,} bytes a worker reads "
                         "(CONVERGE_MAX_DATA_BYTES)")
    try:
        return list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
    except UnicodeDecodeError:
        raise ValueError(f"CSV file {path} is not UTF-8 text") from None
    except csv.Error as exc:
        raise ValueError(f"CSV file {path} is not a readable CSV file ({exc})") from None


def _read_csv(ref: str, rest: str, data_dir: Path, max_bytes: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Numeric features and a target column from a headed CSV file inside `data_dir`.

    Errors name the file and the columns involved, never a cell of it (and names cut short):
    a trial's error is shown to every `read` token."""
    path_text, _, query = rest.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - {"target", "task"}
    if not path_text or not options.get("target") or unknown:
        raise ValueError(f"bad dataset ref {ref!r}; {_REF_FORMS}")
    target, task = options["target"], options.get("task")
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r} in {ref!r}; expected one of {sorted(TASKS)}")

    path = resolve_data_path(path_text, data_dir)
    if not path.is_file():
        raise ValueError(f"CSV file not found: {path_text} in the data folder {data_dir.resolve()}")
    rows = _read_rows(path, max_bytes)
    if not rows:
        raise ValueError(f"CSV file {path} is empty")
    header, body = [name.strip() for name in rows[0]], [row for row in rows[1:] if row]
    if target not in header:
        shown = ", ".join(_shown(name) for name in header[:_SHOWN_COLUMNS])
        more = f" and {len(header) - _SHOWN_COLUMNS} more" if len(header) > _SHOWN_COLUMNS else ""
        raise ValueError(f"target column {_shown(target)} not in {path}; its columns are {shown}{more}")
    if len(header) < 2 or not body:
        raise ValueError(f"CSV file {path} needs a header, at least one feature column and one data row")
    bad_rows = [i + 2 for i, row in enumerate(body) if len(row) != len(header)]
    if bad_rows:
        raise ValueError(f"CSV file {path}: rows {bad_rows[:5]} do not have {len(header)} fields")

    columns = list(zip(*body))
    target_index = header.index(target)
    features = []
    for i, name in enumerate(header):
        if i == target_index:
            continue
        values = _as_floats(columns[i])
        if values is None:
            raise ValueError(f"feature column {_shown(name)} in {path} is not numeric (or has empty cells)")
        features.append(values)
    x = np.stack(features, axis=1)

    raw_target = [v.strip() for v in columns[target_index]]
    numeric_target = _as_floats(raw_target)
    if task is None:
        is_regression = numeric_target is not None and not _looks_like_labels(numeric_target)
        task = "regression" if is_regression else "classification"
    if task == "regression":
        if numeric_target is None:
            raise ValueError(f"target column {_shown(target)} in {path} is not numeric, so it cannot be a "
                             "regression target")
        return x, numeric_target, task
    return x, np.asarray(raw_target if numeric_target is None else numeric_target), task


def _as_floats(cells: tuple[str, ...] | list[str]) -> np.ndarray | None:
    try:
        return np.array([float(c) for c in cells], dtype=np.float64)
    except ValueError:
        return None


def _looks_like_labels(values: np.ndarray) -> bool:
    """Integer-valued with few distinct values: class ids rather than a measured quantity."""
    finite = np.isfinite(values).all()
    return bool(finite and np.all(values == np.round(values)) and len(np.unique(values)) <= MAX_INFERRED_CLASSES)


def _split(x: np.ndarray, y: np.ndarray, task: str, val_fraction: float, seed: int,
           image_shape: tuple[int, int, int] | None) -> DataSplit:
    classification = task == "classification"
    n_classes = None
    if classification:
        classes, y = np.unique(y, return_inverse=True)  # any labels (strings, 3/5/7, ...) become 0..k-1
        n_classes = len(classes)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=val_fraction, random_state=seed, stratify=y if classification else None,
    )
    x_train, x_val = _standardise(x_train, x_val)
    if classification:
        targets = torch.as_tensor(y_train, dtype=torch.int64), torch.as_tensor(y_val, dtype=torch.int64)
    else:
        y_train, y_val = _standardise(y_train.reshape(-1, 1), y_val.reshape(-1, 1))
        targets = torch.as_tensor(y_train, dtype=torch.float32), torch.as_tensor(y_val, dtype=torch.float32)
    return DataSplit(
        x_train=torch.as_tensor(x_train, dtype=torch.float32),
        y_train=targets[0],
        x_val=torch.as_tensor(x_val, dtype=torch.float32),
        y_val=targets[1],
        task=task,
        n_classes=n_classes,
        n_features=x.shape[1],
        image_shape=image_shape,
    )


def _standardise(train: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale both by the train split's statistics, so validation leaks nothing into training."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std[std == 0] = 1.0
    return (train - mean) / std, (val - mean) / std
