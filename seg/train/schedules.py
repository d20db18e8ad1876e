"""Step-based learning-rate schedules of the segmentation recipes (linear warm-up, then poly decay)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupPolyLR"]


class WarmupPolyLR(LRScheduler):
    """Poly decay ``lr = (base - min_lr) * (1 - t / max_steps) ** power + min_lr`` after a linear warm-up.

    The warm-up follows mmseg's ``linear`` rule: during the first ``warmup_steps`` optimizer steps the
    poly learning rate is multiplied by ``1 - (1 - t / warmup_steps) * (1 - warmup_ratio)``, rising from
    ``warmup_ratio`` x to 1 x. Stepped once per optimizer step (``interval: step``).

    Args:
        optimizer: the wrapped optimizer.
        max_steps: total optimizer steps; None takes the trainer's ``max_steps`` / estimated steps
            (set by the LightningModule before the first step).
        power: poly exponent (0.9 for the Semantic FPN recipe, 1.0 for UperNet).
        warmup_steps: length of the linear warm-up in steps (0: none; 1500 for UperNet).
        warmup_ratio: starting fraction of the learning rate during warm-up.
        min_lr: floor reached at ``max_steps``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_steps: int | None = None,
        power: float = 1.0,
        warmup_steps: int = 0,
        warmup_ratio: float = 1e-6,
        min_lr: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        self.max_steps = max_steps
        self.power = power
        self.warmup_steps = warmup_steps
        self.warmup_ratio = warmup_ratio
        self.min_lr = min_lr
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int, base_lr: float) -> float:
        """The learning rate at optimizer step ``step`` for a group whose base rate is ``base_lr``."""
        total = self.max_steps or 1
        progress = min(step, total) / total
        lr = (base_lr - self.min_lr) * (1 - progress) ** self.power + self.min_lr
        if step < self.warmup_steps:
            lr *= 1 - (1 - step / self.warmup_steps) * (1 - self.warmup_ratio)
        return lr

    def get_lr(self) -> list[float]:
        return [self.factor(self.last_epoch, base) for base in self.base_lrs]
