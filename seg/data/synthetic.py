"""A small synthetic segmentation data set in the ADE20K layout, for demos and end-to-end tests.

Every image is a scene of :mod:`seg.data.scenes`: a few regions of "stuff" (stripes, checkers, dots, bricks,
grass, gradients) with "things" (discs, triangles, rectangles, stars) drawn on top, classes defined by texture
or shape, never by colour. Some things carry a thin border of label 0 ("other"), which becomes the ignore
index after ``reduce_zero_label``: the ignore path is exercised.

Layout written under ``root`` (same as ``ADEChallengeData2016``)::

    images/training/demo_train_00000.jpg     annotations/training/demo_train_00000.png
    images/validation/demo_val_00000.jpg     annotations/validation/demo_val_00000.png
    class_names.txt                          .complete  (written last: JSON of the generation settings)

Label PNGs are single-channel uint8: 0 = unlabelled, class ``k`` (0-based) stored as ``k + 1``.
Generation is deterministic: the same settings give byte-identical files.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from seg.data.scenes import DEMO_CLASS_NAMES, DEMO_STUFF, DEMO_THINGS, Array, Rng, render_demo_sample

__all__ = [
    "DEMO_CLASS_NAMES",
    "DEMO_STUFF",
    "DEMO_THINGS",
    "ensure_demo_dataset",
    "is_demo_dataset_complete",
    "make_demo_dataset",
    "render_demo_sample",
]

# Bump when the rendering (seg/data/scenes.py) changes, so `ensure_demo_dataset` regenerates stale copies.
_FORMAT_VERSION = 2
_MARKER = ".complete"
_SPLITS = {"training": "demo_train", "validation": "demo_val"}
_OWN_ENTRIES = {"images", "annotations", "class_names.txt", _MARKER}
_NUM_TRAIN, _NUM_VAL, _SEED, _MIN_SIZE, _MAX_SIZE = 160, 40, 0, 160, 320

def _draw_size(rng: Rng, min_size: int, max_size: int) -> tuple[int, int]:
    """A random (height, width) in px within [min_size, max_size], never square."""
    while True:
        height, width = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        if height != width:
            return height, width


def _jpeg_bytes(image: Array, quality: int) -> bytes:
    """Encode an RGB uint8 image as baseline JPEG at the given quality (deterministic)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _write_split(folder: Path, split: str, count: int, seed: int, min_size: int, max_size: int) -> None:
    """Render ``count`` samples of one split into ``folder`` (images/ and annotations/ sub-folders)."""
    prefix = _SPLITS[split]
    image_dir, label_dir = folder / "images" / split, folder / "annotations" / split
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    split_key = list(_SPLITS).index(split)
    for index in range(count):
        # One independent stream per sample: a sample does not depend on how many others are drawn.
        rng = np.random.default_rng([seed, split_key, index])
        height, width = _draw_size(rng, min_size, max_size)
        image, label = render_demo_sample(rng, height, width, index)
        stem = f"{prefix}_{index:05d}"
        (image_dir / f"{stem}.jpg").write_bytes(_jpeg_bytes(image, int(rng.integers(70, 96))))
        Image.fromarray(label).save(label_dir / f"{stem}.png")


# ----------------------------------------------------------------------------------------------------------
# Public entry points


def _settings(num_train: int, num_val: int, seed: int, min_size: int, max_size: int) -> dict[str, int]:
    """The generation settings recorded in the completion marker."""
    return {
        "version": _FORMAT_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "seed": seed,
        "min_size": min_size,
        "max_size": max_size,
    }


def is_demo_dataset_complete(
    root: str | Path,
    num_train: int = _NUM_TRAIN,
    num_val: int = _NUM_VAL,
    seed: int = _SEED,
    min_size: int = _MIN_SIZE,
    max_size: int = _MAX_SIZE,
) -> bool:
    """Whether ``root`` holds a fully written demo set made with these settings (see `make_demo_dataset`)."""
    root = Path(root)
    try:
        recorded = json.loads((root / _MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if recorded != _settings(num_train, num_val, seed, min_size, max_size):
        return False
    for split, count in (("training", num_train), ("validation", num_val)):
        for folder, suffix in (("images", ".jpg"), ("annotations", ".png")):
            if len(list((root / folder / split).glob(f"*{suffix}"))) != count:
                return False
    return True


def make_demo_dataset(
    root: str | Path,
    num_train: int = _NUM_TRAIN,
    num_val: int = _NUM_VAL,
    seed: int = _SEED,
    min_size: int = _MIN_SIZE,
    max_size: int = _MAX_SIZE,
) -> Path:
    """Write the demo data set to ``root``, replacing an earlier demo set there.

    Files are rendered into a hidden sibling folder, marked complete, then moved into place, so an interrupted
    run never leaves a folder that looks complete.

    Args:
        root: destination folder; must be missing, empty, or an earlier demo set.
        num_train: number of training images.
        num_val: number of validation images.
        seed: random seed; the same settings give byte-identical files.
        min_size: smallest image side in px.
        max_size: largest image side in px.

    Returns:
        ``root`` as a `Path`.

    Raises:
        FileExistsError: ``root`` holds files that are not part of a demo set (nothing is deleted then).
    """
    if not 8 <= min_size < max_size:
        raise ValueError(f"need 8 <= min_size < max_size, got {min_size}, {max_size}")
    root = Path(root)
    if root.exists():
        foreign = sorted(p.name for p in root.iterdir() if p.name not in _OWN_ENTRIES)
        if foreign:
            raise FileExistsError(f"{root} is not a demo data set folder (it holds {foreign[:5]})")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        _write_split(staging, "training", num_train, seed, min_size, max_size)
        _write_split(staging, "validation", num_val, seed, min_size, max_size)
        (staging / "class_names.txt").write_text("\n".join(DEMO_CLASS_NAMES) + "\n")
        settings = _settings(num_train, num_val, seed, min_size, max_size)
        (staging / _MARKER).write_text(json.dumps(settings, sort_keys=True) + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def ensure_demo_dataset(
    root: str | Path,
    num_train: int = _NUM_TRAIN,
    num_val: int = _NUM_VAL,
    seed: int = _SEED,
    min_size: int = _MIN_SIZE,
    max_size: int = _MAX_SIZE,
) -> Path:
    """Return ``root``, generating the demo set there first unless a complete one with these settings exists.

    Arguments are those of `make_demo_dataset`. A missing, partial or differently seeded folder is
    (re)written; a complete one is left untouched.
    """
    if not is_demo_dataset_complete(root, num_train, num_val, seed, min_size, max_size):
        make_demo_dataset(root, num_train, num_val, seed, min_size, max_size)
    return Path(root)
