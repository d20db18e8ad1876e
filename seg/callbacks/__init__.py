"""Lightning callbacks of the runs, one per file (named by class path in seg/trainer_defaults.yaml and configs)."""

from seg.callbacks.lr_monitor import LearningRateMonitor

__all__ = ["LearningRateMonitor"]
