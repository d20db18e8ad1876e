"""Extract and verify ADE20K or Cityscapes: ``python -m seg.data.prepare PATH [PATH] [--out DIR]``.

PATH is the official ``ADEChallengeData2016.zip`` (extracted into DIR, default ``data/``) or an already
extracted ``ADEChallengeData2016`` folder (checked in place); or Cityscapes' ``leftImg8bit_trainvaltest.zip``
and ``gtFine_trainvaltest.zip`` (extracted into DIR/cityscapes) or an extracted folder holding ``leftImg8bit/``
and ``gtFine/``, whose labelIds maps are converted to trainIds (see :mod:`seg.data.prepare_cityscapes`).
For ADE20K the check reports, naming the files:

- image / label counts per split against the expected 20,210 training and 2,000 validation pairs;
- images without a label map and label maps without an image;
- label maps that are not single-channel (mode L / P), that cannot be decoded, or hold values
  above the class count (ADE20K's by default);
- label maps whose size differs from their image's (sizes read from the file headers, no image decoding).

Exit status 0 when nothing is wrong, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from seg.data import prepare_cityscapes
from seg.data.archives import extract_zip
from seg.data.problems import Problem, Report, print_report, run_jobs
from seg.data.spec import ADE20K

__all__ = ["EXPECTED_COUNTS", "check_pair", "extract", "index_split", "main", "verify"]

EXPECTED_COUNTS: dict[str, int] = {"training": 20210, "validation": 2000}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def extract(zip_path: Path, out: Path) -> Path:
    """Extract ``zip_path`` into ``out`` (files already there with the same size are kept; an archive cut short
    is extracted as far as it arrived, see :mod:`seg.data.archives`).

    Returns:
        The data set root: the extracted folder that holds ``images/``.
    """
    tops = extract_zip(zip_path, out).top_level
    for candidate in [out / t for t in tops] + [out]:
        if (candidate / "images").is_dir():
            return candidate
    raise FileNotFoundError(f"{zip_path} holds no images/ folder (top-level entries: {list(tops)})")


def _header(path: Path) -> tuple[tuple[int, int], str]:
    with Image.open(path) as img:
        return img.size, img.mode


def check_pair(image: str, label: str, max_label: int = ADE20K.num_classes) -> list[Problem]:
    """Check one image / label map pair: readable headers, label mode, label values, equal sizes."""
    problems: list[Problem] = []
    try:
        image_size, _ = _header(Path(image))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        problems.append(Problem("unreadable image", image, str(err)))
        image_size = None
    try:
        with Image.open(label) as img:
            label_size, mode = img.size, img.mode
            if mode not in ("L", "P"):
                detail = f"mode {mode}, expected single-channel L or P"
                return problems + [Problem("label mode", label, detail)]
            values = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        return problems + [Problem("unreadable label", label, str(err))]
    counts = np.bincount(values.ravel(), minlength=256)
    bad = np.flatnonzero(counts[max_label + 1 :]) + max_label + 1
    if bad.size:
        problems.append(Problem("label values", label, f"values {bad.tolist()} above {max_label}"))
    if image_size is not None and image_size != label_size:
        detail = f"{label_size[0]}x{label_size[1]} (WxH) but image {image} is {image_size[0]}x{image_size[1]}"
        problems.append(Problem("size mismatch", label, detail))
    return problems


def _by_stem(folder: Path, suffixes: tuple[str, ...], report: Report) -> dict[str, Path]:
    files: dict[str, Path] = {}
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = Path(entry.path)
            if not entry.is_file():
                continue
            if path.suffix.lower() not in suffixes:
                report.problems.append(Problem("unexpected file", str(path), "not a data file"))
            elif path.stem in files:
                detail = f"same stem as {files[path.stem]}"
                report.problems.append(Problem("duplicate stem", str(path), detail))
            else:
                files[path.stem] = path
    return files


def index_split(root: Path, split: str, report: Report) -> tuple[dict[str, Path], dict[str, Path]] | None:
    """Images and label maps of one split by stem, counted in ``report``; None (and a problem) when a folder is
    missing."""
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    missing = [d for d in (image_dir, label_dir) if not d.is_dir()]
    for folder in missing:
        report.problems.append(Problem("missing folder", str(folder), "split folder does not exist"))
    if missing:
        report.counts[split] = (0, 0)
        return None
    images = _by_stem(image_dir, IMAGE_SUFFIXES, report)
    labels = _by_stem(label_dir, (".png",), report)
    report.counts[split] = (len(images), len(labels))
    return images, labels


def verify(
    root: Path,
    expected: dict[str, int] | None = None,
    max_label: int = ADE20K.num_classes,
    workers: int = 1,
) -> Report:
    """Check every split of ``expected`` (default: ADE20K's) under ``root``.

    Args:
        root: data set root holding ``images/`` and ``annotations/``.
        expected: split name -> expected number of pairs; a value < 0 skips the count check of that split.
        max_label: largest legal raw label value (ADE20K's class count: 0 = other, 1..K classes).
        workers: processes decoding label maps (1: in this process).
    """
    expected = dict(EXPECTED_COUNTS if expected is None else expected)
    report = Report(root=root)
    jobs: list[tuple[str, str, int]] = []
    for split, count in expected.items():
        indexed = index_split(root, split, report)
        if indexed is None:
            continue
        images, labels = indexed
        image_dir, label_dir = root / "images" / split, root / "annotations" / split
        if count >= 0 and (len(images) != count or len(labels) != count):
            report.problems.append(Problem("count", f"{image_dir} | {label_dir}", f"{len(images)} images and "
                                           f"{len(labels)} label maps, expected {count} each"))
        for stem in sorted(set(images) - set(labels)):
            report.problems.append(Problem("missing label", str(images[stem]), f"no {label_dir / stem}.png"))
        for stem in sorted(set(labels) - set(images)):
            detail = f"no image {stem}.* in {image_dir}"
            report.problems.append(Problem("missing image", str(labels[stem]), detail))
        jobs += [(str(images[s]), str(labels[s]), max_label) for s in sorted(set(images) & set(labels))]
    results = run_jobs(check_pair, jobs, workers, min_parallel=64, chunksize=64)
    for problems in results:
        report.problems.extend(problems)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit status (0 OK, 1 problems found, 2 bad input)."""
    parser = argparse.ArgumentParser(prog="python -m seg.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("path", type=Path, nargs="+", help="ADEChallengeData2016.zip or its extracted folder; or "
                        "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip, or their extracted folder")
    parser.add_argument("--out", type=Path, default=Path("data"), help="where a zip is extracted (data/)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="checking / converting processes")
    parser.add_argument("--max-label", type=int, default=ADE20K.num_classes, help="largest legal raw label value")
    parser.add_argument("--skip-count-check", action="store_true", help="do not compare with the download's counts")
    parser.add_argument("--max-report", type=int, default=50, help="problems printed per kind")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.path if not p.exists()]
    if missing:
        print(f"error: {', '.join(missing)} does not exist", file=sys.stderr)
        return 2
    if any(prepare_cityscapes.is_cityscapes(p) for p in args.path):
        return _main_cityscapes(args)
    if len(args.path) > 1:
        print(f"error: ADE20K is one archive or folder, got {len(args.path)} paths", file=sys.stderr)
        return 2
    args.path = args.path[0]
    try:
        root = extract(args.path, args.out) if args.path.is_file() else args.path
        if not (root / "images").is_dir():
            raise FileNotFoundError(f"{root} holds no images/ folder (expected the ADEChallengeData2016 "
                                    "layout)")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    expected = {split: -1 for split in EXPECTED_COUNTS} if args.skip_count_check else EXPECTED_COUNTS
    report = verify(root, expected, max_label=args.max_label, workers=args.workers)
    print_report(report, args.max_report)
    return 0 if report.ok else 1


def _main_cityscapes(args: argparse.Namespace) -> int:
    """Extract (or take in place) and convert Cityscapes; the exit status."""
    try:
        report = prepare_cityscapes.prepare(list(args.path), args.out, max(1, args.workers),
                                            check_counts=not args.skip_count_check)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_report(report, args.max_report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
