"""Scan a data set in the ADE20K or Cityscapes layout for every problem that would stop or silently spoil training.

``python -m seg.data.check ROOT [--spec ade20k|cityscapes|demo] [--num-classes K] [--no-reduce-zero-label]
[--splits ...] [--layout ade20k|cityscapes]``

The label rules come from a data set spec (:mod:`seg.data.spec`, ADE20K's by default); ``--num-classes``,
``--ignore-index`` and ``--[no-]reduce-zero-label`` override single facts of it. The folder layout is the
spec's (:mod:`seg.data.layout`: Cityscapes' for ``--spec cityscapes``, whose trainId maps ``prepare`` writes)
unless ``--layout`` says otherwise.

Unlike ``seg.data.prepare`` (ADE20K counts and file headers), every image and label map is decoded in full,
with the same readers and label rules as :class:`~seg.data.ade20k.SegmentationFolder`, so a file reported
clean here also loads in training. Each problem names the file:

- ``unreadable image`` / ``unreadable label``: truncated or corrupt files, other files named ``.jpg``/``.png``;
- ``missing label`` / ``missing image``: an image without its label map, a label map without its image;
- ``size mismatch``: label map and image sizes differ;
- ``label values``: values outside the classes (0..num_classes, or 1..num_classes plus 0 with
  ``--reduce-zero-label``) other than the ignore index;
- ``label mode``: label maps that are not single-channel class indices (RGB colour maps, 16-bit);
- ``empty split``, ``missing folder``, ``unexpected file`` (not an image / a label map), ``duplicate stem``.

Exit status 0 when nothing is wrong, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from seg.data.ade20k import _label_lut, read_label, read_rgb
from seg.data.layout import ADE20K_LAYOUT, LAYOUTS, FolderLayout, layout_for
from seg.data.prepare import index_split
from seg.data.problems import Problem, Report, print_report, run_jobs
from seg.data.spec import ADE20K, SPECS, UINT8_MAX

__all__ = ["LabelRules", "check_dataset", "check_sample", "main"]


@dataclass(frozen=True)
class LabelRules:
    """Which raw label values are legal: the data set's settings.

    Args:
        num_classes: number of training classes.
        reduce_zero_label: raw 0 is unlabelled and raw k is class k - 1 (ADE20K).
        ignore_index: raw value of unlabelled pixels besides 0 under ``reduce_zero_label``.
    """

    num_classes: int = ADE20K.num_classes
    reduce_zero_label: bool = ADE20K.reduce_zero_label
    ignore_index: int = ADE20K.ignore_index

    def legal(self) -> np.ndarray:
        """bool (256,): raw values allowed in a label map."""
        return _label_lut(self.num_classes, self.ignore_index, self.reduce_zero_label)[1]

    def describe(self) -> str:
        classes = f"0..{self.num_classes}" if self.reduce_zero_label else f"0..{self.num_classes - 1}"
        return f"{classes} or {self.ignore_index}"


def check_sample(image: str, label: str, rules: LabelRules) -> tuple[list[Problem], np.ndarray | None]:
    """Decode one image / label map pair in full and check it.

    Returns:
        The problems found, and the label map's value histogram (int64 (256,); None when unreadable).
    """
    problems: list[Problem] = []
    image_size = label_size = None
    try:
        pixels = read_rgb(image, exif_transpose=False)  # the stored grid, as the data set reads it
        image_size = (pixels.shape[1], pixels.shape[0])
    except ValueError as err:
        problems.append(Problem("unreadable image", image, _strip_path(str(err), image)))
    try:
        raw = read_label(label)
    except ValueError as err:
        kind = "label mode" if "has mode" in str(err) else "unreadable label"
        return problems + [Problem(kind, label, _strip_path(str(err), label))], None
    label_size = (raw.shape[1], raw.shape[0])
    histogram = cv2.calcHist([raw], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    bad = np.flatnonzero((histogram > 0) & ~rules.legal())
    if bad.size:
        pixels_bad = int(histogram[bad].sum())
        problems.append(Problem("label values", label, f"values {bad.tolist()} ({pixels_bad} pixels) outside "
                                f"{rules.describe()} (num_classes={rules.num_classes}, "
                                f"reduce_zero_label={rules.reduce_zero_label})"))
    if image_size is not None and image_size != label_size:
        problems.append(Problem("size mismatch", label, f"{label_size[0]}x{label_size[1]} (WxH) but image "
                                f"{Path(image).name} is {image_size[0]}x{image_size[1]}"))
    return problems, histogram


def _strip_path(message: str, path: str) -> str:
    """An error message without the file name that the report already shows."""
    for form in (f" '{path}'", f" {path}", path):
        message = message.replace(form, "")
    return message.strip(" :")


def _index(root: Path, split: str, layout: FolderLayout, report: Report) -> tuple[dict, dict] | None:
    """Images and label maps of one split by key, counted in ``report``; None (and a problem) when a folder is
    missing. The ADE20K layout also reports unexpected files and repeated stems."""
    if layout is ADE20K_LAYOUT:
        return index_split(root, split, report)
    folders = (layout.image_folder(root, split), layout.label_folder(root, split))
    missing = [folder for folder in folders if not folder.is_dir()]
    for folder in missing:
        report.problems.append(Problem("missing folder", str(folder), "split folder does not exist"))
    if missing:
        report.counts[split] = (0, 0)
        return None
    images, labels = layout.images(root, split), layout.labels(root, split)
    report.counts[split] = (len(images), len(labels))
    return images, labels


def check_dataset(
    root: Path,
    splits: Sequence[str] = ("training", "validation"),
    rules: LabelRules | None = None,
    workers: int = 1,
    layout: FolderLayout = ADE20K_LAYOUT,
) -> tuple[Report, dict[str, np.ndarray]]:
    """Check every file of ``splits`` under ``root``.

    Args:
        root: data set root holding the layout's folders (``images/`` and ``annotations/`` for ADE20K).
        splits: split folder names.
        rules: legal label values.
        workers: decoding processes (1: in this process).
        layout: where images and label maps are and how they pair.

    Returns:
        The report (counts and problems), and per split the summed label histogram (int64 (256,)).
    """
    rules = rules or LabelRules()
    report = Report(root=root)
    jobs: list[tuple[str, str, LabelRules]] = []
    job_split: list[str] = []
    for split in splits:
        indexed = _index(root, split, layout, report)
        if indexed is None:
            continue
        images, labels = indexed
        image_dir, label_dir = layout.image_folder(root, split), layout.label_folder(root, split)
        if not images:
            kinds = "/".join(layout.image_suffixes)
            report.problems.append(Problem("empty split", str(image_dir), f"holds no {kinds} images"))
        for stem in sorted(set(images) - set(labels)):
            detail = f"no {label_dir / stem}{layout.label_suffix}"
            report.problems.append(Problem("missing label", str(images[stem]), detail))
        for stem in sorted(set(labels) - set(images)):
            report.problems.append(Problem("missing image", str(labels[stem]), f"no image {stem}.* in {image_dir}"))
        for stem in sorted(set(images) & set(labels)):
            jobs.append((str(images[stem]), str(labels[stem]), rules))
            job_split.append(split)
    results = run_jobs(check_sample, jobs, workers, min_parallel=32, chunksize=16)
    histograms = {split: np.zeros(256, np.int64) for split in report.counts}
    for split, (problems, histogram) in zip(job_split, results, strict=True):
        report.problems.extend(problems)
        if histogram is not None:
            histograms[split] += histogram
    return report, histograms


def _class_line(split: str, histogram: np.ndarray, rules: LabelRules) -> str:
    """Which classes the split's labels use: a wrong num_classes or zero-label setting shows up here."""
    lut = _label_lut(rules.num_classes, rules.ignore_index, rules.reduce_zero_label)[0]
    legal = rules.legal()
    classes = {int(lut[v]) for v in np.flatnonzero(histogram) if legal[v] and lut[v] != rules.ignore_index}
    absent = sorted(set(range(rules.num_classes)) - classes)
    shown = ", ".join(map(str, absent[:10])) + (", ..." if len(absent) > 10 else "")
    ignored = histogram[legal & (lut == rules.ignore_index)].sum() / max(int(histogram.sum()), 1)
    text = f"  {split}: labels use {len(classes)} of {rules.num_classes} classes"
    text += f" (absent: {shown})" if absent else ""
    return text + f"; {100 * ignored:.1f}% of pixels unlabelled"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit status (0 OK, 1 problems found, 2 bad arguments)."""
    parser = argparse.ArgumentParser(prog="python -m seg.data.check", description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="data set root (images/ and annotations/; leftImg8bit/ and gtFine/)")
    parser.add_argument("--spec", choices=sorted(SPECS), default=ADE20K.name, help="data set spec (ade20k)")
    parser.add_argument("--num-classes", type=int, help="number of training classes (default: the spec's)")
    parser.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=None,
                        help="raw 0 = unlabelled, raw k = class k - 1 (default: the spec's; on for ADE20K)")
    parser.add_argument("--ignore-index", type=int, help="raw value of unlabelled pixels (default: the spec's)")
    parser.add_argument("--splits", nargs="+", help="split folder names (default: the layout's)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), help="folder layout (default: the spec's)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    parser.add_argument("--max-report", type=int, default=50, help="problems printed per kind")
    args = parser.parse_args(argv)
    spec = SPECS[args.spec]
    for key in ("num_classes", "reduce_zero_label", "ignore_index"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(spec, key))
    if not 0 < args.num_classes <= UINT8_MAX or not 0 <= args.ignore_index <= UINT8_MAX:
        print(f"error: need 0 < --num-classes <= {UINT8_MAX} and 0 <= --ignore-index <= {UINT8_MAX} (8-bit label "
              f"maps), got {args.num_classes} and {args.ignore_index}", file=sys.stderr)
        return 2
    layout = layout_for(args.layout, spec.name)
    tops = list(dict.fromkeys(folder.split("/")[0] for folder in (layout.image_dir, layout.label_dir)))
    if not all((args.root / top).is_dir() for top in tops):
        print(f"error: {args.root} holds no {' and '.join(t + '/' for t in tops)} folders (the {layout.name} "
              "layout)", file=sys.stderr)
        return 2
    rules = LabelRules(args.num_classes, args.reduce_zero_label, args.ignore_index)
    splits = args.splits or [layout.train_split, layout.val_split]
    start = time.perf_counter()
    report, histograms = check_dataset(args.root, splits, rules, workers=max(1, args.workers), layout=layout)
    print(f"decoded every image and label map in {time.perf_counter() - start:.1f} s; legal label values: "
          f"{rules.describe()}")
    for split, histogram in histograms.items():
        if histogram.any():
            print(_class_line(split, histogram, rules))
    print_report(report, args.max_report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
