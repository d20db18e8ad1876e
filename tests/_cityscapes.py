"""Small archives laid out as the official Cityscapes downloads (leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip).

Each frame is a random RGB PNG; its labelIds map holds every id of the definition (0..33) plus ids outside the
table (34, 99, 254, 255), which the conversion must turn into 255.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

# split -> city -> frame numbers; frame stems are <city>_<seq>_<frame>, as in the download
FRAMES: dict[str, dict[str, list[int]]] = {
    "train": {"aachen": [19, 20], "bochum": [313]},
    "val": {"frankfurt": [294, 576]},
    "test": {"berlin": [19]},
}
OUTSIDE_TABLE = (34, 99, 254, 255)


def stems(split: str) -> list[tuple[str, str]]:
    """(city, stem) of every frame of ``split``."""
    return [(city, f"{city}_000000_{n:06d}") for city, numbers in FRAMES[split].items() for n in numbers]


def label_ids(stem: str, hw: tuple[int, int]) -> np.ndarray:
    """A labelIds map, uint8 (H, W), holding every table id and some ids outside the table."""
    rng = np.random.default_rng(sum(map(ord, stem)))
    values = np.array(list(range(34)) + list(OUTSIDE_TABLE), dtype=np.uint8)
    return rng.choice(values, size=hw).astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    """PNG bytes; the mode follows the array (uint8 (H, W): L, (H, W, 3): RGB, uint16: 16-bit grey)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_archives(folder: Path, hw: tuple[int, int] = (32, 64), drop_label: str | None = None) -> tuple[Path, Path]:
    """The two official archives of the :data:`FRAMES` in ``folder``.

    Args:
        hw: frame size (height, width); the download's is (1024, 2048).
        drop_label: stem of a frame whose labelIds map is left out of the gtFine archive.

    Returns:
        Paths of leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip.
    """
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = folder / "leftImg8bit_trainvaltest.zip", folder / "gtFine_trainvaltest.zip"
    with zipfile.ZipFile(images, "w") as zi, zipfile.ZipFile(labels, "w", zipfile.ZIP_DEFLATED) as zl:
        for zf in (zi, zl):
            zf.writestr("README", "tiny test copy")
            zf.writestr("license.txt", "test data")
        for split in FRAMES:
            for city, stem in stems(split):
                rng = np.random.default_rng(len(stem))
                pixels = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
                zi.writestr(f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", _png(pixels))
                base = f"gtFine/{split}/{city}/{stem}_gtFine"
                ids = label_ids(stem, hw)
                if stem != drop_label:
                    zl.writestr(f"{base}_labelIds.png", _png(ids))
                zl.writestr(f"{base}_instanceIds.png", _png(ids.astype(np.uint16) * 100))
                zl.writestr(f"{base}_color.png", _png(np.zeros((*hw, 4), np.uint8)))
                zl.writestr(f"{base}_polygons.json", json.dumps({"imgHeight": hw[0], "imgWidth": hw[1]}))
    return images, labels
