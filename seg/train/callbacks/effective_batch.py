"""Effective batch: log ``devices x nodes x per-device batch x accumulation = N`` when training starts and, when N
differs from the batch the learning rates were tuned for, rescale them (linear rule of Goyal et al. 2017, or square
root) or only warn."""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

__all__ = ["EffectiveBatch", "LRRule", "effective_batch", "lr_factor", "scale_learning_rates"]

LRRule = Literal["linear", "sqrt", "none"]
CHECKPOINT_KEY = "effective_batch"  # where EffectiveBatch keeps the batch the saved learning rates are for


def lr_factor(batch: int, reference: int, rule: LRRule) -> float:
    """Multiplier for learning rates tuned at batch ``reference`` when training at batch ``batch``.

    ``linear``: batch / reference (Goyal et al. 2017, "Accurate, Large Minibatch SGD");
    ``sqrt``: sqrt(batch / reference) (often preferred for Adam-type optimizers); ``none``: 1.
    """
    if batch < 1 or reference < 1:
        raise ValueError(f"batch sizes must be >= 1, got batch={batch}, reference={reference}")
    if rule == "linear":
        return batch / reference
    if rule == "sqrt":
        return math.sqrt(batch / reference)
    if rule == "none":
        return 1.0
    raise ValueError(f"unknown lr_rule {rule!r}; valid options: {', '.join(get_args(LRRule))}")


def scale_learning_rates(trainer: pl.Trainer, factor: float) -> list[tuple[float, float]]:
    """Multiply the learning rate of every optimizer parameter group, and the base rates of the schedulers, by
    ``factor``.

    Schedulers that derive the rate from ``base_lrs`` (all of ``torch.optim.lr_scheduler``'s multiplicative
    ones and :class:`~seg.train.schedules.WarmupPolyLR`) keep following the scaled rates.

    Returns:
        ``(old, new)`` learning rate per parameter group, in optimizer order.
    """
    changes = []
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            old = float(group["lr"])
            group["lr"] = old * factor
            if "initial_lr" in group:  # what a scheduler's base_lrs were read from
                group["initial_lr"] = float(group["initial_lr"]) * factor
            changes.append((old, old * factor))
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [base * factor for base in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):  # what get_last_lr() reports
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return changes


def _per_device_batch(trainer: pl.Trainer) -> int:
    """Training images per device and step: the train loader's batch size, else the data module's."""
    loader = trainer.train_dataloader
    size = getattr(loader, "batch_size", None)
    if size is None and isinstance(loader, DataLoader):
        size = getattr(loader.batch_sampler, "batch_size", None)
    if size is None:
        size = getattr(trainer.datamodule, "batch_size", None)
    if not isinstance(size, int) or size < 1:
        raise ValueError("EffectiveBatch could not read the per-device batch size from the train loader or the "
                         "data module (expected an int `batch_size` attribute)")
    return size


def effective_batch(trainer: pl.Trainer, per_device: int) -> tuple[int, str]:
    """Images per optimizer step over all processes, and the product spelled out for the log."""
    devices, nodes, accumulation = trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches
    total = devices * nodes * per_device * accumulation
    text = (f"{devices} devices x {nodes} nodes x {per_device} per-device batch x {accumulation} accumulation "
            f"= {total}")
    return total, text


class EffectiveBatch(Callback):
    """Log the effective batch when training starts and keep the learning rates consistent with it.

    The experiment configs state the batch their learning rates were tuned for (16 in the published recipes:
    8 GPUs x 2 images). When the run's effective batch ``N`` differs, every parameter group's learning rate
    (and the scheduler's base rates) is multiplied by :func:`lr_factor` (``linear``: ``N / expected``, the
    Goyal et al. rule) and the old and new rates are logged; ``lr_rule='none'`` only warns.

    The batch the current learning rates correspond to is saved in checkpoints: a run resumed with the same
    effective batch keeps the checkpoint's rates untouched; one resumed on a different number of devices
    rescales them from the checkpoint's batch to the new one.

    Args:
        expected: the batch the configured learning rates are meant for; None only logs the effective batch.
        lr_rule: how to rescale when the effective batch differs: ``linear``, ``sqrt`` or ``none``.
    """

    def __init__(self, expected: int | None = None, lr_rule: LRRule = "linear") -> None:
        if expected is not None and expected < 1:
            raise ValueError(f"EffectiveBatch: expected must be a positive batch size or null, got {expected}")
        if lr_rule not in get_args(LRRule):
            raise ValueError(f"EffectiveBatch: unknown lr_rule {lr_rule!r}; valid options: "
                             f"{', '.join(get_args(LRRule))}")
        self.expected = expected
        self.lr_rule = lr_rule
        self.effective_batch: int | None = None
        self.lr_changes: list[tuple[float, float]] = []  # (old, new) per parameter group, empty if unchanged
        self._lr_batch: int | None = None  # batch the optimizer's rates correspond to, from a checkpoint
        self._active = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._lr_batch = None  # a fresh fit; a checkpoint being resumed sets it again in on_load_checkpoint
        twins = [cb for cb in trainer.callbacks if isinstance(cb, EffectiveBatch)]
        settings = sorted({(cb.expected, cb.lr_rule) for cb in twins}, key=str)
        if len(settings) > 1:
            raise ValueError(f"{len(twins)} EffectiveBatch callbacks with different settings (expected, lr_rule) "
                             f"{settings}: configure one (the CLI's `effective_batch:` section)")
        self._active = twins[0] is self  # the same callback configured twice acts once

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # runs after the checkpoint's optimizer and scheduler states are restored, before the first step
        if not self._active:
            return
        total, text = effective_batch(trainer, _per_device_batch(trainer))
        self.effective_batch = total
        self.lr_changes = []
        rank_zero_info(f"effective batch: {text}")
        reference = self._lr_batch if self._lr_batch is not None else self.expected
        if reference is None:
            return
        self._lr_batch = reference
        source = "the checkpoint's" if reference != self.expected else "the stated"
        if total == reference:
            rank_zero_info(f"effective batch {total} equals {source} batch: learning rates unchanged")
            return
        if self.lr_rule == "none":
            rank_zero_warn(f"effective batch {total} differs from {source} batch {reference}; learning rates "
                           "left unchanged (lr_rule='none')")
            return
        factor = lr_factor(total, reference, self.lr_rule)
        self.lr_changes = scale_learning_rates(trainer, factor)
        self._lr_batch = total
        rates = ", ".join(f"{old:.4g} -> {new:.4g}" for old, new in self.lr_changes)
        rank_zero_info(f"effective batch {total} differs from {source} batch {reference}: learning rates x "
                       f"{factor:.4g} ({self.lr_rule} rule): {rates}")

    # Kept under a checkpoint key of its own rather than as callback state, so that the same callback
    # configured twice (a config's list and the CLI's section) does not clash in Lightning's state keys.
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._active:
            checkpoint[CHECKPOINT_KEY] = {"lr_batch": self._lr_batch, "effective_batch": self.effective_batch}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._lr_batch = checkpoint.get(CHECKPOINT_KEY, {}).get("lr_batch")
