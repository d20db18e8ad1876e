"""Tests of the bundled demo data set: layout, determinism, labels, colour independence, atomic regeneration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seg.data import synthetic
from seg.data.synthetic import (
    DEMO_CLASS_NAMES,
    DEMO_STUFF,
    DEMO_THINGS,
    ensure_demo_dataset,
    is_demo_dataset_complete,
    make_demo_dataset,
    render_demo_sample,
)

SMALL = dict(num_train=8, num_val=2, seed=0)


def _files(root: Path) -> dict[str, bytes]:
    """All files under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pairs(root: Path, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image RGB uint8, label uint8) pairs of one split, checking that every image has its label."""
    images = sorted((root / "images" / split).glob("*.jpg"))
    labels = sorted((root / "annotations" / split).glob("*.png"))
    assert [p.stem for p in images] == [p.stem for p in labels]
    out = []
    for image_path, label_path in zip(images, labels, strict=True):
        image, label = Image.open(image_path), Image.open(label_path)
        assert image.mode == "RGB" and label.mode == "L"
        assert image.size == label.size
        out.append((np.asarray(image), np.asarray(label)))
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "set", **SMALL)


def test_layout_and_class_names(demo: Path) -> None:
    assert len(DEMO_CLASS_NAMES) >= 8 and len(set(DEMO_CLASS_NAMES)) == len(DEMO_CLASS_NAMES)
    assert (demo / "class_names.txt").read_text().splitlines() == list(DEMO_CLASS_NAMES)
    train, val = _pairs(demo, "training"), _pairs(demo, "validation")
    assert (len(train), len(val)) == (8, 2)
    stems = sorted(p.stem for p in (demo / "images" / "training").glob("*.jpg"))
    assert stems[0] == "demo_train_00000" and stems[-1] == "demo_train_00007"
    val_stems = sorted(p.stem for p in (demo / "images" / "validation").glob("*.jpg"))
    assert val_stems == ["demo_val_00000", "demo_val_00001"]


def test_labels_cover_every_class_and_the_ignore_value(demo: Path) -> None:
    counts = np.zeros(len(DEMO_CLASS_NAMES) + 1, dtype=np.int64)
    for _, label in _pairs(demo, "training"):
        assert label.max() <= len(DEMO_CLASS_NAMES)
        counts += np.bincount(label.ravel(), minlength=len(counts))
    assert (counts[1:] > 0).all(), f"classes missing from the training split: {np.flatnonzero(counts[1:] == 0)}"
    unlabelled = counts[0] / counts.sum()
    assert 0.001 < unlabelled < 0.05  # thin borders only


def test_sizes_vary_and_are_not_square(demo: Path) -> None:
    shapes = [label.shape for _, label in _pairs(demo, "training") + _pairs(demo, "validation")]
    assert all(h != w for h, w in shapes)
    assert all(160 <= side <= 320 for shape in shapes for side in shape)
    assert len(set(shapes)) == len(shapes)
    assert any(side % 32 for shape in shapes for side in shape)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(demo: Path, tmp_path: Path) -> None:
    again = _files(make_demo_dataset(tmp_path / "again", **SMALL))
    assert again == _files(demo)
    other = _files(make_demo_dataset(tmp_path / "other", **{**SMALL, "seed": 1}))
    assert other.keys() == again.keys()
    changed = [name for name in again if name.endswith((".jpg", ".png")) and again[name] != other[name]]
    assert len(changed) == 20  # every image and every label


def _labelled_pixels(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """RGB values (P, 3) and 0-based classes (P,) of every labelled pixel of one split."""
    pairs = _pairs(root, split)
    x = np.concatenate([image[label > 0] for image, label in pairs]).astype(np.float64)
    y = np.concatenate([label[label > 0] for _, label in pairs]).astype(np.int64) - 1
    return x, y


def test_colour_does_not_identify_a_class(tmp_path: Path) -> None:
    """A per-pixel nearest-centroid colour classifier fitted on the training split is near chance on validation."""
    root = make_demo_dataset(tmp_path / "set", num_train=40, num_val=8, seed=0, min_size=48, max_size=96)
    x, y = _labelled_pixels(root, "training")
    centroids = np.stack([x[y == c].mean(axis=0) for c in range(len(DEMO_CLASS_NAMES))])
    x_val, y_val = _labelled_pixels(root, "validation")
    predicted = np.argmin(((x_val[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = float((predicted == y_val).mean())
    majority = float(np.bincount(y_val).max() / len(y_val))
    assert accuracy < 0.2 and accuracy < majority + 0.05, (accuracy, majority)


def test_render_is_a_pure_function_of_the_generator() -> None:
    first = render_demo_sample(np.random.default_rng(7), 100, 140, index=13)
    second = render_demo_sample(np.random.default_rng(7), 100, 140, index=13)
    assert first[0].shape == (100, 140, 3) and first[1].shape == (100, 140)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    stuff, thing = 13 % len(DEMO_STUFF), len(DEMO_STUFF) + 13 % len(DEMO_THINGS)  # classes forced by the index
    assert (first[1] == stuff + 1).any() and (first[1] == thing + 1).any()


def test_ensure_is_a_no_op_on_a_complete_folder(demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_demo_dataset_complete(demo, **SMALL)
    assert not is_demo_dataset_complete(demo, **{**SMALL, "seed": 5})
    before = {p: p.stat().st_mtime_ns for p in demo.rglob("*")}

    def fail(*args: object, **kwargs: object) -> Path:
        raise AssertionError("regenerated a complete data set")

    monkeypatch.setattr(synthetic, "make_demo_dataset", fail)
    assert ensure_demo_dataset(demo, **SMALL) == demo
    assert {p: p.stat().st_mtime_ns for p in demo.rglob("*")} == before


@pytest.mark.parametrize("damage", ["marker", "label", "marker_text"])
def test_ensure_regenerates_an_incomplete_folder(demo: Path, tmp_path: Path, damage: str) -> None:
    root = make_demo_dataset(tmp_path / "set", **SMALL)
    if damage == "marker":
        (root / ".complete").unlink()
    elif damage == "label":
        (root / "annotations" / "training" / "demo_train_00003.png").unlink()
    else:
        (root / ".complete").write_text("{")
    assert not is_demo_dataset_complete(root, **SMALL)
    assert ensure_demo_dataset(root, **SMALL) == root
    assert _files(root) == _files(demo)
    assert not list(tmp_path.glob(".set.partial-*"))


def test_make_refuses_a_foreign_folder(tmp_path: Path) -> None:
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(FileExistsError):
        make_demo_dataset(tmp_path, **SMALL)
    assert keep.read_text() == "mine" and not (tmp_path / "images").exists()
