"""Lightning's learning-rate monitor, idle in a run without a logger instead of refusing it."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning import callbacks
from pytorch_lightning.utilities import rank_zero_info

__all__ = ["LearningRateMonitor"]


class LearningRateMonitor(callbacks.LearningRateMonitor):
    """Logs the learning rate of every parameter group, as Lightning's does; with no logger
    (``--trainer.logger false``) it says so once and logs nothing, where Lightning's stops the run."""

    def on_train_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if not trainer.loggers:
            rank_zero_info("no logger (trainer.logger false): learning rates are not logged")
            return
        super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)
