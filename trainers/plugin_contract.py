"""The plug-in contract: the factories a spec names as `task.model` and `task.data`.

A spec may name the user's own code instead of a built-in model and dataset::

    task: {model: "mypkg.models:build", data: "mypkg.data:build", params: {hidden: 64}}

- `model` is called with the trial's hyperparameters, as keywords: `lr`, `weight_decay`,
  `dropout`, `batch_size`, `epochs`, plus every fixed `task.params` entry, and returns a
  `LightningModule` (`ModelFactory`).
- `data` is called with `batch_size`, `seed` and the same `task.params`, and returns a
  `LightningDataModule` or a `(train_dataloader, val_dataloader)` pair (`DataFactory`).

A factory receives only the keywords its signature names, or all of them when it takes
`**kwargs`; a `task.params` entry that neither factory takes is an error. The module logs its
losses with `self.log(...)` as usual (the objective metric, e.g. `val_loss` or `val_f1`, at
validation); Converge's callback reads them and measures gradient and weight norms and the
learning rate itself (`trainers.callbacks.ModuleMetricsCallback`).

This file imports nothing heavy: the spec form check (`is_import_path`) is repeated in
`studies.spec`, which the API imports without torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, Union, runtime_checkable

if TYPE_CHECKING:
    import pytorch_lightning as pl

# "package.module:attribute", the attribute possibly dotted (a class's static method).
IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

# The keywords each factory may receive besides `task.params`.
MODEL_HYPERPARAMETERS = ("lr", "weight_decay", "dropout", "batch_size", "epochs")
DATA_ARGUMENTS = ("batch_size", "seed")


def is_import_path(text: str) -> bool:
    return bool(IMPORT_PATH.match(text))


@runtime_checkable
class ModelFactory(Protocol):
    """`task.model`: the trial's hyperparameters (and `task.params`) in, a LightningModule out."""

    def __call__(self, *, lr: float, weight_decay: float, dropout: float, batch_size: int, epochs: int,
                 **params: Any) -> pl.LightningModule: ...


DataFactoryResult = Union["pl.LightningDataModule", tuple[Iterable[Any], Iterable[Any]]]


@runtime_checkable
class DataFactory(Protocol):
    """`task.data`: `batch_size`, `seed` (and `task.params`) in, a LightningDataModule or (train, val) loaders out."""

    def __call__(self, *, batch_size: int, seed: int, **params: Any) -> DataFactoryResult: ...
