"""Plug-ins by name: each sampler and pruner a spec may name maps to a factory.

Factories import optuna lazily so that validating a spec (in the API) stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna


def _tpe(seed: int | None, **_: Any) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


def _random(seed: int | None, **_: Any) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def _cmaes(seed: int | None, **_: Any) -> optuna.samplers.BaseSampler:
    import optuna

    # CMA-ES handles only numerical axes; batch_size falls back to random sampling.
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def _gp(seed: int | None, **_: Any) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.GPSampler(seed=seed)


def _qmc(seed: int | None, **_: Any) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)


def _grid(seed: int | None, *, grid: dict[str, list[Any]], **_: Any) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.GridSampler(grid, seed=seed)


SAMPLERS: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    "tpe": _tpe,
    "random": _random,
    "cmaes": _cmaes,
    "gp": _gp,
    "qmc": _qmc,
    "grid": _grid,
}

# Samplers whose sequence is shared through the storage: every process must use the same seed.
SHARED_SEED_SAMPLERS = frozenset({"qmc", "grid"})


def _none(max_epochs: int) -> optuna.pruners.BasePruner:
    import optuna

    return optuna.pruners.NopPruner()


def _median(max_epochs: int) -> optuna.pruners.BasePruner:
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, max_epochs // 5))


def _hyperband(max_epochs: int) -> optuna.pruners.BasePruner:
    import optuna

    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs, reduction_factor=3)


def _sha(max_epochs: int) -> optuna.pruners.BasePruner:
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)


BASE_PRUNERS: dict[str, Callable[[int], optuna.pruners.BasePruner]] = {
    "none": _none,
    "median": _median,
    "hyperband": _hyperband,
    "sha": _sha,
}
# `convergence` is its base pruner in Optuna's eyes; its diagnosis rules run in the objective
# (`studies.pruning`), which sees each epoch's diagnosis.
PRUNERS = {"convergence": _hyperband, **BASE_PRUNERS}


def build_sampler(name: str, seed: int | None, grid: dict[str, list[Any]] | None = None) -> optuna.samplers.BaseSampler:
    return SAMPLERS[name](seed, grid=grid or {})


def build_pruner(name: str, max_epochs: int, base: str = "hyperband") -> optuna.pruners.BasePruner:
    """The Optuna pruner for a spec's pruner: for `convergence`, its `base`."""
    return BASE_PRUNERS[base if name == "convergence" else name](max_epochs)
