"""Cityscapes: labelIds -> trainIds conversion and the file naming.

The official ``gtFine`` maps store *labelIds* (0..33, one per annotated category, most of them not evaluated).
Training and evaluation use *trainIds*: the 19 evaluated classes as 0..18 and the ignore label for the rest.
The label definition (:data:`~seg.data.spec.CITYSCAPES_LABELS`) is the one table of it in the project, beside
the other data-set facts in :mod:`seg.data.spec`; the spec, this converter and the tests all read it. Layout of
a prepared folder::

    root/leftImg8bit/{train,val,test}/<city>/<stem>_leftImg8bit.png
    root/gtFine/{train,val,test}/<city>/<stem>_gtFine_labelIds.png        (official, labelIds)
    root/gtFine/{train,val,test}/<city>/<stem>_gtFine_labelTrainIds.png   (written by prepare, trainIds)
"""

from __future__ import annotations

import cv2
import numpy as np

from seg.data.spec import CITYSCAPES, CITYSCAPES_LABELS

__all__ = [
    "EXPECTED_FRAMES",
    "IMAGE_SUFFIX",
    "LABEL_ID_SUFFIX",
    "TRAIN_ID_SUFFIX",
    "label_id_to_train_id",
    "to_train_ids",
]

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_ID_SUFFIX = "_gtFine_labelIds.png"
TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
EXPECTED_FRAMES: dict[str, int] = {"train": 2975, "val": 500}  # finely annotated frames with public labels


def label_id_to_train_id() -> np.ndarray:
    """The lookup table of the label definition: uint8 (256,), labelId -> trainId; ids outside the table -> the
    ignore label."""
    lut = np.full(256, CITYSCAPES.ignore_index, dtype=np.uint8)
    for label in CITYSCAPES_LABELS:
        lut[label.label_id] = label.train_id
    return lut


_LUT = label_id_to_train_id()


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Convert a labelIds map, uint8 (H, W), to trainIds, uint8 (H, W)."""
    if label_ids.dtype != np.uint8 or label_ids.ndim != 2:
        raise ValueError(f"a labelIds map is uint8 (H, W), got {label_ids.dtype} {tuple(label_ids.shape)}")
    return cv2.LUT(label_ids, _LUT)
