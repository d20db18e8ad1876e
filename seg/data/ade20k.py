"""ADE20K: class names, a colour palette, image readers and the folder data set.

The data set reads the ADEChallengeData2016 layout, which any custom data set can reuse::

    root/images/{split}/<stem>.jpg|png
    root/annotations/{split}/<stem>.png      (single-channel class indices)

or another :class:`~seg.data.layout.FolderLayout` (Cityscapes').

With ``reduce_zero_label=True`` (ADE20K) raw label 0 ("other") becomes the ignore index and label k becomes
k - 1. Every problem with a file raises an error that names the file: nothing is clipped or skipped silently.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import yaml
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from seg.data.layout import ADE20K_LAYOUT, FolderLayout
from seg.data.safety import DEFAULT_MAX_PIXELS, check_pixels
from seg.data.spec import ADE20K, UINT8_MAX
from seg.data.transforms import seed_pipeline

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "SegmentationFolder",
    "image_to_tensor",
    "load_class_names",
    "read_label",
    "read_rgb",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_class_names(path: str | os.PathLike[str]) -> list[str]:
    """Read class names: a text file with one name per line, or a YAML list (``.yaml`` / ``.yml``).

    Blank lines and lines starting with ``#`` are skipped in text files.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class names file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            names = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"class names file {path} is not valid YAML: {err}") from err
        if not isinstance(names, list) or not all(isinstance(n, str | int) for n in names):
            raise ValueError(f"class names file {path} must hold a YAML list of names")
        names = [str(n).strip() for n in names]
    else:
        names = [line.strip() for line in text.splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise ValueError(f"class names file {path} holds no names")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"class names file {path} repeats names: {duplicates}")
    return names


def read_rgb(path: str | os.PathLike[str], exif_transpose: bool = True) -> np.ndarray:
    """Decode any image file to 8-bit RGB.

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images are converted; with ``exif_transpose``
    the EXIF orientation tag is applied (camera photos), as an image viewer shows them.

    Returns:
        uint8 array (H, W, 3).
    """
    try:
        with Image.open(path) as img:
            img.load()  # decodes every byte: a truncated file raises here
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit grey -> 8-bit (65535 / 257 = UINT8_MAX)
                grey = np.asarray(img, dtype=np.float64)
                grey = np.clip(grey / 257.0 + 0.5, 0, UINT8_MAX).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise
    except Exception as err:  # any decoder failure on a bad file, named (decoders raise many types)
        raise ValueError(f"cannot decode image {path}: {_reason(err)}") from err


