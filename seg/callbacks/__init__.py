"""Lightning callbacks, one per file; configs name them by their file (``seg.callbacks.<file>.<Class>``)."""

from seg.callbacks.effective_batch import EffectiveBatch
from seg.callbacks.lr_monitor import LearningRateMonitor
from seg.callbacks.non_finite import NonFiniteError, NonFiniteGuard
from seg.callbacks.prediction_writer import SegmentationWriter
from seg.callbacks.report import SegmentationReport
from seg.callbacks.seed_each_epoch import SeedEachEpoch
from seg.callbacks.sync_batchnorm import SyncBatchNormCheck

__all__ = [
    "EffectiveBatch",
    "LearningRateMonitor",
    "NonFiniteError",
    "NonFiniteGuard",
    "SeedEachEpoch",
    "SegmentationReport",
    "SegmentationWriter",
    "SyncBatchNormCheck",
]
