"""The user's own LightningModule and data, by import path: loading, building, a dry run, training.

The contract (what the factories receive and return) is in `trainers.plugin_contract`.
Every failure here is a `PluginError` whose message names the cause and the import path.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from converge.trainers.callbacks import STANDARD_KEYS, EpochHook, ModuleMetricsCallback
from converge.trainers.config import TrainConfig
from converge.trainers.plugin_contract import MODEL_HYPERPARAMETERS, is_import_path
from converge.trainers.quiet import quiet_lightning


class PluginError(ValueError):
    """The user's model or data cannot be imported, built or trained; the message says why and names the path."""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def load_factory(path: str, role: str = "model") -> Callable[..., Any]:
    """Import "package.module:attribute" and return the attribute, which must be callable.

    The working directory is put on `sys.path` (at its end) first: a worker's slot processes
    are spawned, and a user's package next to where the worker was started must import there
    as it does in the shell (PYTHONPATH works too).
    """
    if not is_import_path(path):
        raise PluginError(f"task.{role} {path!r} is not an import path 'package.module:factory'")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    module_name, _, attribute = path.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except Exception as exc:
        raise PluginError(f"task.{role} {path!r} does not import: {_describe(exc)}") from exc
    if not callable(found):
        raise PluginError(f"task.{role} {path!r} is a {type(found).__name__}, not a callable factory")
    return found


def _accepted(factory: Callable[..., Any], offered: Mapping[str, Any]) -> tuple[dict[str, Any], set[str] | None]:
    """The keywords of `offered` that `factory` takes, and the names it takes (None: it takes **kwargs)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: offer everything
        return dict(offered), None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(offered), None
    names = {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                      inspect.Parameter.KEYWORD_ONLY)}
    return {k: v for k, v in offered.items() if k in names}, names


@dataclass
class Built:
    """The user's module and its data, as `trainer.fit` takes them."""

    module: pl.LightningModule
    fit_kwargs: dict[str, Any]  # datamodule=..., or train_dataloaders=... and val_dataloaders=...


def build(config: TrainConfig) -> Built:
    """Call the config's factories with the trial's hyperparameters; PluginError names what went wrong."""
    assert config.data is not None, "build() is for a user's task (config.data set)"
    model_factory = load_factory(config.model, "model")
    data_factory = load_factory(config.data, "data")
    params = dict(config.params)
    model_offer = {**{name: getattr(config, name) for name in MODEL_HYPERPARAMETERS}, **params}
    data_offer = {"batch_size": config.batch_size, "seed": config.seed, **params}
    model_kwargs, model_names = _accepted(model_factory, model_offer)
    data_kwargs, data_names = _accepted(data_factory, data_offer)
    if model_names is not None and data_names is not None:
        unused = sorted(set(params) - model_names - data_names)
        if unused:
            raise PluginError(f"task.params {unused} are taken by neither task.model {config.model!r} nor "
                              f"task.data {config.data!r}")
    pl.seed_everything(config.seed, workers=True, verbose=False)
    try:
        module = model_factory(**model_kwargs)
    except Exception as exc:
        raise PluginError(f"task.model {config.model!r} raised {_describe(exc)}") from exc
    if not isinstance(module, pl.LightningModule):
        raise PluginError(f"task.model {config.model!r} returned a {type(module).__name__}, not a "
                          "pytorch_lightning.LightningModule")
    try:
        data = data_factory(**data_kwargs)
    except Exception as exc:
        raise PluginError(f"task.data {config.data!r} raised {_describe(exc)}") from exc
    if isinstance(data, pl.LightningDataModule):
        return Built(module, {"datamodule": data})
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, Iterable) for d in data):
        return Built(module, {"train_dataloaders": data[0], "val_dataloaders": data[1]})
    raise PluginError(f"task.data {config.data!r} returned a {type(data).__name__}, not a "
                      "pytorch_lightning.LightningDataModule or a (train, val) pair of dataloaders")


