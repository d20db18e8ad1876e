"""Cityscapes: extract the official archives and write the trainId label maps.

``python -m seg.data.prepare leftImg8bit_trainvaltest.zip gtFine_trainvaltest.zip --out data`` extracts both
archives into ``data/cityscapes`` (city folders kept) and writes, beside each ``<stem>_gtFine_labelIds.png``, its
``<stem>_gtFine_labelTrainIds.png``: the labelIds mapped through the Cityscapes label table (ids outside the 19
evaluated classes, and ids the table does not know, become the ignore label). A folder already holding
``leftImg8bit/`` and ``gtFine/`` is converted in place. Maps already converted (newer than their labelIds map)
are kept. Reported, naming the files:

- per split, frames and label maps against the expected 2975 training and 500 validation frames, with the
  numbers missing (a partial download is converted as far as it goes);
- frames without a label map, label maps without a frame, missing split folders;
- label maps that cannot be decoded, are not single-channel, or differ in size from their frame.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from seg.data.ade20k import read_label
from seg.data.archives import extract_zip, first_member
from seg.data.cityscapes import EXPECTED_FRAMES, LABEL_ID_SUFFIX, TRAIN_ID_SUFFIX, to_train_ids
from seg.data.layout import CITYSCAPES_LAYOUT, files_by_key
from seg.data.problems import Problem, Report, run_jobs

__all__ = ["FOLDER", "convert_one", "is_cityscapes", "prepare", "prepare_root"]

FOLDER = "cityscapes"  # the data set folder under --out
_TOPS = ("leftImg8bit", "gtFine")


def is_cityscapes(path: Path) -> bool:
    """Whether ``path`` is a Cityscapes archive (members under ``leftImg8bit/`` or ``gtFine/``) or folder."""
    if path.is_dir():
        return any((path / top).is_dir() for top in _TOPS)
    if path.is_file():
        member = first_member(path) or ""
        return member.split("/")[0] in _TOPS or path.name.startswith(_TOPS)
    return False


def prepare(sources: list[Path], out: Path, workers: int = 1, check_counts: bool = True) -> Report:
    """Extract the archives among ``sources`` into ``out/cityscapes`` (a folder source is used in place) and
    convert every labelIds map found there (see :func:`prepare_root`).

    Raises:
        ValueError: two folder sources, or a folder given beside archives.
    """
    folders = [s for s in sources if s.is_dir()]
    if folders and (len(folders) > 1 or len(sources) > 1):
        raise ValueError(f"give the two official archives or one extracted folder, got {[str(s) for s in sources]}")
    root = folders[0] if folders else out / FOLDER
    for archive in sources:
        if archive.is_file():
            extracted = extract_zip(archive, root)
            if extracted.truncated:
                print(f"  {archive} is incomplete: what is missing is counted below")
    return prepare_root(root, workers, check_counts)


def convert_one(label_ids: str, image: str | None) -> list[Problem]:
    """Write the trainId map of one labelIds map (unless an up-to-date one exists); check it against its frame.

    Args:
        label_ids: path of a ``*_gtFine_labelIds.png``.
        image: path of its ``*_leftImg8bit.png`` (None when missing): its size must match.
    """
    source = Path(label_ids)
    target = source.with_name(source.name[: -len(LABEL_ID_SUFFIX)] + TRAIN_ID_SUFFIX)
    try:
        raw = read_label(source)
    except ValueError as err:
        kind = "label mode" if "has mode" in str(err) else "unreadable label"
        return [Problem(kind, label_ids, str(err).replace(f"label map {source} ", ""))]
    problems: list[Problem] = []
    if image is not None:
        try:
            with Image.open(image) as img:
                width, height = img.size
            if (height, width) != raw.shape:
                problems.append(Problem("size mismatch", label_ids, f"{raw.shape[1]}x{raw.shape[0]} (WxH) but "
                                        f"frame {Path(image).name} is {width}x{height}"))
        except Exception as err:  # any decoder failure on a bad file, named
            problems.append(Problem("unreadable image", image, str(err) or type(err).__name__))
    if not target.is_file() or target.stat().st_mtime < source.stat().st_mtime:
        partial = target.with_name(target.name + ".partial.png")
        Image.fromarray(to_train_ids(raw), mode="L").save(partial)
        partial.replace(target)  # never a half-written map under the final name
    return problems


def _split_names(root: Path) -> list[str]:
    """The expected splits, then any other split folder found (``test``)."""
    found = set()
    for top in _TOPS:
        if (root / top).is_dir():
            found |= {p.name for p in (root / top).iterdir() if p.is_dir()}
    return list(EXPECTED_FRAMES) + sorted(found - set(EXPECTED_FRAMES))


def prepare_root(root: Path, workers: int = 1, check_counts: bool = True) -> Report:
    """Convert and check every split of an extracted Cityscapes folder ``root``.

    The report counts, per split, frames and label maps (labelIds maps, or trainId maps where only those
    exist); with ``check_counts`` fewer than the download's frames of ``train`` / ``val`` is a problem.
    """
    report = Report(root=root)
    jobs: list[tuple[str, str | None]] = []
    layout = CITYSCAPES_LAYOUT
    for split in _split_names(root):
        image_dir, label_dir = layout.image_folder(root, split), layout.label_folder(root, split)
        expected = EXPECTED_FRAMES.get(split)  # None: an extra split (test), whose folders may be absent
        if expected is None and not (image_dir.is_dir() and label_dir.is_dir()):
            continue
        images, labels = _index(image_dir, (layout.image_suffixes[0],), report), _index(label_dir, None, report)
        report.counts[split] = (len(images), len(labels))
        if check_counts and expected is not None and (len(images) < expected or len(labels) < expected):
            report.problems.append(Problem("count", f"{image_dir} | {label_dir}", (
                f"{len(images)} of {expected} frames and {len(labels)} of {expected} label maps: "
                f"{max(expected - len(images), 0)} frames and {max(expected - len(labels), 0)} label maps missing")))
        for key in sorted(set(images) - set(labels)):
            report.problems.append(Problem("missing label", str(images[key]), f"no {label_dir / key}{LABEL_ID_SUFFIX}"))
        for key in sorted(set(labels) - set(images)):
            report.problems.append(Problem("missing image", str(labels[key]),
                                           f"no frame {image_dir / key}{layout.image_suffixes[0]}"))
        for key, path in sorted(labels.items()):
            if path.name.endswith(LABEL_ID_SUFFIX):
                jobs.append((str(path), str(images[key]) if key in images else None))
    print(f"converting {len(jobs)} labelIds maps to trainIds in {root}")
    results = run_jobs(convert_one, jobs, workers, min_parallel=32, chunksize=16)
    for problems in results:
        report.problems.extend(problems)
    return report


def _index(folder: Path, suffixes: tuple[str, ...] | None, report: Report) -> dict[str, Path]:
    """Frames (``suffixes``) or label maps (None: labelIds maps, else trainId maps) of one split folder by key;
    a missing folder is a problem and indexes as empty."""
    if not folder.is_dir():
        report.problems.append(Problem("missing folder", str(folder), "split folder does not exist"))
        return {}
    if suffixes is not None:
        return files_by_key(folder, suffixes, recursive=True)
    train_ids = files_by_key(folder, (TRAIN_ID_SUFFIX,), recursive=True)
    return {**train_ids, **files_by_key(folder, (LABEL_ID_SUFFIX,), recursive=True)}
