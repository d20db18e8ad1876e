"""Where a data set keeps its images and label maps, and how the two are paired: one :class:`FolderLayout` each.

- ``ade20k`` (also every custom data set by default): ``images/<split>/<stem>.jpg|png`` with
  ``annotations/<split>/<stem>.png``; splits ``training`` / ``validation``.
- ``cityscapes``: ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` with
  ``gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png`` (written by ``python -m seg.data.prepare``);
  splits ``train`` / ``val``.

An image and its label map pair when their *keys* are equal: the path below the split folder without the
layout's suffix (``aachen/aachen_000000_000019`` in Cityscapes, the stem in ADE20K).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from seg.data.cityscapes import IMAGE_SUFFIX, TRAIN_ID_SUFFIX

__all__ = ["ADE20K_LAYOUT", "CITYSCAPES_LAYOUT", "LAYOUTS", "FolderLayout", "LayoutName", "layout_for"]

LayoutName = Literal["ade20k", "cityscapes"]


@dataclass(frozen=True)
class FolderLayout:
    """A data set's folder layout.

    Args:
        name: short name (``--data.layout``).
        image_dir: image folder of a split below the root; ``{split}`` is replaced by the split name.
        label_dir: label-map folder of a split below the root, as ``image_dir``.
        image_suffixes: endings of image files (matched case-insensitively), removed to form the key.
        label_suffix: ending of label-map files, removed to form the key.
        recursive: files sit in sub-folders of the split folder (Cityscapes' cities).
        train_split: default training split name.
        val_split: default validation (and test) split name.
    """

    name: str
    image_dir: str
    label_dir: str
    image_suffixes: tuple[str, ...]
    label_suffix: str
    recursive: bool
    train_split: str
    val_split: str

    def image_folder(self, root: Path, split: str) -> Path:
        return root / self.image_dir.format(split=split)

    def label_folder(self, root: Path, split: str) -> Path:
        return root / self.label_dir.format(split=split)

    def images(self, root: Path, split: str) -> dict[str, Path]:
        """A split's images by key; raises when the folder is missing or two files share a key."""
        return files_by_key(self.image_folder(root, split), self.image_suffixes, self.recursive)

    def labels(self, root: Path, split: str) -> dict[str, Path]:
        """A split's label maps by key; raises when the folder is missing or two files share a key."""
        return files_by_key(self.label_folder(root, split), (self.label_suffix,), self.recursive)


def files_by_key(folder: Path, suffixes: tuple[str, ...], recursive: bool) -> dict[str, Path]:
    """Files of ``folder`` (and its sub-folders when ``recursive``) ending in one of ``suffixes``, keyed by their
    path below ``folder`` without the suffix (POSIX separators)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist")
    endings = tuple(s.lower() for s in suffixes)
    files: dict[str, Path] = {}
    for path in _walk(folder, recursive):
        lower = path.name.lower()
        ending = next((e for e in endings if lower.endswith(e)), None)
        if ending is None:
            continue
        key = path.relative_to(folder).as_posix()[: -len(ending)]
        if key in files:
            raise ValueError(f"two files share the name {key!r}: {files[key]} and {path}")
        files[key] = path
    return files


def _walk(folder: Path, recursive: bool) -> list[Path]:
    """The files of ``folder`` (recursively when asked), sorted."""
    if not recursive:
        with os.scandir(folder) as entries:
            return sorted(Path(e.path) for e in entries if e.is_file())
    found: list[Path] = []
    for parent, _, names in os.walk(folder):
        found += [Path(parent) / n for n in names]
    return sorted(found)


ADE20K_LAYOUT = FolderLayout(name="ade20k", image_dir="images/{split}", label_dir="annotations/{split}",
                             image_suffixes=(".jpg", ".jpeg", ".png"), label_suffix=".png", recursive=False,
                             train_split="training", val_split="validation")
CITYSCAPES_LAYOUT = FolderLayout(name="cityscapes", image_dir="leftImg8bit/{split}", label_dir="gtFine/{split}",
                                 image_suffixes=(IMAGE_SUFFIX,), label_suffix=TRAIN_ID_SUFFIX, recursive=True,
                                 train_split="train", val_split="val")
LAYOUTS: dict[str, FolderLayout] = {layout.name: layout for layout in (ADE20K_LAYOUT, CITYSCAPES_LAYOUT)}


def layout_for(name: str | None, spec_name: str) -> FolderLayout:
    """The layout called ``name``; None: the layout of the data set the spec names (ADE20K's for the others)."""
    if name is None:
        return LAYOUTS.get(spec_name, ADE20K_LAYOUT)
    if name not in LAYOUTS:
        raise ValueError(f"unknown folder layout {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]
