"""The one object a sweep trial hands to `fit`: every knob of a training run, validated up front."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from converge.trainers.models import MODEL_NAMES
from converge.trainers.plugin_contract import is_import_path

DEVICES = frozenset({"auto", "cpu", "cuda"})
# Where `csv:` paths resolve and how much of a CSV file is read: Converge's defaults of
# CONVERGE_DATA_DIR and CONVERGE_MAX_DATA_BYTES (a worker passes its own settings).
DEFAULT_DATA_DIR = "./data"
DEFAULT_MAX_DATA_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters and task of one run.

    `params` holds the model's own parameters (mlp: `width`, `depth`; cnn: `channels`);
    `device` "auto" means CUDA when available, else CPU.

    A user's own task (`trainers.plugins`): `model` and `data` are import paths
    "package.module:factory"; `params` then go to the factories, and `dataset` and
    `val_fraction` are unused.
    """

    model: str = "mlp"
    dataset: str = "sklearn:digits"
    val_fraction: float = 0.2
    seed: int = 0
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 10
    weight_decay: float = 0.0
    dropout: float = 0.0
    params: Mapping[str, Any] = field(default_factory=dict)
    device: str = "auto"
    data: str | None = None  # the user's data factory, "package.module:factory": `model` is one too
    data_dir: str = DEFAULT_DATA_DIR  # a `csv:` dataset's path must resolve inside it
    max_data_bytes: int = DEFAULT_MAX_DATA_BYTES

    @property
    def is_plugin(self) -> bool:
        return self.data is not None

    def __post_init__(self) -> None:
        # Fail before any data is loaded or any process spends time on a hopeless run.
        problems = []
        if self.data is not None:
            for field_name in ("model", "data"):
                if not is_import_path(getattr(self, field_name)):
                    problems.append(f"{field_name} {getattr(self, field_name)!r} is not an import path "
                                    "'package.module:factory'")
        elif self.model not in MODEL_NAMES:
            problems.append(f"unknown model {self.model!r}; expected one of {sorted(MODEL_NAMES)}")
        if self.device not in DEVICES:
            problems.append(f"unknown device {self.device!r}; expected one of {sorted(DEVICES)}")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {self.batch_size}")
        if self.epochs < 1:
            problems.append(f"epochs must be at least 1, got {self.epochs}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be non-negative, got {self.weight_decay}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise ValueError("; ".join(problems))
