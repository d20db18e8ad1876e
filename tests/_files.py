"""Small files the data tests write: an ADE20K-layout image / label pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_pair(root: Path, split: str, stem: str, label: np.ndarray, image_hw: tuple[int, int] | None = None) -> tuple[
    Path, Path
]:
    """A random JPEG (size of the label, or ``image_hw``) and a mode-L label PNG."""
    h, w = image_hw or label.shape
    image = root / "images" / split / f"{stem}.jpg"
    label_path = root / "annotations" / split / f"{stem}.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(stem)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image, quality=90)
    Image.fromarray(label.astype(np.uint8), mode="L").save(label_path)
    return image, label_path
