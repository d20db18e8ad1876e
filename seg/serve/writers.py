"""Prediction files: a label PNG and a colour overlay with a legend for every predicted image.

For an input ``<predict_root>/<sub/folders>/<stem>.<ext>`` the writer
(:class:`~seg.train.callbacks.prediction_writer.SegmentationWriter`) produces::

    <output_dir>/<sub/folders>/<stem>.png           uint8 label map at the input's size, class k stored as
                                                    k + id_offset (ADE20K ids with offset 1, Cityscapes
                                                    trainIds with 0: the writer's default follows the spec)
    <output_dir>/<sub/folders>/<stem>_overlay.jpg   the input blended with the class colours, with a legend of
                                                    the classes present drawn in a white band below the image

Prediction batches carry the decoded photo (``photo``: uint8 (B, H0, W0, 3), EXIF orientation applied) beside the
network input, so the overlay shows the original pixels without decoding the file a second time. Class names and
colours come from the task's data set spec. Under DDP every process writes the images of its own batches; the
prediction sampler does not repeat images, so nothing is written twice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from seg.data.spec import UINT8_MAX, make_palette

__all__ = [
    "blend_labels",
    "classes_by_area",
    "draw_legend",
    "label_image",
    "make_overlay",
    "output_paths",
]

JPEG_QUALITY = 90


def blend_labels(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours into an image.

    Args:
        image: uint8 (H, W, 3) RGB.
        labels: integer (H, W) class indices in [0, len(palette)).
        palette: uint8 (K, 3) RGB colour per class.
        alpha: weight of the class colour (0: image only, 1: colours only).

    Returns:
        uint8 (H, W, 3).
    """
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    colours = palette[labels].astype(np.float32)  # (H, W) -> (H, W, 3)
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(mixed + 0.5, 0, UINT8_MAX).astype(np.uint8)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font at ``size`` pixels (its small bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, max_width: float) -> str:
    """``text``, shortened with an ellipsis until it is at most ``max_width`` pixels wide."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..."


def draw_legend(
    width: int,
    class_ids: Sequence[int],
    class_names: Sequence[str],
    palette: np.ndarray,
    font_size: int | None = None,
) -> np.ndarray:
    """A white band listing classes as colour swatch + name, flowing left to right and wrapping.

    Args:
        width: band width in pixels (the image width).
        class_ids: classes to list, in order.
        class_names: name of every class (indexed by class id).
        palette: uint8 (K, 3) colours.
        font_size: text height in pixels; default scales with ``width`` (12-28 px).

    Returns:
        uint8 (h, width, 3); h is 0 when ``class_ids`` is empty.
    """
    if not class_ids:
        return np.zeros((0, width, 3), dtype=np.uint8)
    size = font_size or int(np.clip(round(width / 45), 12, 28))
    font = _font(size)
    pad, gap = max(size // 2, 3), max(size // 3, 2)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    max_text = max(width - 2 * pad - size - gap, size)
    items, x, row = [], pad, 0  # (column x, row, class id, text)
    for cid in class_ids:
        text = _fit_text(measure, str(class_names[cid]), font, max_text)
        item_width = size + gap + int(np.ceil(measure.textlength(text, font=font)))
        if x > pad and x + item_width > width - pad:  # wrap onto a new row
            x, row = pad, row + 1
        items.append((x, row, cid, text))
        x += item_width + 2 * size
    line = size + gap
    band = Image.new("RGB", (width, pad * 2 + line * (row + 1) - gap), "white")
    draw = ImageDraw.Draw(band)
    for x, r, cid, text in items:
        y = pad + r * line
        draw.rectangle((x, y, x + size - 1, y + size - 1), fill=tuple(int(c) for c in palette[cid]), outline=(0, 0, 0))
        draw.text((x + size + gap, y + size / 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return np.asarray(band)


def make_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    palette: np.ndarray | None = None,
    alpha: float = 0.5,
    legend: bool = True,
) -> np.ndarray:
    """The image blended with its class colours, with a legend of the classes present (largest area first) below.

    Args:
        image: uint8 (H, W, 3) RGB.
        labels: integer (H, W) class indices.
        class_names: one name per class (K).
        palette: uint8 (K, 3); default ``make_palette(K)`` (the palette of the built-in specs).
        alpha: weight of the class colours.
        legend: add the legend band.

    Returns:
        uint8 (H + h, W, 3): the overlay on top, the legend band of height h (0 without legend) below.
    """
    palette = make_palette(len(class_names)) if palette is None else palette
    blended = blend_labels(image, labels, palette, alpha)
    if not legend:
        return blended
    present = classes_by_area(labels, len(class_names))
    return np.concatenate([blended, draw_legend(image.shape[1], present, class_names, palette)], axis=0)


def classes_by_area(labels: np.ndarray, num_classes: int) -> list[int]:
    """The classes present in an integer (H, W) label map, largest area first (ties: lower id first)."""
    areas = np.bincount(labels.ravel(), minlength=num_classes)
    return [int(c) for c in np.argsort(-areas, kind="stable") if areas[c] > 0]


def label_image(labels: np.ndarray, id_offset: int = 1, name: str = "the prediction") -> Image.Image:
    """A label map as a uint8 grey image (mode L), class k stored as k + ``id_offset``.

    Args:
        labels: integer (H, W) class indices.
        id_offset: added to every index (1: ADE20K ids, 0 left for "unlabelled").
        name: what the labels belong to, for the error raised when an id does not fit in 8 bits.
    """
    ids = labels.astype(np.int64) + id_offset
    if ids.min() < 0 or ids.max() > UINT8_MAX:
        raise ValueError(f"labels of {name} span {ids.min()}..{ids.max()} after id_offset; a uint8 PNG holds "
                         f"0..{UINT8_MAX}")
    return Image.fromarray(ids.astype(np.uint8), mode="L")


def output_paths(output_dir: str | os.PathLike[str], relative_path: str) -> tuple[Path, Path]:
    """Label PNG and overlay JPG paths of one input, keeping its sub-folders."""
    relative = Path(relative_path)
    folder = Path(output_dir) / relative.parent
    return folder / f"{relative.stem}.png", folder / f"{relative.stem}_overlay.jpg"
