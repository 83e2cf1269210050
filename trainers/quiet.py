"""Lightning, quiet: one place mutes its banners and hints for a run (our `fit` and a plug-in's dry run)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from pytorch_lightning.utilities.warnings import PossibleUserWarning

_LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric")


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Mute Lightning's info banners and its dataloader hints for one run.

    A sweep runs many trials; their output should hold results and real warnings only.
    Levels and filters are restored afterwards, so the caller's logging setup is untouched.
    """
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=PossibleUserWarning)
            # Lightning's own use of an API newer torch deprecates; nothing a caller can act on.
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
