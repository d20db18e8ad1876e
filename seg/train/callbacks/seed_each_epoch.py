"""Per-epoch seeding: each epoch's shuffle, in-process augmentations and dropout masks are a function of
(seed, epoch, rank), so a run resumed from an epoch-boundary checkpoint continues bit-identically."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, RandomSampler

__all__ = ["SeedEachEpoch", "epoch_seed"]


def _dataset_with_reseed(dataset: Dataset | None) -> Any:
    """The data set (or the one it wraps, e.g. a Subset) that has a ``reseed(seed)`` method, else None."""
    while dataset is not None:
        if hasattr(dataset, "reseed"):
            return dataset
        dataset = getattr(dataset, "dataset", None)
    return None


def epoch_seed(base: int, epoch: int, rank: int) -> int:
    """A 32-bit seed mixing the run's seed, the epoch and the global rank."""
    return int(np.random.SeedSequence([base % 2**63, epoch, rank]).generate_state(1, dtype=np.uint32)[0])


class SeedEachEpoch(Callback):
    """Make every random draw of an epoch a function of (seed, epoch, rank) only, so that resuming from a
    checkpoint written at an epoch boundary continues bit-identically (CPU; GPU kernels may add their own
    nondeterminism).

    At the start of each epoch (and of a resumed run, where Lightning may skip that hook) the shuffle of a
    ``RandomSampler`` gets its own generator and the in-process augmentation pipeline (``num_workers=0``) is
    reseeded; at the epoch's first batch the global torch, numpy and python RNGs (dropout, drop-path) are
    reseeded. Lightning creates a resumed run's first loader iterator before any hook runs, so the timing of
    its draws cannot matter. Distributed samplers already shuffle by (seed, epoch). Limits: worker processes
    are seeded once, when they start (``worker_init_fn``), so exactness needs ``num_workers=0``; a mid-epoch
    resume restarts the epoch's data order (the loader has no saved position).

    Args:
        seed: base seed; None reads ``PL_GLOBAL_SEED`` (set by ``seed_everything``), else 0.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def _epoch_seed(self, trainer: pl.Trainer) -> int:
        base = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        return epoch_seed(base, trainer.current_epoch, trainer.global_rank)

    def _seed_data(self, trainer: pl.Trainer) -> None:
        seed = self._epoch_seed(trainer)
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            return
        if isinstance(loader.sampler, RandomSampler):  # drawn lazily, at the epoch's first batch
            loader.sampler.generator = torch.Generator().manual_seed(seed)
        if loader.num_workers == 0:
            dataset = _dataset_with_reseed(loader.dataset)
            if dataset is not None:
                dataset.reseed(seed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seed_data(trainer)  # a run resumed on an epoch's last batch skips that epoch's start hook

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seed_data(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == 0:
            seed = self._epoch_seed(trainer)
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)  # CPU and every CUDA device
