"""The prediction writer callback: a label PNG and a colour overlay with a legend for every predicted image
(layout and drawing: :mod:`seg.serve.writers`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from PIL import Image
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from seg.data.safety import check_output_location
from seg.data.spec import UINT8_MAX, make_palette
from seg.serve.writers import JPEG_QUALITY, label_image, make_overlay, output_paths

__all__ = ["SegmentationWriter"]


class SegmentationWriter(BasePredictionWriter):
    """Write a label PNG and a colour overlay per predicted image (see the module docstring for the layout).

    Expects ``predict_step`` outputs ``{"labels": (B, H0, W0) class indices at the original size}`` for batches
    holding ``path`` (relative to the prediction root) and ``photo`` (uint8 (B, H0, W0, 3)), as the data module's
    prediction batches do. Class names and colours: ``pl_module.spec`` (else ``pl_module.class_names`` with
    ``make_palette``).

    Args:
        output_dir: folder receiving the files (created if missing).
        overlay: also write ``<stem>_overlay.jpg``.
        alpha: weight of the class colours in the overlay.
        id_offset: added to class indices in the label PNG (1: class k saved as k + 1, 0 left for "unlabelled",
            the ADE20K convention; 0: class k saved as k, Cityscapes' trainIds). None: the spec's raw-label
            convention, 1 when it reduces the zero label (ADE20K, the demo), else 0 (Cityscapes).
        legend: draw the legend band below the overlay (the overlay is then taller than the input).
    """

    def __init__(
        self,
        output_dir: str,
        overlay: bool = True,
        alpha: float = 0.5,
        id_offset: int | None = None,
        legend: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if id_offset is not None and not 0 <= id_offset <= UINT8_MAX:
            raise ValueError(f"id_offset must be in [0, {UINT8_MAX}], got {id_offset}")
        self.output_dir = Path(output_dir)
        self.overlay = overlay
        self.alpha = alpha
        self.id_offset = id_offset
        self.legend = legend
        self._offset = 1  # the offset of the current run (id_offset, or the spec's convention)
        self._class_names: list[str] = []
        self._palette = np.zeros((0, 3), dtype=np.uint8)
        self.written = 0  # images whose files were written in this process

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        spec = getattr(pl_module, "spec", None)
        names = list(spec.class_names) if spec is not None else getattr(pl_module, "class_names", None)
        if not names:
            raise AttributeError(f"{type(pl_module).__name__} has no `spec` or `class_names`; SegmentationWriter "
                                 "needs them")
        offset = self.id_offset if self.id_offset is not None else int(getattr(spec, "reduce_zero_label", True))
        if len(names) - 1 + offset > UINT8_MAX:
            raise ValueError(f"{len(names)} classes with id_offset={offset} do not fit a uint8 label PNG")
        self._offset = offset
        self._class_names = list(names)
        self._palette = spec.palette_array if spec is not None else make_palette(len(names))
        self.written = 0
        self._check_outputs(trainer)

    def _check_outputs(self, trainer: pl.Trainer) -> None:
        """Refuse, before anything is written, an output folder that is, holds or lies inside the input folder,
        and any output file equal to an input (:func:`seg.data.safety.check_output_location`)."""
        loaders = trainer.predict_dataloaders
        for loader in loaders if isinstance(loaders, list | tuple) else [loaders] if loaders is not None else []:
            dataset = getattr(loader.dataset, "dataset", loader.dataset)  # a skipping wrapper holds the folder
            files, base = getattr(dataset, "files", []), getattr(dataset, "base", None)
            if base is None:
                continue
            relative = [Path(f).relative_to(base).as_posix() for f in files if Path(f).is_relative_to(base)]
            outputs = [path for rel in relative for path in output_paths(self.output_dir, rel)]
            root = getattr(trainer.datamodule, "predict_root", None) or base
            check_output_location(self.output_dir, root, outputs, files)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        skipped = getattr(trainer.datamodule, "skipped_samples", {}).get("predict", [])
        rank_zero_info(f"predictions of {self.written} images written to {self.output_dir}; "
                       f"{len(skipped)} unreadable images skipped (named in the warnings above)")

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        labels: Tensor = prediction["labels"]  # (B, H0, W0)
        photos: Tensor = batch["photo"]  # (B, H0, W0, 3) uint8
        for label_map, photo, relative in zip(labels, photos, batch["path"], strict=True):
            self.write_one(label_map.cpu().numpy(), relative, photo.cpu().numpy())

    def write_one(self, labels: np.ndarray, relative_path: str, image: np.ndarray | None = None
                  ) -> tuple[Path, Path | None]:
        """Write the files of one image from its (H0, W0) class-index map and its uint8 (H0, W0, 3) photo (needed
        for the overlay); returns the paths written."""
        label_path, overlay_path = output_paths(self.output_dir, relative_path)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        label_image(labels, self._offset, relative_path).save(label_path)
        if not self.overlay:
            self.written += 1
            return label_path, None
        if image is None or image.shape[:2] != labels.shape:
            got = "no photo" if image is None else f"a {image.shape[1]}x{image.shape[0]} (WxH) photo"
            raise ValueError(f"{relative_path}: the overlay needs the photo at the prediction's size "
                             f"{labels.shape[1]}x{labels.shape[0]}, got {got}")
        picture = make_overlay(image, labels, self._class_names, self._palette, self.alpha, self.legend)
        Image.fromarray(picture).save(overlay_path, quality=JPEG_QUALITY)
        self.written += 1
        return label_path, overlay_path