def read_label(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a single-channel label map (PNG mode L or P) to raw class indices.

    Returns:
        uint8 array (H, W) of the raw values stored in the file.
    """
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(f"cannot decode label map {path}: {_reason(err)}") from err
    with img:
        if img.mode not in ("L", "P"):
            raise ValueError(
                f"label map {path} has mode {img.mode}; expected a single-channel (mode L or P) image "
                "of class indices (a colour-coded RGB label must be converted to indices first)"
            )
        try:
            img.load()
            return np.asarray(img, dtype=np.uint8)
        except Exception as err:
            raise ValueError(f"cannot decode label map {path}: {_reason(err)}") from err


def _reason(err: BaseException) -> str:
    """A decoder error's message (its type when the message is empty), with a hint for oversized images."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, Image.DecompressionBombError):
        text += " (raise PIL.Image.MAX_IMAGE_PIXELS to allow images this large)"
    return text


def _label_lut(num_classes: int, ignore_index: int, reduce_zero_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Map raw uint8 values to training labels; also flag the raw values that are legal."""
    raw = np.arange(256)
    mapped = raw.copy()
    if reduce_zero_label:
        mapped = raw - 1
        mapped[raw == 0] = ignore_index
        mapped[raw == ignore_index] = ignore_index
    valid = ((mapped >= 0) & (mapped < num_classes)) | (mapped == ignore_index)
    return mapped.clip(0, UINT8_MAX).astype(np.uint8), valid


def _missing_message(kind: str, partner: str, folder: Path, stems: list[str], limit: int = 10) -> str:
    shown = ", ".join(stems[:limit]) + (f", ... ({len(stems) - limit} more)" if len(stems) > limit else "")
    return f"{len(stems)} {kind} have no {partner} in {folder}: {shown}"


class SegmentationFolder(Dataset):
    """Image / label-map pairs in the ADE20K layout (or ``layout``), paired by file stem (the layout's key).

    Samples are dicts: ``image`` float32 (3, h, w) after ``transform``; ``mask`` int64 (h, w) training labels
    (ignore index for unlabelled pixels). With ``original_mask=True`` (evaluation) the transform is applied to
    the image only, ``mask`` keeps the original label size and the sample carries its ``name`` (the stem,
    without the layout's suffix).

    Args:
        root: data set root holding the layout's folders (``images/`` and ``annotations/`` for ADE20K).
        split: split folder name, e.g. ``training`` or ``validation`` (Cityscapes: ``train``, ``val``).
        transform: albumentations pipeline, called as ``transform(image=..., mask=...)``; None: no change.
        num_classes: number of training classes; label values beyond it are an error.
        ignore_index: label of unlabelled pixels.
        reduce_zero_label: raw 0 -> ignore, k -> k - 1 (ADE20K).
        original_mask: evaluation mode, see above.
        layout: where the split's images and label maps are and how they pair (ADE20K's by default).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        transform: Callable[..., dict[str, Any]] | None = None,
        num_classes: int = ADE20K.num_classes,
        ignore_index: int = ADE20K.ignore_index,
        reduce_zero_label: bool = ADE20K.reduce_zero_label,
        original_mask: bool = False,
        layout: FolderLayout = ADE20K_LAYOUT,
    ) -> None:
        if not 0 < num_classes <= UINT8_MAX or not 0 <= ignore_index <= UINT8_MAX:
            raise ValueError(f"need 0 < num_classes <= {UINT8_MAX} and 0 <= ignore_index <= {UINT8_MAX} (8-bit "
                             f"label maps), got num_classes={num_classes}, ignore_index={ignore_index}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data set root {self.root} does not exist")
        self.split = split
        self.transform = transform
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        self.original_mask = original_mask
        self._lut, self._valid = _label_lut(num_classes, ignore_index, reduce_zero_label)

        self.layout = layout
        image_dir, label_dir = layout.image_folder(self.root, split), layout.label_folder(self.root, split)
        images = layout.images(self.root, split)
        labels = layout.labels(self.root, split)
        if not images:
            kinds = "/".join(layout.image_suffixes)
            raise FileNotFoundError(f"split folder {image_dir} holds no {kinds} images")
        no_label = sorted(set(images) - set(labels))
        no_image = sorted(set(labels) - set(images))
        if no_label:
            raise FileNotFoundError(_missing_message("images", "label map", label_dir, no_label))
        if no_image:
            raise FileNotFoundError(_missing_message("label maps", "image", image_dir, no_image))
        self.names = [Path(key).name for key in sorted(images)]
        self.samples: list[tuple[Path, Path]] = [(images[s], labels[s]) for s in sorted(images)]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode one pair without transforms.

        Returns:
            image uint8 (H, W, 3) RGB, label uint8 (H, W) training labels (after the zero-label mapping).
        """
        image_path, label_path = self.samples[index]
        image_size = _header_size(image_path, "image")
        label_size = _header_size(label_path, "label map")
        if image_size != label_size:
            raise ValueError(f"label map {label_path} is {label_size[0]}x{label_size[1]} (WxH) but its image "
                             f"{image_path} is {image_size[0]}x{image_size[1]}")
        image = read_rgb(image_path, exif_transpose=False)  # labels follow the stored pixel grid
        raw = read_label(label_path)
        present = cv2.calcHist([raw], [0], None, [256], [0, 256]).ravel() > 0  # values found in the file
        bad = np.flatnonzero(present & ~self._valid)
        if bad.size:
            legal = f"1..{self.num_classes}" if self.reduce_zero_label else f"0..{self.num_classes - 1}"
            raise ValueError(f"label map {label_path} holds values {bad.tolist()} outside {legal} "
                             f"(and not {self.ignore_index}); num_classes={self.num_classes}, "
                             f"reduce_zero_label={self.reduce_zero_label}")
        return image, cv2.LUT(raw, self._lut)

    def source(self, index: int) -> str:
        """The files sample ``index`` is read from (for messages)."""
        image_path, label_path = self.samples[index]
        return f"{image_path} + {label_path.name}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.load(index)
        try:
            if self.original_mask:
                out = self.transform(image=image) if self.transform is not None else {"image": image}
                mask = label
            else:
                out = self.transform(image=image, mask=label) if self.transform is not None else {"image": image}
                mask = out.get("mask", label)
        except Exception as err:  # name the sample instead of a bare trace from inside a worker
            raise ValueError(f"transform failed on {self.source(index)} "
                             f"(image {image.shape[1]}x{image.shape[0]}): {type(err).__name__}: {err}") from err
        sample = {
            "image": image_to_tensor(out["image"]),
            "mask": torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64)),
        }
        if self.original_mask:
            sample["name"] = self.names[index]
        return sample

    def reseed(self, seed: int) -> None:
        """Reseed the random state of the transform (see :func:`seg.data.transforms.seed_pipeline`)."""
        if self.transform is not None:
            seed_pipeline(self.transform, seed)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) array, any dtype -> float32 tensor (3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))  # HWC -> CHW


def _header_size(path: Path, kind: str) -> tuple[int, int]:
    """(W, H) of an image read from its header only."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(f"cannot decode {kind} {path}: {_reason(err)}") from err


class ImageFolder(Dataset):
    """Every image under a folder (recursive), or one image file, for prediction.

    Files are sorted by relative path; a file that is not a readable image is skipped with a warning naming
    it. Images are converted to RGB with their EXIF orientation applied. Samples are dicts: ``image`` float32
    (3, h, w) after ``transform``; ``photo`` the decoded uint8 (H0, W0, 3) RGB image (for overlays, so nothing
    decodes the file twice); ``path`` the path relative to the folder; ``orig_size`` int64 (2,) = (H0, W0).
    Two files that differ only in their extension (``a.jpg``, ``a.png``) are refused: predictions are named
    by relative path without extension.

    Args:
        root: folder (searched recursively) or a single image file.
        transform: albumentations pipeline called as ``transform(image=...)``.
        max_pixels: images with more pixels raise :class:`~seg.data.safety.ImageTooLargeError` (a ValueError naming
            the file) before they are decoded; None: no limit.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[..., dict[str, Any]] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        self.max_pixels = max_pixels
        if self.root.is_file():
            self.base, candidates = self.root.parent, [self.root]
        elif self.root.is_dir():
            self.base, candidates = self.root, sorted(p for p in self.root.rglob("*") if p.is_file())
        else:
            raise FileNotFoundError(f"prediction input {self.root} does not exist")
        self.files: list[Path] = []
        for path in candidates:
            reason = _not_an_image(path)
            if reason:
                warnings.warn(f"skipping {path}: {reason}", stacklevel=2)
            else:
                self.files.append(path)
        if not self.files:
            kinds = ", ".join(IMAGE_EXTENSIONS)
            raise FileNotFoundError(f"no readable images ({kinds}) found in {self.root}")
        seen: dict[Path, Path] = {}
        for path in self.files:
            key = path.relative_to(self.base).with_suffix("")
            if key in seen:
                raise ValueError(f"{seen[key]} and {path} would both be written as {key}.png: rename one of them")
            seen[key] = path

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        with Image.open(path) as img:
            check_pixels(img.height, img.width, self.max_pixels, what=str(path))
        image = read_rgb(path, exif_transpose=True)
        try:
            out = self.transform(image=image) if self.transform is not None else {"image": image}
        except Exception as err:
            raise ValueError(f"transform failed on {path} (image {image.shape[1]}x{image.shape[0]}): "
                             f"{type(err).__name__}: {err}") from err
        return {
            "image": image_to_tensor(out["image"]),
            "photo": torch.tensor(image),  # (H0, W0, 3) uint8, a copy (the decoded array is read-only)
            "path": path.relative_to(self.base).as_posix(),
            "orig_size": torch.tensor(image.shape[:2], dtype=torch.int64),  # (H0, W0) after EXIF rotation
        }


def _not_an_image(path: Path) -> str | None:
    """Why ``path`` cannot be predicted on, or None when its header reads as an image."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file (extension not in {', '.join(IMAGE_EXTENSIONS)})"
    try:
        with Image.open(path):
            return None
    except Exception as err:
        return f"not a readable image ({_reason(err)})"
