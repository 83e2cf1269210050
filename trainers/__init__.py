"""Training for Converge's sweep trials: PyTorch Lightning, per-epoch metrics, early stop by hook.

Imports torch and Lightning, never the sweep (`studies`) or the web service: those call in here.
"""

from converge.trainers.callbacks import EpochHook
from converge.trainers.config import TrainConfig
from converge.trainers.data import SKLEARN_DATASETS, DataSplit, load_dataset
from converge.trainers.fit import FitResult, fit
from converge.trainers.models import MODEL_NAMES, MODEL_PARAMS

__all__ = [
    "MODEL_NAMES",
    "MODEL_PARAMS",
    "SKLEARN_DATASETS",
    "DataSplit",
    "EpochHook",
    "FitResult",
    "TrainConfig",
    "fit",
    "load_dataset",
]
