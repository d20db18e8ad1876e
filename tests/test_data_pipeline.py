"""The ADE20K data pipeline: transforms, the data set's errors, prediction inputs and the prepare tool."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from seg.data.ade20k import (
    ImageFolder,
    SegmentationFolder,
    load_class_names,
    read_rgb,
)
from seg.data.datamodule import seed_worker
from seg.data.prepare import main as prepare_main
from seg.data.prepare import verify
from seg.data.spec import ADE20K, ADE20K_CLASSES, IMAGENET_MEAN, IMAGENET_STD
from seg.data.transforms import (
    CatMaxRatioCrop,
    PhotometricDistortion,
    RandomRescale,
    eval_transform,
    train_transform,
)


def write_pair(
    root: Path,
    split: str,
    stem: str,
    label: np.ndarray,
    image_size: tuple[int, int] | None = None,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write a random JPEG (H, W from ``image_size`` or the label) and a raw label PNG under ``root``."""
    h, w = image_size or label.shape
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image_dir / f"{stem}.jpg", quality=90)
    Image.fromarray(label.astype(np.uint8), mode="L").save(label_dir / f"{stem}.png")
    return image_dir / f"{stem}.jpg", label_dir / f"{stem}.png"


def blocks(h: int, w: int, values: list[int], seed: int = 0) -> np.ndarray:
    """A label map of 10x10 blocks with random values from ``values``."""
    grid = np.random.default_rng(seed).choice(values, size=(h // 10 + 1, w // 10 + 1))
    return np.kron(grid, np.ones((10, 10), dtype=np.int64))[:h, :w]


# ---------------------------------------------------------------- class names and palette


def test_ade20k_names_and_palette() -> None:
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    assert ADE20K_CLASSES[:5] == ("wall", "building", "sky", "floor", "tree")
    assert ADE20K_CLASSES[12] == "person" and ADE20K_CLASSES[-2:] == ("clock", "flag")
    palette = ADE20K.palette_array
    assert palette.shape == (150, 3) and palette.dtype == np.uint8
    assert len(np.unique(palette, axis=0)) == 150
    assert palette.sum(axis=1).min() > 0  # no black class


def test_load_class_names_text_and_yaml(tmp_path: Path) -> None:
    (tmp_path / "names.txt").write_text("# comment\nroad\n\nsky \ncar\n")
    (tmp_path / "names.yaml").write_text("- road\n- sky\n- car\n")
    assert load_class_names(tmp_path / "names.txt") == ["road", "sky", "car"]
    assert load_class_names(tmp_path / "names.yaml") == ["road", "sky", "car"]
    (tmp_path / "bad.yaml").write_text("road: 1\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_class_names(tmp_path / "bad.yaml")
    (tmp_path / "dup.txt").write_text("road\nroad\n")
    with pytest.raises(ValueError, match=r"dup.txt repeats names: \['road'\]"):
        load_class_names(tmp_path / "dup.txt")


# ---------------------------------------------------------------- transforms


def test_train_pipeline_crops_shapes_and_labels() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (530, 700, 3), dtype=np.uint8)
    label = blocks(530, 700, [0, 3, 7, 255]).astype(np.uint8)
    pipeline = train_transform(512, scale=(1024, 512), seed=1)
    for _ in range(6):
        out = pipeline(image=image, mask=label)
        assert out["image"].shape == (512, 512, 3) and out["image"].dtype == np.float32
        assert out["mask"].shape == (512, 512) and out["mask"].dtype == np.uint8
        assert set(np.unique(out["mask"]).tolist()) <= {0, 3, 7, 255}
        assert abs(float(out["image"].mean())) < 3.0  # normalised, not 0-255


def test_random_rescale_keeps_ratio_in_range() -> None:
    rescale = RandomRescale(scale=(2048, 512), ratio_range=(0.5, 2.0))
    rescale.set_random_seed(0)
    label = blocks(530, 700, [1, 2, 9]).astype(np.uint8)
    shorts = []
    for _ in range(40):
        out = rescale(image=np.zeros((530, 700, 3), np.uint8), mask=label)
        h, w = out["mask"].shape
        assert out["image"].shape[:2] == (h, w)
        assert abs(w / h - 700 / 530) < 0.01  # keeps the aspect ratio
        assert set(np.unique(out["mask"]).tolist()) <= {1, 2, 9}  # nearest: no new values
        shorts.append(h)
    # short side = 512 r (the short limit binds), r in [0.5, 2]: all draws in [256, 1024] and well spread
    assert 256 <= min(shorts) < 400 and 800 < max(shorts) <= 1024


def test_eval_transform_fits_scale_and_keeps_ratio() -> None:
    pipeline = eval_transform((2048, 512))
    for (h, w), expected in [((530, 700), (512, 676)), ((2000, 300), (2048, 307)), ((256, 256), (512, 512))]:
        out = pipeline(image=np.zeros((h, w, 3), np.uint8))["image"]
        assert out.shape[:2] == expected
        assert max(out.shape[:2]) <= 2048 and min(out.shape[:2]) <= 512
    out = eval_transform((64, 32))(image=np.full((60, 80, 3), 255, np.uint8))["image"]
    assert out.shape == (32, 43, 3)  # factor min(64/80, 32/60)
    np.testing.assert_allclose(out[0, 0], (255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), rtol=1e-5)


def test_padding_is_ignore_and_zero() -> None:
    label = blocks(200, 300, [1, 2, 3]).astype(np.uint8)
    image = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    pipeline = train_transform(512, scale=(300, 200), ratio_range=(1.0, 1.0), seed=0)
    out = pipeline(image=image, mask=label)
    assert out["mask"].shape == (512, 512)
    assert (out["mask"][200:] == 255).all() and (out["mask"][:, 300:] == 255).all()
    assert not (out["mask"][:200, :300] == 255).any()
    assert (out["image"][200:] == 0).all() and (out["image"][:, 300:] == 0).all()


def _share_of_top_class(crop: np.ndarray) -> float:
    counts = np.bincount(crop.ravel(), minlength=256)[:255]
    return counts.max() / counts.sum()


def test_cat_max_ratio_avoids_dominated_crops() -> None:
    label = np.zeros((400, 400), np.uint8)
    label[200:, 200:] = 1  # one corner of class 1; 43% of the 256-crops give class 0 a share < 0.75
    image = np.zeros((400, 400, 3), np.uint8)

    def bad_crops(ratio: float) -> int:
        crop = CatMaxRatioCrop((256, 256), cat_max_ratio=ratio)
        crop.set_random_seed(0)
        shares = [_share_of_top_class(crop(image=image, mask=label)["mask"]) for _ in range(50)]
        return sum(s >= 0.75 for s in shares)

    assert bad_crops(0.75) <= 1  # 11 draws fail with probability 0.57^11 = 0.2%
    assert bad_crops(1.0) >= 15  # without the check most crops are dominated
    # a label that no crop can satisfy still gives a crop of the right size
    crop = CatMaxRatioCrop((256, 256))
    out = crop(image=image, mask=np.zeros_like(label))
    assert out["mask"].shape == (256, 256) and out["image"].shape == (256, 256, 3)


def test_photometric_distortion_steps() -> None:
    image = np.random.default_rng(0).integers(40, 200, (16, 16, 3), dtype=np.uint8)
    distort = PhotometricDistortion()
    np.testing.assert_array_equal(distort.apply(image, brightness=10.0), image + 10)
    np.testing.assert_array_equal(distort.apply(image, contrast=0.5), (image * 0.5).astype(np.uint8))
    import cv2

    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    shifted = cv2.cvtColor(distort.apply(image, hue=18), cv2.COLOR_RGB2HSV)
    hue_change = (shifted[..., 0].astype(int) - hsv[..., 0]) % 180
    assert np.median(hue_change) == 18
    assert np.array_equal(distort.apply(image), image)  # no step drawn: unchanged
    # each step fires with p = 0.5
    distort.set_random_seed(0)
    draws = [distort.get_params() for _ in range(400)]
    for key in ("brightness", "contrast", "saturation", "hue"):
        rate = np.mean([d[key] is not None for d in draws])
        assert 0.42 < rate < 0.58, key
    assert all(-32 <= d["brightness"] <= 32 for d in draws if d["brightness"] is not None)
    assert all(-18 <= d["hue"] <= 18 for d in draws if d["hue"] is not None)


def test_flip_moves_image_and_mask_together() -> None:
    image = np.full((64, 96, 3), (100, 120, 140), np.uint8)  # coloured, mid-range: every step shows
    image[:, :10] = (230, 220, 210)  # bright stripe on the left
    label = np.tile(np.arange(96, dtype=np.uint8) // 12, (64, 1))  # classes 0..7, left to right
    # crop = the whole 64x96 image (padded to 96x96 below it), so only flip and photometric change it
    pipeline = train_transform(96, scale=(96, 64), ratio_range=(1.0, 1.0), cat_max_ratio=1.0, seed=0)
    flips, changed = 0, 0
    for _ in range(30):
        out = pipeline(image=image, mask=label)
        mask, img = out["mask"][:64], out["image"][:64].mean(axis=(0, 2))
        flipped = np.array_equal(mask, label[:, ::-1])
        assert flipped or np.array_equal(mask, label)
        bright_left = img[:10].mean() > img[-10:].mean()
        assert bright_left != flipped  # the image follows the mask
        expected = (image.astype(np.float32)[:, ::-1] if flipped else image) - IMAGENET_MEAN
        changed += not np.allclose(out["image"][:64], expected / np.array(IMAGENET_STD), atol=1e-3)
        flips += flipped
    assert 8 <= flips <= 22
    assert changed >= 20  # the photometric distortion altered most samples (1 - 1/16 expected)


# ---------------------------------------------------------------- workers


def _worker_images(dataset: SegmentationFolder, init_fn) -> list[torch.Tensor]:
    torch.manual_seed(0)
    loader = DataLoader(dataset, batch_size=1, sampler=[0, 0, 0, 0], num_workers=2, worker_init_fn=init_fn)
    return [batch["image"][0] for batch in loader]


def test_workers_draw_different_and_reproducible_augmentations(tmp_path: Path) -> None:
    write_pair(tmp_path, "training", "a", blocks(120, 160, [1, 2, 3]))
    dataset = SegmentationFolder(tmp_path, "training", train_transform(64, scale=(160, 120)))
    first = _worker_images(dataset, seed_worker)  # batches 0, 2 from worker 0; 1, 3 from worker 1
    assert not torch.equal(first[0], first[1])
    again = _worker_images(dataset, seed_worker)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # same torch seed, same crops
    unseeded = _worker_images(dataset, None)  # the trap: forked workers share one random state
    assert torch.equal(unseeded[0], unseeded[1])


# ---------------------------------------------------------------- data set errors


def test_dataset_sample_and_zero_label_mapping(tmp_path: Path) -> None:
    label = np.array([[0, 1], [150, 255]], np.uint8).repeat(20, 0).repeat(20, 1)
    write_pair(tmp_path, "training", "x", label)
    sample = SegmentationFolder(tmp_path, "training")[0]
    assert sample["image"].shape == (3, 40, 40) and sample["image"].dtype == torch.float32
    assert sample["mask"].dtype == torch.int64
    assert sample["mask"][::20, ::20].tolist() == [[255, 0], [149, 255]]
    raw = SegmentationFolder(tmp_path, "training", num_classes=151, reduce_zero_label=False)[0]
    assert raw["mask"][::20, ::20].tolist() == [[0, 1], [150, 255]]


def test_dataset_errors_name_the_file(tmp_path: Path) -> None:
    ok = blocks(40, 50, [1, 2])
    write_pair(tmp_path, "training", "good", ok)

    write_pair(tmp_path, "missing", "good", ok)
    write_pair(tmp_path, "missing", "no_image", ok)
    (tmp_path / "images" / "missing" / "no_image.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 label maps have no image in .*images/missing: no_image"):
        SegmentationFolder(tmp_path, "missing")
    write_pair(tmp_path, "missing2", "good", ok)
    write_pair(tmp_path, "missing2", "no_label", ok)
    (tmp_path / "annotations" / "missing2" / "no_label.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images have no label map in .*/missing2: no_label"):
        SegmentationFolder(tmp_path, "missing2")

    cases = {}
    image, label = write_pair(tmp_path, "size", "wrong_size", ok, image_size=(40, 60))
    cases["size"] = (re.escape(str(label)) + ".*" + re.escape(str(image)), "50x40")
    _, label = write_pair(tmp_path, "value", "big_value", np.full((40, 50), 200))
    cases["value"] = (re.escape(str(label)), r"\[200\]")
    _, label = write_pair(tmp_path, "rgb", "rgb_label", ok)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(label)
    cases["rgb"] = (re.escape(str(label)), "mode RGB")
    image, _ = write_pair(tmp_path, "corrupt", "truncated", ok)
    image.write_bytes(image.read_bytes()[:300])
    cases["corrupt"] = (re.escape(str(image)), "cannot decode")
    image, _ = write_pair(tmp_path, "text", "text_as_jpg", ok)
    image.write_text("this is not an image")
    cases["text"] = (re.escape(str(image)), "cannot decode")
    for split, patterns in cases.items():
        dataset = SegmentationFolder(tmp_path, split)
        for pattern in patterns:
            with pytest.raises(ValueError, match=pattern):
                dataset[0]

    (tmp_path / "images" / "empty").mkdir()
    (tmp_path / "annotations" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "images" / "empty"))):
        SegmentationFolder(tmp_path, "empty")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "images" / "nosplit"))):
        SegmentationFolder(tmp_path, "nosplit")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SegmentationFolder(tmp_path / "nowhere", "training")


