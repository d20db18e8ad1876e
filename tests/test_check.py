"""The data checker: every planted problem reported with its file, agreement with the data set, exit codes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from _files import write_pair
from PIL import Image

from seg.data.ade20k import SegmentationFolder
from seg.data.check import LabelRules, check_dataset, check_sample, main
from seg.data.prepare import verify


def stripes(h: int = 32, w: int = 40, values: tuple[int, ...] = (0, 1, 2, 3)) -> np.ndarray:
    """Vertical stripes cycling through ``values``."""
    return np.array(values, np.uint8)[(np.arange(w) // 5) % len(values)][None].repeat(h, 0)


def truncate_body(path: Path) -> None:
    """Cut a JPEG in the middle of its scan data: the header still reads, the pixels do not."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


@pytest.fixture()
def planted(tmp_path: Path) -> Path:
    """3 good training pairs and one of each problem; 2 validation pairs with an orphan label; an empty split."""
    root = tmp_path / "data"
    for i in range(3):
        write_pair(root, "training", f"ok_{i}", stripes())
    image, _ = write_pair(root, "training", "truncated", stripes())
    truncate_body(image)
    write_pair(root, "training", "wrong_size", stripes(32, 40), image_hw=(30, 40))
    write_pair(root, "training", "value_200", np.where(stripes() == 3, 200, stripes()))
    _, label = write_pair(root, "training", "rgb_label", stripes())
    Image.fromarray(np.repeat(stripes()[:, :, None], 3, 2)).save(label)
    image, _ = write_pair(root, "training", "text_as_jpg", stripes())
    image.write_text("not an image")
    _, label = write_pair(root, "training", "label16", stripes())
    cv2.imwrite(str(label), stripes().astype(np.uint16))
    write_pair(root, "training", "no_label", stripes())
    (root / "annotations" / "training" / "no_label.png").unlink()
    (root / "images" / "training" / "notes.txt").write_text("x")
    for i in range(2):
        write_pair(root, "validation", f"val_{i}", stripes(values=(0, 4, 255)))
    write_pair(root, "validation", "orphan", stripes())
    (root / "images" / "validation" / "orphan.jpg").unlink()
    (root / "images" / "empty").mkdir()
    (root / "annotations" / "empty").mkdir()
    return root


EXPECTED = {  # file -> kind
    "truncated.jpg": "unreadable image",
    "wrong_size.png": "size mismatch",
    "value_200.png": "label values",
    "rgb_label.png": "label mode",
    "text_as_jpg.jpg": "unreadable image",
    "label16.png": "label mode",
    "no_label.jpg": "missing label",
    "notes.txt": "unexpected file",
    "orphan.png": "missing image",
}


def test_reports_every_planted_problem(planted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    splits = ["training", "validation", "empty"]
    assert main([str(planted), "--num-classes", "4", "--splits", *splits, "--workers", "1"]) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("  [")]
    found = {Path(line.split("] ")[1].split(":")[0]).name: line.split("]")[0][3:] for line in lines}
    assert found == EXPECTED | {"empty": "empty split"}
    assert "values [200] (320 pixels) outside 0..4 or 255" in out
    assert "40x32 (WxH) but image wrong_size.jpg is 40x30" in out
    assert "training: 10 images, 9 label maps" in out
    assert out.rstrip().splitlines()[-1] == (
        "summary: 10 problems (empty split: 1, label mode: 2, label values: 1, missing image: 1, missing label: 1, "
        "size mismatch: 1, unexpected file: 1, unreadable image: 2)"
    )


def test_decodes_what_the_header_check_misses(planted: Path) -> None:
    """prepare.verify reads headers only: the truncated JPEG passes there and fails here."""
    headers = verify(planted, {"training": -1}, max_label=4)
    assert not any(p.path.endswith("truncated.jpg") for p in headers.problems)
    report, _ = check_dataset(planted, ["training"], LabelRules(num_classes=4))
    (problem,) = [p for p in report.problems if p.path.endswith("truncated.jpg")]
    assert problem.kind == "unreadable image" and "truncated" in problem.detail.lower()


def test_agrees_with_the_data_set(planted: Path) -> None:
    """Every pair the checker passes loads in training; every pair it flags raises there, naming the file."""
    report, _ = check_dataset(planted, ["training"], LabelRules(num_classes=4))
    flagged = {Path(p.path).stem for p in report.problems}
    (planted / "images" / "training" / "no_label.jpg").unlink()  # pairing errors are the data set's constructor's
    dataset = SegmentationFolder(planted, "training", num_classes=4)
    for index, (image, _) in enumerate(dataset.samples):
        if image.stem in flagged:
            with pytest.raises(ValueError, match=image.stem):
                dataset[index]
        else:
            assert dataset[index]["mask"].shape == (32, 40)
    assert len(dataset) - len(flagged & {s[0].stem for s in dataset.samples}) == 3


@pytest.mark.parametrize(
    ("reduce_zero_label", "values", "bad"),
    [
        (True, (0, 1, 4, 255), []),  # raw 0 = unlabelled, 1..4 = classes 0..3
        (True, (0, 5), [5]),
        (False, (0, 3, 255), []),  # classes 0..3 stored as is
        (False, (0, 4), [4]),
    ],
)
def test_label_rules(tmp_path: Path, reduce_zero_label: bool, values: tuple[int, ...], bad: list[int]) -> None:
    image, label = write_pair(tmp_path, "training", "x", stripes(values=values))
    problems, histogram = check_sample(str(image), str(label), LabelRules(4, reduce_zero_label))
    assert [p.kind for p in problems] == (["label values"] if bad else [])
    if bad:
        assert f"values {bad}" in problems[0].detail
    assert histogram is not None and histogram.sum() == 32 * 40


def test_palette_label_and_class_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    _, label = write_pair(root, "training", "pal", stripes(values=(0, 1, 2)))
    palette_image = Image.fromarray(stripes(values=(0, 1, 2)), mode="L").convert("P")  # indices kept
    palette_image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette_image.save(label)
    assert main([str(root), "--num-classes", "4", "--splits", "training"]) == 0
    out = capsys.readouterr().out
    assert "training: labels use 2 of 4 classes (absent: 2, 3); 37.5% of pixels unlabelled" in out
    assert out.rstrip().endswith("summary: OK, no problems found")
    assert main([str(root), "--num-classes", "2", "--no-reduce-zero-label", "--splits", "training"]) == 1
    assert "values [2] (" in capsys.readouterr().out  # stored as is: 2 is beyond classes 0..1


def test_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "holds no images/ and annotations/" in capsys.readouterr().err
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    assert main([str(tmp_path), "--num-classes", "300"]) == 2
    assert main([str(tmp_path), "--splits", "training"]) == 1  # missing split folders are problems
    assert "[missing folder]" in capsys.readouterr().out


def test_parallel_scan_matches_serial(tmp_path: Path) -> None:
    for i in range(34):  # more pairs than the in-process threshold
        write_pair(tmp_path, "training", f"p{i:02d}", stripes(16, 16, values=(0, 1, 9) if i == 7 else (0, 1)))
    serial, hist_serial = check_dataset(tmp_path, ["training"], LabelRules(4), workers=1)
    parallel, hist_parallel = check_dataset(tmp_path, ["training"], LabelRules(4), workers=2)
    assert serial.problems == parallel.problems and len(serial.problems) == 1
    assert np.array_equal(hist_serial["training"], hist_parallel["training"])
