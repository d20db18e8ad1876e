"""Lightning callbacks, one per file; configs name them by their file (``seg.train.callbacks.<file>.<Class>``)."""

from seg.train.callbacks.effective_batch import EffectiveBatch
from seg.train.callbacks.lr_monitor import LearningRateMonitor
from seg.train.callbacks.non_finite import NonFiniteError, NonFiniteGuard
from seg.train.callbacks.prediction_writer import SegmentationWriter
from seg.train.callbacks.report import SegmentationReport
from seg.train.callbacks.seed_each_epoch import SeedEachEpoch
from seg.train.callbacks.sync_batchnorm import SyncBatchNormCheck

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
