"""The datasets: scikit-learn's bundled and generated ones only, so nothing is ever downloaded.

Every dataset is split 75/25 by a fixed seed and its features are standardised with training
statistics. Regression targets are kept raw alongside their standardised form, and the generated
regression sets record their noise level (in standardised units), which gives the Bayes floor of
a Gaussian negative log-likelihood (see `nll_floor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import torch
from sklearn import datasets
from sklearn.model_selection import train_test_split

SPLIT_SEED = 1234
VAR_MIN = 1e-4  # the Gaussian NLL head predicts softplus(.) + VAR_MIN


@dataclass(frozen=True)
class Data:
    """Train and validation tensors for one dataset."""

    name: str
    task: str
    x_train: torch.Tensor
    y_train: torch.Tensor  # class indices, or standardised targets
    x_val: torch.Tensor
    y_val: torch.Tensor
    n_classes: int | None = None
    y_mean: float = 0.0  # raw target = y_mean + y_std * standardised target
    y_std: float = 1.0
    noise_std: float | None = None  # known noise of a generated regression set, standardised units

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    def subset(self, n_train: int, seed: int) -> Data:
        """The same data with only `n_train` training rows (the validation split is unchanged)."""
        idx = torch.randperm(len(self.x_train), generator=torch.Generator().manual_seed(seed))[:n_train]
        return replace(self, x_train=self.x_train[idx], y_train=self.y_train[idx])


def _classification(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "moons":
        return datasets.make_moons(n_samples=600, noise=0.25, random_state=0)
    if name == "circles":
        return datasets.make_circles(n_samples=600, noise=0.1, factor=0.5, random_state=0)
    if name == "synthetic3":
        return datasets.make_classification(n_samples=800, n_features=20, n_informative=8, n_redundant=4,
                                            n_classes=3, n_clusters_per_class=2, random_state=0)
    loader = {"iris": datasets.load_iris, "wine": datasets.load_wine, "digits": datasets.load_digits,
              "breast_cancer": datasets.load_breast_cancer}[name]
    return loader(return_X_y=True)


def _regression(name: str) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Features, raw targets and the target noise standard deviation where the generator knows it."""
    if name == "diabetes":
        x, y = datasets.load_diabetes(return_X_y=True)
        return x, y, None
    if name == "linreg":
        x, y = datasets.make_regression(n_samples=600, n_features=10, n_informative=6, noise=15.0, bias=300.0,
                                        random_state=0)
        return x, y, 15.0
    if name == "friedman2":
        x, y = datasets.make_friedman2(n_samples=600, noise=20.0, random_state=0)
        return x, y, 20.0
    if name == "friedman1":
        x, y = datasets.make_friedman1(n_samples=600, noise=1.0, random_state=0)
        return x, y, 1.0
    raise KeyError(name)


CLASSIFICATION = ("iris", "wine", "breast_cancer", "digits", "moons", "circles", "synthetic3")
REGRESSION = ("diabetes", "linreg", "friedman1", "friedman2")


@cache
def load(name: str) -> Data:
    """Dataset `name`, split and standardised; cached, as every run of a dataset shares the split."""
    if name in CLASSIFICATION:
        x, y = _classification(name)
        xt, xv, yt, yv = train_test_split(x, y, test_size=0.25, random_state=SPLIT_SEED, stratify=y)
        xt, xv = _standardise(xt, xv)
        return Data(name, "classification", _f(xt), torch.as_tensor(yt, dtype=torch.long), _f(xv),
                    torch.as_tensor(yv, dtype=torch.long), n_classes=int(len(np.unique(y))))
    x, y, noise = _regression(name)
    xt, xv, yt, yv = train_test_split(x, y, test_size=0.25, random_state=SPLIT_SEED)
    xt, xv = _standardise(xt, xv)
    mean, std = float(yt.mean()), float(yt.std())
    return Data(name, "regression", _f(xt), _f((yt - mean) / std), _f(xv), _f((yv - mean) / std),
                y_mean=mean, y_std=std, noise_std=None if noise is None else noise / std)


def nll_floor(data: Data) -> float:
    """The expected Gaussian NLL of the true function with the true noise: no model can beat it on fresh data."""
    if data.noise_std is None:
        raise ValueError(f"{data.name} has no known noise level")
    var = max(data.noise_std**2, VAR_MIN)
    return 0.5 * (math.log(2 * math.pi * var) + data.noise_std**2 / var)


def _standardise(train: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[std == 0] = 1.0
    return (train - mean) / std, (val - mean) / std


def _f(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float32)
