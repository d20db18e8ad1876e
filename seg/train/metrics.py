"""Semantic segmentation metrics with the mmsegmentation definitions (its ``IoUMetric``).

Everything is derived from one dataset-level confusion matrix ``M`` (rows = label, columns = prediction),
summed over all images and, under DDP, over all processes:

- intersection ``I_c = M[c, c]``, label area ``L_c = sum_j M[c, j]``, prediction area ``P_c = sum_i M[i, c]``;
- ``IoU_c = I_c / (P_c + L_c - I_c)`` and ``Acc_c = I_c / L_c``, NaN where the denominator is 0;
- ``mIoU`` and ``mAcc`` are means over the non-NaN classes; ``aAcc = sum_c I_c / sum_c L_c``.

Pixels labelled ``ignore_index`` are dropped before counting. All scores are fractions in [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from seg.data.spec import IGNORE_INDEX

__all__ = ["SegmentationMetric", "confusion_matrix", "scores_from_confusion"]


def _class_map(preds: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Turn logits (B, K, H, W) into a class-index map (B, H, W); pass class-index maps through."""
    if preds.ndim == target.ndim + 1:
        if preds.shape[1] != num_classes:
            raise ValueError(f"logits have {preds.shape[1]} channels, expected num_classes={num_classes}")
        preds = preds.argmax(dim=1)  # (B, K, H, W) -> (B, H, W)
    elif preds.is_floating_point():
        raise TypeError("class-index predictions must be an integer tensor (or pass logits with a class dim)")
    if preds.shape != target.shape:
        raise ValueError(f"predictions {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
    return preds


def confusion_matrix(preds: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Confusion matrix of one batch, counted with a single ``torch.bincount``.

    Args:
        preds: class indices (B, H, W) or logits (B, K, H, W), arg-maxed over K.
        target: integer labels (B, H, W); ``ignore_index`` pixels are dropped.
        num_classes: number of classes K.
        ignore_index: label value that marks unlabelled pixels.

    Returns:
        int64 (K, K) pixel counts, rows = label, columns = prediction.

    Raises:
        ValueError: on target values outside [0, K) other than ``ignore_index``, on predicted indices outside
            [0, K) at labelled pixels, or on mismatched shapes.
    """
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor, got {target.dtype}")
    preds = _class_map(preds, target, num_classes)
    if target.numel() == 0:
        return torch.zeros(num_classes, num_classes, dtype=torch.int64, device=target.device)
    target = target.long()
    unlabelled = target == ignore_index
    label = target.masked_fill(unlabelled, 0)  # ignored pixels are counted in an extra bin below
    low, high = torch.aminmax(label)
    if low < 0 or high >= num_classes:
        bad = torch.unique(label[(label < 0) | (label >= num_classes)]).tolist()
        raise ValueError(
            f"target values {bad} are outside [0, {num_classes}) and are not ignore_index={ignore_index}"
        )
    pred = preds.long().masked_fill(unlabelled, 0)
    low, high = torch.aminmax(pred)
    if low < 0 or high >= num_classes:
        bad = torch.unique(pred[(pred < 0) | (pred >= num_classes)]).tolist()
        raise ValueError(f"predicted class indices {bad} are outside [0, {num_classes})")
    bins = num_classes * num_classes
    index = (label * num_classes + pred).masked_fill_(unlabelled, bins)
    counts = torch.bincount(index.flatten(), minlength=bins + 1)[:bins]  # last bin: ignored pixels
    return counts.reshape(num_classes, num_classes)  # (K*K,) -> (K label, K prediction)


def scores_from_confusion(confmat: Tensor) -> dict[str, Tensor]:
    """mmseg scores from a dataset-level confusion matrix (rows = label, columns = prediction).

    Returns:
        ``mIoU``, ``mAcc``, ``aAcc``: float64 0-dim fractions (NaN when nothing was labelled);
        ``IoU``, ``Acc``: float64 (K,) per-class fractions, NaN where the union (IoU) or the label area (Acc)
        is 0; ``confusion_matrix``: the int64 (K, K) input.
    """
    counts = confmat.to(torch.float64)
    intersection = counts.diagonal()
    label_area = counts.sum(dim=1)
    pred_area = counts.sum(dim=0)
    union = pred_area + label_area - intersection
    nan = torch.full_like(intersection, float("nan"))
    iou = torch.where(union > 0, intersection / union.clamp_min(1), nan)
    acc = torch.where(label_area > 0, intersection / label_area.clamp_min(1), nan)
    total = label_area.sum()
    a_acc = intersection.sum() / total if total > 0 else total.new_tensor(float("nan"))
    return {
        "mIoU": iou.nanmean(),
        "mAcc": acc.nanmean(),
        "aAcc": a_acc,
        "IoU": iou,
        "Acc": acc,
        "confusion_matrix": confmat.to(torch.int64),
    }


class SegmentationMetric(Metric):
    """mIoU, mAcc, aAcc and per-class IoU / Acc over a whole data set (mmseg definitions).

    The state is one int64 (K, K) confusion matrix summed across updates and processes, so the result does not
    depend on how images are split into batches or ranks.

    Args:
        num_classes: number of classes K.
        ignore_index: label value of unlabelled pixels, dropped before counting.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    confmat: Tensor

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state(
            "confmat",
            default=torch.zeros(num_classes, num_classes, dtype=torch.int64),
            dist_reduce_fx="sum",
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            preds: class indices (B, H, W) or logits (B, K, H, W).
            target: integer labels (B, H, W), ``ignore_index`` for unlabelled pixels.
        """
        self.confmat += confusion_matrix(preds.detach(), target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, Tensor]:
        """Scores of everything seen since the last reset; see :func:`scores_from_confusion`."""
        return scores_from_confusion(self.confmat)
