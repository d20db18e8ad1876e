"""Training health: stop (or skip) on a non-finite loss, and never save a checkpoint with non-finite weights.

A NaN or infinite training loss usually means a too high learning rate, fp16 overflow or a bad sample. Left
alone, one such step turns every weight into NaN, and the next checkpoint (``last.ckpt``) overwrites the
last good one: hours of training are lost. :class:`NonFiniteGuard` checks the loss of every step before
the backward pass and the weights of every checkpoint before it is written.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

__all__ = ["NonFiniteError", "NonFiniteGuard", "last_good_checkpoint"]


class NonFiniteError(RuntimeError):
    """A non-finite training loss (with ``action='stop'``), or non-finite weights about to be saved."""


def last_good_checkpoint(trainer: pl.Trainer) -> str | None:
    """The newest checkpoint file written by the trainer's checkpoint callbacks, or None."""
    paths = []
    for callback in trainer.checkpoint_callbacks:
        for attr in ("last_model_path", "best_model_path"):
            path = getattr(callback, attr, "")
            if path and os.path.isfile(path):
                paths.append(path)
    return max(paths, key=os.path.getmtime) if paths else None


def _non_finite_entries(state_dict: dict[str, Any], limit: int = 5) -> list[str]:
    """Names of floating-point tensors in ``state_dict`` holding NaN or inf (at most ``limit``)."""
    names = []
    for name, value in state_dict.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            names.append(name)
            if len(names) == limit:
                break
    return names


class NonFiniteGuard(pl.Callback):
    """Stop or skip on a non-finite training loss; refuse to save a checkpoint whose weights are not finite.

    The loss is checked before every backward pass (one device sync per step; under DDP the decision is
    shared by all processes, since gradients are averaged over them). With ``action='stop'`` the run ends
    with :class:`NonFiniteError` naming the global step and the newest checkpoint, to resume from with a
    lower learning rate. With ``action='skip'`` the optimizer step is skipped (all gradients dropped: no
    update, no optimizer state change; the learning-rate schedule moves on), a warning names the step and
    the running count is logged as ``train/skipped_steps``; more than ``max_consecutive_skips`` skipped steps
    in a row stop the run as above. A checkpoint whose state dict holds a NaN or inf is never written
    (:class:`NonFiniteError`), so the previous ``last.ckpt`` stays intact.

    Args:
        action: ``'stop'`` the run or ``'skip'`` the optimizer step.
        max_consecutive_skips: with ``'skip'``, stop after this many skipped steps in a row.
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_consecutive_skips: int = 100) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"action must be 'stop' or 'skip', got {action!r}")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        self._consecutive = 0
        self._pending_skip = False

    def _stop_message(self, trainer: pl.Trainer, what: str) -> str:
        checkpoint = last_good_checkpoint(trainer)
        resume = (f"the last good checkpoint is {checkpoint} (resume with --ckpt_path {checkpoint}, e.g. with a "
                  "lower learning rate)") if checkpoint else "no checkpoint has been saved yet"
        return f"{what} at global step {trainer.global_step} (epoch {trainer.current_epoch}); {resume}"

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):  # any process -> all processes
            return
        value = loss.detach().float().cpu()
        if self.action == "stop":
            raise NonFiniteError(self._stop_message(trainer, f"non-finite training loss {value.tolist()}"))
        self._pending_skip = True

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._pending_skip:
            self._consecutive = 0
            return
        self._pending_skip = False
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None  # optimizers leave parameters without a gradient untouched
        self.skipped_steps += 1
        self._consecutive += 1
        if self._consecutive > self.max_consecutive_skips:
            raise NonFiniteError(self._stop_message(
                trainer, f"{self._consecutive} optimizer steps in a row had a non-finite training loss"))
        rank_zero_warn(f"non-finite training loss at global step {trainer.global_step}: optimizer step skipped "
                       f"({self.skipped_steps} skipped so far)")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.action == "skip":
            pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False,
                          batch_size=1)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        bad = _non_finite_entries(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteError(self._stop_message(
                trainer, f"refusing to save a checkpoint with non-finite weights ({', '.join(bad)})"))

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
