"""Induced causes: for each verdict, recipes that configure a run to fail (or succeed) that way.

A recipe takes a seeded `random.Random` and a seed and returns the run's spec and a short cause. The
hyperparameters vary with the seed (dataset, optimizer, lr, batch size, width, depth, epochs), so no
verdict is tied to one dataset or optimizer. Whether a run really shows its verdict is decided
afterwards by `curves.checks`, never assumed from the recipe.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

from .train import RunSpec

Recipe = Callable[[random.Random, int], tuple[RunSpec, str]]
CLS = ("iris", "wine", "breast_cancer", "moons", "circles", "synthetic3")  # digits: see `_dataset`
REG = ("diabetes", "linreg", "friedman1", "friedman2")
RAW = ("diabetes", "linreg", "friedman2")  # raw targets in the hundreds: MSE in the thousands
NLL = ("linreg", "friedman1", "friedman2")  # known noise, so the Gaussian NLL has a known floor
FULL_BATCH = 100_000


def _dataset(r: random.Random, names: tuple[str, ...] = CLS + REG) -> str:
    """One of `names`, or now and then digits (its epochs cost ~3x the others', so it is drawn less)."""
    return "digits" if r.random() < 0.1 else r.choice(names)


def _epochs(r: random.Random, lo: int, hi: int) -> int:
    return r.randrange(lo, hi + 1, 2)


def _loss(r: random.Random, dataset: str, p_raw: float = 0.0, p_nll: float = 0.0) -> str:
    """Mostly the default loss; sometimes raw-target MSE (thousands) or a Gaussian NLL (negative)."""
    u = r.random()
    if dataset in RAW and u < p_raw:
        return "mse_raw"
    if dataset in NLL and p_raw <= u < p_raw + p_nll:
        return "gnll"
    return "default"


# --- diverged: the lr is far too high ---------------------------------------------------------------------------

def sgd_lr_far_too_high(r: random.Random, seed: int) -> tuple[RunSpec, str]:
    lr = r.choice([1.0, 2.0, 5.0])
    spec = RunSpec(_dataset(r), r.choice(["sgd", "momentum"]), lr, r.choice([16, 32, 64]), _epochs(r, 16, 60), seed,
                   width=r.choice([32, 64, 128]), depth=r.choice([2, 3, 4]))
    return spec, f"SGD lr {lr:g}, 10-50x a working lr"


def warmup_to_lr_far_too_high(r: random.Random, seed: int) -> tuple[RunSpec, str]:
    ds, warmup = _dataset(r), r.choice([8, 12, 16, 20])
    lr = r.choice([2.0, 4.0] if ds in REG else [5.0, 10.0])
    spec = RunSpec(ds, r.choice(["sgd", "momentum", "nesterov"]), lr, r.choice([16, 32, 64]),
                   _epochs(r, 30, 80), seed, width=r.choice([32, 64]), depth=r.choice([1, 2, 3]), warmup=warmup)
    return spec, f"linear lr warmup over {warmup} epochs to lr {lr:g}, far too high: it diverges on the way up"


def full_batch_gd_past_stability(r: random.Random, seed: int) -> tuple[RunSpec, str]:
    ds = r.choice(REG)
    lr = r.choice([1.5, 2.0, 3.0])
    spec = RunSpec(ds, r.choice(["sgd", "nesterov"]), lr, FULL_BATCH, _epochs(r, 20, 60), seed,
                   width=r.choice([16, 32, 64]), depth=r.choice([1, 2]), loss=_loss(r, ds, p_nll=0.3))
    return spec, f"full-batch GD, lr {lr:g} just past the stability limit: the loss grows geometrically"


def raw_targets_lr_too_high(r: random.Random, seed: int) -> tuple[RunSpec, str]:
    lr, warmup = r.choice([0.003, 0.01, 0.03]), r.choice([0, 6, 10])
    spec = RunSpec(r.choice(RAW), r.choice(["sgd", "momentum"]), lr, r.choice([16, 32]), _epochs(r, 16, 50), seed,
                   width=r.choice([32, 64]), depth=r.choice([1, 2]), loss="mse_raw", warmup=warmup)
    return spec, f"SGD lr {lr:g} on raw (unstandardised) targets, MSE in the thousands" + (
        f", reached by a {warmup}-epoch warmup" if warmup else "")


# --- exploding_gradients -----------------------------------------------------------------------------------------

def raw_targets_clipped(r: random.Random, seed: int) -> tuple[RunSpec, str]:
    lr = r.choice([0.01, 0.02, 0.05])
    spec = RunSpec(r.choice(RAW), r.choice(["momentum", "nesterov"]), lr, r.choice([16, 32]), _epochs(r, 30, 60),
                   seed, width=r.choice([32, 64]), depth=r.choice([6, 8]), loss="mse_raw", bias=False, clip=1.0,
                   warmup=r.choice([8, 10, 12]))
    return spec, ("raw targets and a bias-free deep ReLU net, whose output must grow x100: the gradient norm "
                  "(measured before clip_grad_norm_(1)) explodes while the clipped update keeps the loss finite")


# --- vanishing_gradients -----------------------------------------------------------------------------------------

def deep_tanh_small_init(r: random.Random, seed: int) -> tuple[RunSpec, str]:
    depth, init = r.choice([8, 10, 12]), r.choice([0.03, 0.04, 0.05, 0.06])
    spec = RunSpec(_dataset(r), r.choice(["sgd", "momentum"]), r.choice([0.01, 0.03, 0.1]), r.choice([16, 32]),
                   _epochs(r, 12, 40), seed, width=r.choice([32, 64]), depth=depth, activation="tanh",
                   init_std=init, bias=False)
    return spec, f"{depth}-layer tanh net, weights initialised with std {init:g}: the signal dies with depth"


# --- oscillating ---------------------------------------------------------------------------------------------------

def sgd_tiny_batches(r: random.Random, seed: int) -> tuple[RunSpec, str]:
    ds = r.choice(CLS + REG)
    lr, bs = r.choice([0.05, 0.1, 0.2] if ds in REG else [0.5, 1.0, 2.0]), r.choice([4, 8])
    spec = RunSpec(ds, r.choice(["sgd", "momentum"]), lr, bs, _epochs(r, 20, 50), seed, width=r.choice([8, 16, 32]),
                   depth=r.choice([0, 1, 2]))
    return spec, f"SGD lr {lr:g}, moderately too high for batch size {bs}"


def adaptive_lr_high(r: random.Random, seed: int) -> tuple[RunSpec, str]:
    lr = r.choice([0.02, 0.03, 0.05])
    spec = RunSpec(r.choice(CLS + REG), r.choice(["adam", "rmsprop"]), lr, r.choice([8, 16]), _epochs(r, 20, 50),
                   seed, width=r.choice([32, 64]), depth=r.choice([1, 2]))
    return spec, f"{spec.optimizer} lr {lr:g} moderately too high, small batches"


def nll_lr_high(r: random.Random, seed: int) -> tuple[RunSpec, str]:
    spec = RunSpec(r.choice(("linreg", "friedman2")), r.choice(["adam", "rmsprop"]), 0.02, 8, _epochs(r, 24, 40), seed,
                   width=32, depth=r.choice([1, 2]), loss="gnll")
    return spec, f"{spec.optimizer} lr 0.02 too high for a Gaussian-NLL head (learned variance), batch size 8"


# --- slow_convergence (its length is fitted afterwards, see make_curves.fit_slow_length) -------------------------

def lr_far_too_low(r: random.Random, seed: int) -> tuple[RunSpec, str]:
    opt = r.choice(["sgd", "sgd", "momentum", "adam"])
    working = {"sgd": 0.1, "momentum": 0.01, "adam": 3e-3}[opt]
    factor = r.choice([30, 100, 300])
    ds = _dataset(r)
    spec = RunSpec(ds, opt, working / factor, r.choice([16, 32, 64]), 100, seed, width=r.choice([32, 64, 128]),
                   depth=r.choice([1, 2]), loss=_loss(r, ds, p_raw=0.2))
    if spec.loss == "mse_raw":
        spec = replace(spec, optimizer="adam", lr=0.3 / factor)
    return spec, f"{spec.optimizer} lr {spec.lr:.2g}, 1/{factor} of a working lr"


# --- still_improving / converged: healthy runs ---------------------------------------------------------------------

def _healthy(r: random.Random, seed: int, epochs: int, lr_scale: float) -> RunSpec:
    ds = _dataset(r)
    loss = _loss(r, ds, p_raw=0.2, p_nll=0.25)
    opt = r.choice(["adam", "adamw", "momentum", "nesterov"])
    if loss == "mse_raw":
        opt = "adam"
    lr = r.choice([1e-3, 2e-3, 3e-3]) if opt.startswith("adam") else r.choice([0.005, 0.01, 0.02])
    if loss == "mse_raw":
        lr *= 5
    return RunSpec(ds, opt, lr * lr_scale, r.choice([32, 64]), epochs, seed, width=r.choice([32, 64, 128]),
                   depth=r.choice([1, 2]), weight_decay=r.choice([1e-4, 1e-3]), dropout=r.choice([0.0, 0.1]),
                   loss=loss)


def healthy_stopped_early(r: random.Random, seed: int) -> tuple[RunSpec, str]:
    spec = _healthy(r, seed, _epochs(r, 50, 100), lr_scale=0.5)
    stop = max(8, round(r.choice([0.2, 0.25, 0.3, 0.35, 0.4]) * spec.epochs))
    spec = replace(spec, stop_after=stop, cosine=r.random() < 0.3)
    return spec, f"healthy run stopped (pruned) after {stop} of {spec.epochs} epochs"


def healthy_long(r: random.Random, seed: int) -> tuple[RunSpec, str]:
    """Half decay the lr (cosine); the other half keep it and rely on L2 (coupled: adam, not adamw) to settle."""
    spec = replace(_healthy(r, seed, _epochs(r, 40, 100), lr_scale=2.0), batch_size=64, cosine=r.random() < 0.4)
    if spec.cosine:
        return replace(spec, weight_decay=spec.weight_decay * 10), "healthy run trained long enough, cosine lr decay"
    spec = replace(spec, optimizer=spec.optimizer.replace("adamw", "adam"), lr=spec.lr / 2, weight_decay=1e-2)
    return spec, "healthy run trained long enough, L2 weight decay 0.01"


def nll_stopped_early(r: random.Random, seed: int) -> tuple[RunSpec, str]:
    """A healthy run with a Gaussian NLL head (learned variance), whose loss goes below 0 as the fit improves."""
    spec = RunSpec(r.choice(("linreg", "friedman2")), "adam", r.choice([1e-3, 2e-3]), 64, _epochs(r, 60, 100), seed,
                   width=64, depth=2, weight_decay=1e-3, loss="gnll")
    stop = round(r.choice([0.25, 0.3, 0.35]) * spec.epochs)
    cause = f"healthy Gaussian-NLL run stopped (pruned) after {stop} of {spec.epochs} epochs"
    return replace(spec, stop_after=stop), cause


# --- overfitting --------------------------------------------------------------------------------------------------

def big_net_tiny_subset(r: random.Random, seed: int) -> tuple[RunSpec, str]:
    n = r.choice([60, 80, 100, 150])
    ds = r.choice(("digits", "synthetic3", "wine", "moons", "diabetes", "friedman1", "friedman2", "linreg"))
    opt = r.choice(["adam", "adamw", "momentum"])
    lr = 3e-3 if opt.startswith("adam") else 0.03
    spec = RunSpec(ds, opt, lr, r.choice([16, 32]), _epochs(r, 40, 100), seed, width=r.choice([256, 512]),
                   depth=r.choice([2, 3]), n_train=n, loss=_loss(r, ds, p_nll=0.5), cosine=r.random() < 0.4)
    return spec, f"{spec.model_name()} on {n} training rows, no regularisation"


# --- underfitting -------------------------------------------------------------------------------------------------

def heavy_dropout(r: random.Random, seed: int) -> tuple[RunSpec, str]:
    p, opt = r.choice([0.8, 0.9, 0.95]), r.choice(["adam", "momentum"])
    spec = RunSpec(_dataset(r), opt, 3e-3 if opt == "adam" else 0.02, 32, _epochs(r, 30, 80), seed,
                   width=r.choice([8, 16]), depth=r.choice([2, 3]), dropout=p, cosine=r.random() < 0.3)
    return spec, f"dropout {p:g} on a narrow net"


def huge_weight_decay(r: random.Random, seed: int) -> tuple[RunSpec, str]:
    wd, opt = r.choice([0.3, 1.0, 3.0]), r.choice(["adam", "sgd", "momentum"])
    spec = RunSpec(_dataset(r), opt, 3e-3 if opt == "adam" else 0.02, 32, _epochs(r, 30, 80), seed,
                   width=r.choice([32, 64]), depth=r.choice([1, 2]), weight_decay=wd, cosine=r.random() < 0.3)
    return spec, f"L2 weight decay {wd:g}, far too strong"


def linear_model_nonlinear_data(r: random.Random, seed: int) -> tuple[RunSpec, str]:
    opt = r.choice(["adam", "momentum", "sgd"])
    spec = RunSpec(r.choice(("moons", "circles", "friedman1", "friedman2")), opt, 0.01 if opt == "adam" else 0.05,
                   r.choice([16, 32]), _epochs(r, 30, 80), seed, depth=0)
    return spec, "linear model on non-linear data"


RECIPES: dict[str, tuple[Recipe, ...]] = {
    "diverged": (warmup_to_lr_far_too_high, sgd_lr_far_too_high, full_batch_gd_past_stability,
                 raw_targets_lr_too_high),
    "exploding_gradients": (raw_targets_clipped,),
    "vanishing_gradients": (deep_tanh_small_init,),
    "oscillating": (sgd_tiny_batches, adaptive_lr_high, sgd_tiny_batches, nll_lr_high),
    "slow_convergence": (lr_far_too_low,),
    "still_improving": (healthy_stopped_early, healthy_stopped_early, healthy_stopped_early, nll_stopped_early),
    "converged": (healthy_long,),
    "overfitting": (big_net_tiny_subset,),
    "underfitting": (heavy_dropout, huge_weight_decay, linear_model_nonlinear_data),
}


def candidate(label: str, i: int) -> tuple[RunSpec, str]:
    """The i-th candidate run for `label`: recipes take turns, and (label, i) fixes every random choice."""
    recipes = RECIPES[label]
    return recipes[i % len(recipes)](random.Random(f"{label}/{i}"), i)
