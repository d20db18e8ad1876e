"""Prediction files: label PNGs at the input's size with ADE20K ids, overlays with a legend, odd image formats."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from _specs import DEMO_SMALL, spec_arg
from PIL import Image

from seg.data import DEMO_CLASS_NAMES, SegmentationDataModule, make_demo_dataset, make_palette, read_rgb
from seg.model.segmentor import Segmentor
from seg.serve.writers import blend_labels, draw_legend, make_overlay, output_paths
from seg.train.callbacks.prediction_writer import SegmentationWriter
from seg.train.callbacks.report import SegmentationReport
from seg.train.cli import cli_main
from seg.train.task import SegmentationTask

CONFIGS = Path(__file__).parents[1] / "configs"

# relative path -> (H, W) as an image viewer shows it (EXIF applied)
EXPECTED_SIZES = {
    "rgb.jpg": (37, 53),
    "grey/scan.png": (45, 31),
    "grey/deep/er/rgba.png": (40, 40),
    "depth16.png": (33, 47),
    "phone/exif_rotated.jpg": (52, 28),  # stored 28 x 52 (H x W), orientation 6: shown rotated by 90 degrees
}


def smooth(rng: np.random.Generator, h: int, w: int, channels: int, high: int = 255) -> np.ndarray:
    """A smooth random picture (a 3x3 grid of random values upsampled): JPEG keeps it close to the original."""
    small = rng.uniform(0, high, (3, 3, channels))
    ys, xs = np.linspace(0, 2, h), np.linspace(0, 2, w)
    y0, x0 = np.minimum(ys.astype(int), 1), np.minimum(xs.astype(int), 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = small[y0][:, x0] * (1 - fx) + small[y0][:, x0 + 1] * fx
    bottom = small[y0 + 1][:, x0] * (1 - fx) + small[y0 + 1][:, x0 + 1] * fx
    picture = (top * (1 - fy) + bottom * fy).round()  # (h, w, channels)
    return picture[:, :, 0] if channels == 1 else picture


def make_inputs(folder: Path) -> Path:
    """One file per odd format, nested folders, and a file that is not an image."""
    rng = np.random.default_rng(0)
    for sub in ("grey/deep/er", "phone"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(smooth(rng, 37, 53, 3).astype(np.uint8)).save(folder / "rgb.jpg")
    Image.fromarray(smooth(rng, 45, 31, 1).astype(np.uint8), mode="L").save(folder / "grey/scan.png")
    rgba = smooth(rng, 40, 40, 4).astype(np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(folder / "grey/deep/er/rgba.png")
    Image.fromarray(smooth(rng, 33, 47, 1, high=65535).astype(np.uint16)).save(folder / "depth16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(smooth(rng, 28, 52, 3).astype(np.uint8)).save(folder / "phone/exif_rotated.jpg", exif=exif)
    (folder / "grey" / "readme.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def task() -> SegmentationTask:
    torch.manual_seed(0)
    model = Segmentor("test_flatten_pvt", "semantic_fpn", num_classes=12, aux_head=False)
    return SegmentationTask(model, spec=DEMO_SMALL).eval()


def predict(task: SegmentationTask, inputs: Path, writer: SegmentationWriter) -> dict[str, np.ndarray]:
    """Run a real Trainer.predict; returns the label maps it produced, by relative path."""
    dm = SegmentationDataModule(root=str(inputs), spec=DEMO_SMALL, num_workers=0, predict_root=str(inputs))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[writer], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    outputs = trainer.predict(task, datamodule=dm)
    return {path: out["labels"][0].numpy() for out in outputs for path in out["path"]}


@pytest.fixture(scope="module")
def written(task: SegmentationTask, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    inputs = make_inputs(tmp_path_factory.mktemp("inputs"))
    out = tmp_path_factory.mktemp("out") / "predictions"
    with pytest.warns(UserWarning, match="readme.txt: not an image file"):
        labels = predict(task, inputs, SegmentationWriter(str(out)))
    return inputs, out, labels


def test_writes_one_label_png_and_overlay_per_image(written: tuple[Path, Path, dict]) -> None:
    _, out, labels = written
    assert set(labels) == set(EXPECTED_SIZES)  # the text file was skipped
    expected = {p for rel in EXPECTED_SIZES for p in output_paths(out, rel)}
    assert {p for p in out.rglob("*") if p.is_file()} == expected  # nothing else, sub-folders kept
    assert (out / "grey/deep/er/rgba.png").is_file() and (out / "phone/exif_rotated_overlay.jpg").is_file()


@pytest.mark.parametrize("relative", sorted(EXPECTED_SIZES))
def test_label_png_has_input_size_and_ade_ids(written: tuple[Path, Path, dict], relative: str) -> None:
    _, out, labels = written
    label_path, _ = output_paths(out, relative)
    with Image.open(label_path) as img:
        assert img.mode == "L"
        saved = np.asarray(img)
    assert saved.shape == EXPECTED_SIZES[relative]
    np.testing.assert_array_equal(saved, labels[relative].astype(np.int64) + 1)  # class k saved as k + 1
    assert saved.min() >= 1 and saved.max() <= 12


@pytest.mark.parametrize("relative", sorted(EXPECTED_SIZES))
def test_overlay_is_the_blended_original_with_a_legend_below(written: tuple[Path, Path, dict], relative: str) -> None:
    inputs, out, labels = written
    _, overlay_path = output_paths(out, relative)
    overlay = np.asarray(Image.open(overlay_path).convert("RGB")).astype(np.float64)
    h, w = EXPECTED_SIZES[relative]
    areas = np.bincount(labels[relative].ravel(), minlength=12)
    present = [int(k) for k in np.argsort(-areas, kind="stable") if areas[k] > 0]  # legend order: largest first
    legend = draw_legend(w, present, DEMO_CLASS_NAMES, make_palette(12))
    assert overlay.shape == (h + legend.shape[0], w, 3)  # same width, taller by the legend band
    assert legend.shape[0] > 12
    expected = blend_labels(read_rgb(inputs / relative), labels[relative], make_palette(12), 0.5)
    error = np.abs(overlay[:h] - expected).mean()
    assert error < 12  # JPEG noise only: the original pixels, in the displayed orientation
    assert error < 0.5 * np.abs(overlay[:h] - expected[::-1, ::-1]).mean()  # the rotated original is far off
    assert overlay[h:].mean() > 150  # the legend band is mostly white


def test_label_ids_with_offset_zero_and_no_overlay(task: SegmentationTask, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(inputs / "flat.png")
    labels = predict(task, inputs, SegmentationWriter(str(tmp_path / "out"), overlay=False, id_offset=0))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["flat.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out/flat.png")), labels["flat.png"])


def test_two_inputs_with_one_stem_are_refused(task: SegmentationTask, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.jpg", "a.png"):
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(inputs / name)
    with pytest.raises(ValueError, match=r"a\.jpg and .*a\.png would both be written as a\.png"):
        predict(task, inputs, SegmentationWriter(str(tmp_path / "out")))


def test_blend_and_legend_numbers() -> None:
    image = np.full((2, 3, 3), 100, np.uint8)
    labels = np.array([[0, 1, 1], [1, 0, 0]])
    palette = np.array([[0, 0, 0], [200, 100, 0]], np.uint8)
    blended = blend_labels(image, labels, palette, alpha=0.25)
    np.testing.assert_array_equal(blended[0, 0], [75, 75, 75])
    np.testing.assert_array_equal(blended[0, 1], [125, 100, 75])
    np.testing.assert_array_equal(blend_labels(image, labels, palette, alpha=0.0), image)
    names = [f"class number {i}" for i in range(12)]
    one_row = draw_legend(800, [0, 1], names, make_palette(12), font_size=16)
    wrapped = draw_legend(800, list(range(12)), names, make_palette(12), font_size=16)
    assert one_row.shape[1] == wrapped.shape[1] == 800
    line, pad, gap = 16 + 5, 8, 5  # swatch + gap per row; band padding
    assert one_row.shape[0] == 2 * pad + line - gap
    rows = (wrapped.shape[0] - 2 * pad + gap) / line
    assert rows == int(rows) and rows >= 2  # 12 names do not fit one 800-px row
    swatch = wrapped[8 + 8, 8 + 8]  # centre of the first swatch (padding 8, size 16)
    np.testing.assert_array_equal(swatch, make_palette(12)[0])
    assert make_overlay(image, labels, ["a", "b"], palette, legend=False).shape == (2, 3, 3)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="alpha must be in"):
        SegmentationWriter("out", alpha=1.5)
    with pytest.raises(ValueError, match="id_offset must be in"):
        SegmentationWriter("out", id_offset=-1)


def test_cli_predict_writes_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = make_demo_dataset(tmp_path / "tiny", num_train=2, num_val=2, min_size=64, max_size=96)
    photos = tmp_path / "photos"
    (photos / "holiday").mkdir(parents=True)
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(photos / "holiday" / "beach.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli_main([
            "predict", "--config", str(CONFIGS / "demo.yaml"),
            "--model.model.init_args.encoder=test_flatten_pvt", f"--data.root={root}", "--data.demo=false",
            "--data.num_workers=0", spec_arg(DEMO_SMALL), f"--data.predict_root={photos}",
            "--trainer.callbacks+=seg.train.callbacks.prediction_writer.SegmentationWriter",
            "--trainer.callbacks.output_dir=predictions",
            "--return_predictions=false",
        ])
    with Image.open(tmp_path / "predictions/holiday/beach.png") as img:
        assert img.size == (50, 30) and 1 <= np.asarray(img).min() <= np.asarray(img).max() <= 12
    with Image.open(tmp_path / "predictions/holiday/beach_overlay.jpg") as img:
        assert img.width == 50 and img.height > 30


@pytest.mark.slow
def test_ddp_ranks_write_their_own_images(tmp_path: Path) -> None:
    """Two gloo processes: every input written exactly once; the report (rank 0) in the same spawned run (~70 s)."""
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    for i in range(5):
        folder = inputs / "sub" if i % 2 else inputs
        Image.fromarray(np.full((20 + i, 30, 3), 40 * i, np.uint8)).save(folder / f"im{i}.png")
    root = make_demo_dataset(tmp_path / "tiny", num_train=2, num_val=3, min_size=64, max_size=96)
    dm = SegmentationDataModule(str(root), spec=DEMO_SMALL, num_workers=0, predict_root=str(inputs))
    model = Segmentor("test_flatten_pvt", "semantic_fpn", num_classes=12, aux_head=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                         callbacks=[SegmentationWriter(str(tmp_path / "out")),
                                    SegmentationReport(output_dir=str(tmp_path / "report"))],
                         enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = SegmentationTask(model, spec=DEMO_SMALL)
        trainer.predict(task, datamodule=dm, return_predictions=False)
        trainer.validate(task, datamodule=dm)
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["im0.png", "im2.png", "im4.png", "sub/im1.png", "sub/im3.png"]
    for i in range(5):
        with Image.open(tmp_path / "out" / ("sub" if i % 2 else "") / f"im{i}.png") as img:
            assert img.size == (30, 20 + i)
    assert (tmp_path / "report" / "metrics.json").is_file() and (tmp_path / "report" / "confusion.png").is_file()