def checkpoint_context(config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint carries besides the weights: enough to build the module again."""
    return {"model": config.model, "data": config.data, "seed": config.seed, "params": dict(config.params),
            "hyperparameters": {name: getattr(config, name) for name in MODEL_HYPERPARAMETERS}}


def _trainer(config: TrainConfig, callback: ModuleMetricsCallback, accelerator: str, **options: Any) -> pl.Trainer:
    return pl.Trainer(accelerator=accelerator, devices=1, callbacks=[callback], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, **options)


def fit_plugin(config: TrainConfig, on_epoch_end: EpochHook | None, accelerator: str,
               checkpoint_path: str | Path | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Train the user's module for `config.epochs` epochs (the hook may stop it sooner).

    Returns the per-epoch metrics and whether the hook stopped the run. Build errors are
    PluginErrors; an exception the user's code raises while training propagates (the sweep's
    objective names the model's path in the trial's error). `checkpoint_path`: the trained module is saved there.
    """
    built = build(config)
    callback = ModuleMetricsCallback(on_epoch_end, context=checkpoint_context(config))
    trainer = _trainer(config, callback, accelerator, max_epochs=config.epochs)
    trainer.fit(built.module, **built.fit_kwargs)
    if checkpoint_path is not None:
        trainer.save_checkpoint(checkpoint_path)
    return callback.epochs, callback.stopped_early


@dataclass
class DryRun:
    """A dry run's outcome: the metrics it logged (one training and one validation batch) and its time."""

    metrics: dict[str, Any]
    seconds: float

    @property
    def logged(self) -> list[str]:
        return sorted(name for name, value in self.metrics.items() if value is not None and name != "epoch_seconds"
                      and (name not in STANDARD_KEYS or name in ("train_loss", "val_loss", "val_acc")))


def dry_run(config: TrainConfig, objective_metric: str) -> DryRun:
    """Import both factories, build the module and data, and run one training and one validation
    batch on the CPU; PluginError when any step fails or the module logs no `objective_metric`.

    One function for `converge study create --check` and a worker's check before a study's first trial.
    """
    started = time.perf_counter()

    with quiet_lightning():
        built = build(config)
        callback = ModuleMetricsCallback()
        trainer = _trainer(config, callback, "cpu", fast_dev_run=1)
        try:
            trainer.fit(built.module, **built.fit_kwargs)
        except Exception as exc:
            raise PluginError(f"task.model {config.model!r} with task.data {config.data!r} failed on its first "
                              f"batch: {_describe(exc)}") from exc
    if not callback.epochs:
        raise PluginError(f"task.model {config.model!r} with task.data {config.data!r} ran no training epoch "
                          "(is the training data empty?)")
    metrics = callback.epochs[-1]
    result = DryRun(metrics, time.perf_counter() - started)
    if metrics.get(objective_metric) is None:
        raise PluginError(missing_metric_message(config.model, objective_metric, result.logged))
    return result


def missing_metric_message(model: str, metric: str, logged: Iterable[str]) -> str:
    logged = sorted(logged)
    return (f"task.model {model!r} logs no {metric!r}, the objective metric (it logs: "
            f"{', '.join(logged) if logged else 'nothing'}); call self.log({metric!r}, value) in its "
            "validation_step")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> pl.LightningModule:
    """The module a Converge checkpoint holds: built again by its factory with the stored
    hyperparameters, then given the stored weights (the factory must import here)."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    context = checkpoint.get("converge")
    if not context:
        raise PluginError(f"{path} is not a checkpoint of a Converge plug-in trial (no 'converge' entry)")
    config = TrainConfig(model=context["model"], data=context["data"], seed=context["seed"],
                         params=context["params"], device="cpu", **context["hyperparameters"])
    factory = load_factory(config.model, "model")
    kwargs, _ = _accepted(factory, {**context["hyperparameters"], **context["params"]})
    module = factory(**kwargs)
    module.load_state_dict(checkpoint["state_dict"])
    return module