# ---------------------------------------------------------------- prediction inputs


def test_image_folder_converts_modes_and_skips_non_images(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.full((20, 30, 4), 200, np.uint8), mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((20, 30), 90, np.uint8), mode="L").save(tmp_path / "sub" / "grey.bmp")
    Image.fromarray(np.full((20, 30), 65535, np.uint16)).save(tmp_path / "deep.png")
    rotated = Image.fromarray(np.zeros((20, 30, 3), np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "fake.jpg").write_text("not a jpeg")
    with pytest.warns(UserWarning) as record:
        folder = ImageFolder(tmp_path)
    messages = " ".join(str(w.message) for w in record)
    assert "notes.txt" in messages and "fake.jpg" in messages
    samples = {folder[i]["path"]: folder[i] for i in range(len(folder))}
    assert sorted(samples) == ["deep.png", "rgba.png", "rotated.jpg", "sub/grey.bmp"]
    assert samples["rotated.jpg"]["orig_size"].tolist() == [30, 20]  # EXIF transpose applied
    assert samples["rgba.png"]["image"].shape == (3, 20, 30)
    assert samples["sub/grey.bmp"]["image"][:, 0, 0].tolist() == [90.0, 90.0, 90.0]
    assert read_rgb(tmp_path / "deep.png")[0, 0].tolist() == [255, 255, 255]
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        (tmp_path / "empty_dir").mkdir()
        ImageFolder(tmp_path / "empty_dir")


# ---------------------------------------------------------------- prepare


def _planted(root: Path) -> None:
    """4 good training pairs plus 5 planted problems; 2 good validation pairs."""
    for i in range(4):
        write_pair(root, "training", f"ok_{i}", blocks(30, 40, [0, 1, 150], seed=i))
    write_pair(root, "training", "lost_label", blocks(30, 40, [1]))
    (root / "annotations" / "training" / "lost_label.png").unlink()
    write_pair(root, "training", "lost_image", blocks(30, 40, [1]))
    (root / "images" / "training" / "lost_image.jpg").unlink()
    write_pair(root, "training", "value_200", np.full((30, 40), 200))
    write_pair(root, "training", "bad_size", blocks(30, 40, [1]), image_size=(31, 40))
    _, label = write_pair(root, "training", "rgb_label", blocks(30, 40, [1]))
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(label)
    for i in range(2):
        write_pair(root, "validation", f"val_{i}", blocks(30, 40, [2, 5], seed=i))


def test_prepare_reports_planted_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "ADEChallengeData2016"
    _planted(root)
    report = verify(root)
    assert report.counts == {"training": (8, 8), "validation": (2, 2)}
    assert dict(report.kinds()) == {"count": 2, "missing label": 1, "missing image": 1, "label values": 1,
                                    "size mismatch": 1, "label mode": 1}
    assert prepare_main([str(root), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    for name in ("lost_label.jpg", "lost_image.png", "value_200.png", "bad_size.png", "rgb_label.png"):
        assert name in out
    assert "8 images and 8 label maps, expected 20210 each" in out
    assert "summary: 7 problems" in out

    clean = tmp_path / "clean"
    for i in range(3):
        write_pair(clean, "training", f"t{i}", blocks(30, 40, [0, 150], seed=i))
    write_pair(clean, "validation", "v0", blocks(30, 40, [3]))
    assert prepare_main([str(clean), "--skip-count-check", "--workers", "1"]) == 0
    assert "summary: OK" in capsys.readouterr().out
    assert prepare_main([str(tmp_path / "missing.zip")]) == 2


def test_prepare_extracts_zip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "src" / "ADEChallengeData2016"
    _planted(source)
    archive = tmp_path / "ADEChallengeData2016.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.rglob("*")):
            zf.write(path, path.relative_to(source.parent).as_posix())
        zf.writestr("__MACOSX/._junk", "x")
    out_dir = tmp_path / "data"
    assert prepare_main([str(archive), "--out", str(out_dir), "--skip-count-check", "--workers", "1"]) == 1
    assert len(list((out_dir / "ADEChallengeData2016" / "images" / "training").iterdir())) == 8
    assert not (out_dir / "__MACOSX").exists()
    out = capsys.readouterr().out
    assert "summary: 5 problems" in out and "value_200.png" in out
    (tmp_path / "bad.zip").write_text("not a zip")
    assert prepare_main([str(tmp_path / "bad.zip"), "--out", str(out_dir)]) == 2
