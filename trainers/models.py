"""Plain `nn.Module` networks, kept free of Lightning so a bare PyTorch loop can train them too."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from converge.trainers.config import TrainConfig
    from converge.trainers.data import DataSplit


class MLP(nn.Module):
    """`depth` hidden blocks of Linear + ReLU + Dropout, then a linear head."""

    def __init__(self, n_inputs: int, n_outputs: int, width: int = 128, depth: int = 2, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        size = n_inputs
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.ReLU(), nn.Dropout(dropout)]
            size = width
        layers.append(nn.Linear(size, n_outputs))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class SmallCNN(nn.Module):
    """Two conv + pool stages sized for the 8x8 digits images; takes flat feature rows."""

    def __init__(self, image_shape: tuple[int, int, int], n_outputs: int, channels: int = 16, dropout: float = 0.0):
        super().__init__()
        self.image_shape = tuple(image_shape)
        in_channels, height, width = self.image_shape
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * channels * (height // 4) * (width // 4), n_outputs),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.view(-1, *self.image_shape)))


def _mlp(config: TrainConfig, split: DataSplit, n_outputs: int) -> nn.Module:
    return MLP(split.n_features, n_outputs, width=int(config.params.get("width", 128)),
               depth=int(config.params.get("depth", 2)), dropout=config.dropout)


def _cnn(config: TrainConfig, split: DataSplit, n_outputs: int) -> nn.Module:
    if split.image_shape is None:
        raise ValueError("model 'cnn' needs an image dataset (sklearn:digits)")
    return SmallCNN(split.image_shape, n_outputs, channels=int(config.params.get("channels", 16)),
                    dropout=config.dropout)


# Each model's builder and the integer `params` it reads, with their (minimum, maximum): depth 0 is a
# linear model; the maxima keep a network inside what one worker can hold (as `studies.spec` checks).
_BUILDERS: Mapping[str, tuple[Callable[[TrainConfig, DataSplit, int], nn.Module], Mapping[str, tuple[int, int]]]] = {
    "mlp": (_mlp, {"width": (1, 65_536), "depth": (0, 64)}),
    "cnn": (_cnn, {"channels": (1, 4_096)}),
}
MODEL_NAMES = frozenset(_BUILDERS)
MODEL_PARAMS = {name: dict(params) for name, (_, params) in _BUILDERS.items()}


def build_network(config: TrainConfig, split: DataSplit) -> nn.Module:
    """The network named by `config.model`, sized for `split`; unknown model params are an error, not ignored."""
    builder, known = _BUILDERS[config.model]
    unknown = set(config.params) - set(known)
    if unknown:
        raise ValueError(f"unknown params for model {config.model!r}: {sorted(unknown)}; expected {sorted(known)}")
    for name, value in config.params.items():
        low, high = known[name]
        if not low <= int(value) <= high:
            raise ValueError(f"model param {name!r} must be in {low}..{high}, got {value}")
    n_outputs = split.n_classes if split.task == "classification" else 1
    return builder(config, split, n_outputs)
