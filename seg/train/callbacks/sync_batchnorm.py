"""A SyncBatchNorm guard: ``sync_batchnorm=True`` on CPU processes (which torch rejects deep inside DDP with
"SyncBatchNorm layers only work with GPU modules") becomes an error saying what to change."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.callbacks import Callback

__all__ = ["SyncBatchNormCheck"]


class SyncBatchNormCheck(Callback):
    """Fail early, with the fix, when ``sync_batchnorm=True`` meets CPU processes.

    torch's SyncBatchNorm is GPU-only: DDP on CPU (gloo) raises "SyncBatchNorm layers only work with GPU
    modules" while wrapping the model. One CPU process ignores the flag (nothing to synchronise).
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning keeps the requested layer sync on parallel strategies only, and applies it when fitting
        layer_sync = getattr(trainer.strategy, "_layer_sync", None)
        if stage != "fit" or layer_sync is None or not isinstance(trainer.accelerator, CPUAccelerator):
            return
        raise ValueError(
            f"trainer.sync_batchnorm=true needs CUDA devices, but this run uses {trainer.world_size} CPU "
            f"processes (strategy {type(trainer.strategy).__name__}): torch's SyncBatchNorm has no CPU "
            "implementation. Add `--config configs/trainer/cpu.yaml` or `--trainer.sync_batchnorm=false` for CPU "
            "runs, or run on GPUs."
        )
