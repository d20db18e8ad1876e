"""Prediction files: a label PNG and a colour overlay with a legend for every predicted image.

For an input ``<predict_root>/<sub/folders>/<stem>.<ext>`` the writer produces::

    <output_dir>/<sub/folders>/<stem>.png           uint8 label map at the input's size, class k stored as
                                                    k + id_offset (ADE20K ids with the default offset 1)
    <output_dir>/<sub/folders>/<stem>_overlay.jpg   the input blended with the class colours, with a legend of
                                                    the classes present drawn in a white band below the image

The input is re-read from disk (EXIF orientation applied, as the data module reads it), so the overlay shows
the original pixels, not the normalised network input. Under DDP every process writes the images of its own
batches; the prediction sampler does not repeat images, so nothing is written twice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from PIL import Image, ImageDraw, ImageFont
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from seg.data.ade20k import make_palette, read_rgb
from seg.safety import check_output_location

__all__ = [
    "SegmentationWriter",
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
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


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
    band = Image.new("RGB", (width, pad * 2 + line * (row + 1) - gap), (255, 255, 255))
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
        palette: uint8 (K, 3); default ``make_palette(K)`` (the ADE20K palette for K = 150).
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
        name: what the labels belong to, for the error raised when an id does not fit in 0..255.
    """
    ids = labels.astype(np.int64) + id_offset
    if ids.min() < 0 or ids.max() > 255:
        raise ValueError(f"labels of {name} span {ids.min()}..{ids.max()} after id_offset; a uint8 PNG holds 0..255")
    return Image.fromarray(ids.astype(np.uint8), mode="L")


def output_paths(output_dir: str | os.PathLike[str], relative_path: str) -> tuple[Path, Path]:
    """Label PNG and overlay JPG paths of one input, keeping its sub-folders."""
    relative = Path(relative_path)
    folder = Path(output_dir) / relative.parent
    return folder / f"{relative.stem}.png", folder / f"{relative.stem}_overlay.jpg"


class SegmentationWriter(BasePredictionWriter):
    """Write a label PNG and a colour overlay per predicted image (see the module docstring for the layout).

    Expects ``predict_step`` outputs ``{"labels": (B, H0, W0) class indices at the original size,
    "path": [path relative to the prediction root]}``.

    Args:
        output_dir: folder receiving the files (created if missing).
        overlay: also write ``<stem>_overlay.jpg``.
        alpha: weight of the class colours in the overlay.
        id_offset: added to class indices in the label PNG (1: class k saved as k + 1, 0 left for "unlabelled",
            the ADE20K convention).
        legend: draw the legend band below the overlay (the overlay is then taller than the input).
        input_root: folder the relative paths start from; default: the prediction data set's ``base``
            (:class:`~seg.data.ImageFolder`), else the data module's ``predict_root``.
    """

    def __init__(
        self,
        output_dir: str,
        overlay: bool = True,
        alpha: float = 0.5,
        id_offset: int = 1,
        legend: bool = True,
        input_root: str | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not 0 <= id_offset <= 255:
            raise ValueError(f"id_offset must be in [0, 255], got {id_offset}")
        self.output_dir = Path(output_dir)
        self.overlay = overlay
        self.alpha = alpha
        self.id_offset = id_offset
        self.legend = legend
        self.input_root = Path(input_root) if input_root else None
        self._base: Path | None = None
        self._class_names: list[str] = []
        self._palette = np.zeros((0, 3), dtype=np.uint8)
        self.written = 0  # images whose files were written in this process

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = getattr(pl_module, "class_names", None)
        if not names:
            raise AttributeError(f"{type(pl_module).__name__} has no `class_names`; SegmentationWriter needs them")
        if len(names) - 1 + self.id_offset > 255:
            raise ValueError(f"{len(names)} classes with id_offset={self.id_offset} do not fit a uint8 label PNG")
        self._class_names = list(names)
        self.written = 0
        self._palette = make_palette(len(names))
        self._base = self.input_root or self._find_base(trainer)
        root = getattr(trainer.datamodule, "predict_root", None) or self._base
        for loader in _as_list(trainer.predict_dataloaders):
            files = getattr(loader.dataset, "files", None) or getattr(getattr(loader.dataset, "dataset", None),
                                                                       "files", [])
            _check_unique_outputs(files, self._base)
            relative = [Path(f).relative_to(self._base).as_posix() for f in files if Path(f).is_relative_to(self._base)]
            outputs = [path for rel in relative for path in output_paths(self.output_dir, rel)]
            check_output_location(self.output_dir, root, outputs, files)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        skipped = getattr(trainer.datamodule, "skipped_samples", {}).get("predict", [])
        rank_zero_info(f"predictions of {self.written} images written to {self.output_dir}; "
                       f"{len(skipped)} unreadable images skipped (named in the warnings above)")

    @staticmethod
    def _find_base(trainer: pl.Trainer) -> Path:
        for loader in _as_list(trainer.predict_dataloaders):
            base = getattr(loader.dataset, "base", None)
            if base is not None:
                return Path(base)
        root = getattr(trainer.datamodule, "predict_root", None)
        if root:
            return Path(root).parent if Path(root).is_file() else Path(root)
        raise ValueError("SegmentationWriter cannot tell where the predicted images are: pass `input_root`")

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        labels: Tensor = prediction["labels"]  # (B, H0, W0)
        for label_map, relative in zip(labels, prediction["path"], strict=True):
            self.write_one(label_map.cpu().numpy(), relative)

    def write_one(self, labels: np.ndarray, relative_path: str) -> tuple[Path, Path | None]:
        """Write the files of one image from its (H0, W0) class-index map; returns the paths written."""
        label_path, overlay_path = output_paths(self.output_dir, relative_path)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        label_image(labels, self.id_offset, relative_path).save(label_path)
        if not self.overlay:
            self.written += 1
            return label_path, None
        source = (self._base or Path(".")) / relative_path
        image = read_rgb(source, exif_transpose=True)
        if image.shape[:2] != labels.shape:
            raise ValueError(f"image {source} is {image.shape[1]}x{image.shape[0]} (WxH) but its prediction is "
                             f"{labels.shape[1]}x{labels.shape[0]}; did the file change during prediction?")
        picture = make_overlay(image, labels, self._class_names, self._palette, self.alpha, self.legend)
        Image.fromarray(picture).save(overlay_path, quality=JPEG_QUALITY)
        self.written += 1
        return label_path, overlay_path


def _as_list(loaders: Any) -> list[Any]:
    if loaders is None:
        return []
    return list(loaders) if isinstance(loaders, list | tuple) else [loaders]


def _check_unique_outputs(files: Sequence[Path], base: Path) -> None:
    """Raise when two inputs (e.g. ``a.jpg`` and ``a.png``) would write the same output files."""
    seen: dict[Path, Path] = {}
    for path in files:
        key = Path(path).relative_to(base).with_suffix("") if Path(path).is_relative_to(base) else None
        if key is None:
            continue
        if key in seen:
            raise ValueError(f"{seen[key]} and {path} would both be written as {key}.png: rename one of them")
        seen[key] = Path(path)
