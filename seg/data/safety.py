"""Predictions never touch their inputs (where the prediction files may go, checked before anything is written),
and photos above a pixel limit are refused before they are decoded."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["DEFAULT_MAX_PIXELS", "ImageTooLargeError", "UnsafeOutputError", "check_output_location", "check_pixels"]

DEFAULT_MAX_PIXELS = 40_000_000  # a 6000 x 4000 photo (24 MP) passes, 9400 x 9400 (88 MP) does not


class ImageTooLargeError(ValueError):
    """An image above the configured pixel limit."""


def check_pixels(height: int, width: int, max_pixels: int | None = DEFAULT_MAX_PIXELS, what: str = "image") -> None:
    """Raise :class:`ImageTooLargeError` when ``height x width`` exceeds ``max_pixels`` (None: no limit)."""
    if max_pixels is not None and height * width > max_pixels:
        raise ImageTooLargeError(f"{what} is {width} x {height} = {height * width / 1e6:.1f} MP, above the limit of "
                                 f"{max_pixels / 1e6:.1f} MP (max_pixels); scale it down first")


class UnsafeOutputError(ValueError):
    """The prediction files would be written over or among the input images."""


def _resolved(path: str | os.PathLike[str]) -> Path:
    """Absolute path with links and ``..`` resolved (the path need not exist)."""
    return Path(path).expanduser().resolve()


def check_output_location(
    output_dir: str | os.PathLike[str],
    input_root: str | os.PathLike[str],
    outputs: Iterable[Path] = (),
    inputs: Iterable[Path] = (),
) -> None:
    """Raise :class:`UnsafeOutputError` when writing predictions to ``output_dir`` could overwrite an input.

    Refused: an output folder that is, contains or lies inside the input folder (``input_root`` when it is a
    folder), and any output file equal to an input file (links resolved).

    Args:
        output_dir: folder the prediction files go to.
        input_root: the prediction input: a folder (searched recursively) or one image file.
        outputs: every output file the run would write.
        inputs: every input file of the run.
    """
    out, root = _resolved(output_dir), _resolved(input_root)
    if root.is_dir():
        if out == root:
            raise UnsafeOutputError(f"output folder {output_dir} is the input folder {input_root}: the predictions "
                                    "would overwrite the photos; choose another output folder")
        if out.is_relative_to(root):
            raise UnsafeOutputError(f"output folder {output_dir} lies inside the input folder {input_root}: its files "
                                    "would be read as inputs and may overwrite photos; choose a folder outside it")
        if root.is_relative_to(out):
            raise UnsafeOutputError(f"output folder {output_dir} contains the input folder {input_root}: predictions "
                                    "could overwrite the photos; choose a folder that does not hold the inputs")
    sources = {_resolved(path): Path(path) for path in inputs}
    if root.is_file():
        sources.setdefault(root, Path(input_root))
    for target in outputs:
        hit = sources.get(_resolved(target))
        if hit is not None:
            raise UnsafeOutputError(f"prediction file {target} would overwrite the input {hit}; choose another "
                                    "output folder")
