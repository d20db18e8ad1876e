"""Training and evaluation: the LightningModule, the CLI, callbacks, schedules, metrics and reports."""

from seg.train.task import SegmentationTask

__all__ = ["SegmentationTask"]
