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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from seg.data.scenes import DEMO_CLASS_NAMES, DEMO_STUFF, DEMO_THINGS, Array, Rng, render_demo_sample

__all__ = [
    "DEMO_CLASS_NAMES",
    "DEMO_STUFF",
    "DEMO_THINGS",
    "DemoSettings",
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


@dataclass(frozen=True)
class DemoSettings:
    """What a demo set is generated from; the keyword arguments of the functions below.

    Args:
        num_train: number of training images.
        num_val: number of validation images.
        seed: random seed; the same settings give byte-identical files.
        min_size: smallest image side in px.
        max_size: largest image side in px.
    """

    num_train: int = 160
    num_val: int = 40
    seed: int = 0
    min_size: int = 160
    max_size: int = 320

    def record(self) -> dict[str, int]:
        """The settings as recorded in the completion marker."""
        return {"version": _FORMAT_VERSION, **asdict(self)}


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


def _write_split(folder: Path, split: str, count: int, settings: DemoSettings) -> None:
    """Render ``count`` samples of one split into ``folder`` (images/ and annotations/ sub-folders)."""
    prefix = _SPLITS[split]
    image_dir, label_dir = folder / "images" / split, folder / "annotations" / split
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    split_key = list(_SPLITS).index(split)
    for index in range(count):
        # One independent stream per sample: a sample does not depend on how many others are drawn.
        rng = np.random.default_rng([settings.seed, split_key, index])
        height, width = _draw_size(rng, settings.min_size, settings.max_size)
        image, label = render_demo_sample(rng, height, width, index)
        stem = f"{prefix}_{index:05d}"
        (image_dir / f"{stem}.jpg").write_bytes(_jpeg_bytes(image, int(rng.integers(70, 96))))
        Image.fromarray(label).save(label_dir / f"{stem}.png")


# ----------------------------------------------------------------------------------------------------------
# Public entry points


def is_demo_dataset_complete(root: str | Path, **settings: int) -> bool:
    """Whether ``root`` holds a fully written demo set made with these `DemoSettings` (see `make_demo_dataset`)."""
    root, wanted = Path(root), DemoSettings(**settings)
    try:
        recorded = json.loads((root / _MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if recorded != wanted.record():
        return False
    for split, count in (("training", wanted.num_train), ("validation", wanted.num_val)):
        for folder, suffix in (("images", ".jpg"), ("annotations", ".png")):
            if len(list((root / folder / split).glob(f"*{suffix}"))) != count:
                return False
    return True


def make_demo_dataset(root: str | Path, **settings: int) -> Path:
    """Write the demo data set to ``root``, replacing an earlier demo set there.

    Files are rendered into a hidden sibling folder, marked complete, then moved into place, so an interrupted
    run never leaves a folder that looks complete.

    Args:
        root: destination folder; must be missing, empty, or an earlier demo set.
        **settings: fields of `DemoSettings` (image counts, seed, side range); the rest keep their defaults.

    Returns:
        ``root`` as a `Path`.

    Raises:
        FileExistsError: ``root`` holds files that are not part of a demo set (nothing is deleted then).
    """
    chosen = DemoSettings(**settings)
    if not 8 <= chosen.min_size < chosen.max_size:
        raise ValueError(f"need 8 <= min_size < max_size, got {chosen.min_size}, {chosen.max_size}")
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
        _write_split(staging, "training", chosen.num_train, chosen)
        _write_split(staging, "validation", chosen.num_val, chosen)
        (staging / "class_names.txt").write_text("\n".join(DEMO_CLASS_NAMES) + "\n")
        (staging / _MARKER).write_text(json.dumps(chosen.record(), sort_keys=True) + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def ensure_demo_dataset(root: str | Path, **settings: int) -> Path:
    """Return ``root``, generating the demo set there first unless a complete one with these settings exists.

    Arguments are those of `make_demo_dataset`. A missing, partial or differently seeded folder is
    (re)written; a complete one is left untouched.
    """
    if not is_demo_dataset_complete(root, **settings):
        make_demo_dataset(root, **settings)
    return Path(root)
