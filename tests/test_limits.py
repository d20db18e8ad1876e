"""Bounded inference: striped resize + argmax equals the full-resolution one; photos above the pixel limit refused."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from seg.data import ade20k
from seg.data.ade20k import ImageFolder, read_rgb
from seg.data.spec import DatasetSpec
from seg.data.transforms import eval_transform
from seg.model.inference import InferenceConfig, run_inference
from seg.model.segmentor import Segmentor
from seg.serve.limits import ImageTooLargeError, labels_at, predict_labels
from seg.serve.predictor import Predictor


def full_argmax(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(dim=1)


@pytest.mark.parametrize(("h", "w", "size"), [(13, 17, (97, 61)), (40, 30, (23, 71)), (8, 8, (8, 40)), (9, 5, (9, 5))])
def test_striped_labels_equal_the_full_resize(h: int, w: int, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 7, h, w)
    full = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # (2, 7, H, W)
    expected = full.argmax(dim=1)
    for budget in (1, 7 * 2 * size[1] * 3, 1 << 24):  # one row per stripe, three rows, everything at once
        got = labels_at(logits, size, max_elements=budget)
        assert got.shape == (2, *size) and got.dtype == torch.int64
        differ = got != expected
        # only near-ties may flip through float rounding: the two classes' full-resolution logits within 1e-5
        picked, wanted = full.gather(1, got[:, None])[:, 0], full.gather(1, expected[:, None])[:, 0]
        assert differ.float().mean() < 1e-3
        assert torch.all((wanted - picked)[differ].abs() < 1e-5)


def test_predict_labels_match_run_inference_for_every_mode() -> None:
    torch.manual_seed(0)
    model = Segmentor("test_flatten_pvt", "semantic_fpn", num_classes=5, aux_head=False).eval()
    x = torch.randn(1, 3, 64, 96)
    for cfg in (InferenceConfig(), InferenceConfig("slide", 48, 32), InferenceConfig(flip=True)):
        with torch.inference_mode():
            got = predict_labels(lambda t: model(t)["out"], x, cfg, (150, 230), (96, 64))
            full = run_inference(lambda t: model(t)["out"], x, cfg, (150, 230), (96, 64))
        expected = full.argmax(dim=1)
        assert got.shape == (1, 150, 230)
        assert (got != expected).float().mean() < 1e-3


def test_predictor_refuses_photos_above_its_pixel_limit() -> None:
    torch.manual_seed(0)
    model = Segmentor("test_flatten_pvt", "semantic_fpn", num_classes=3, aux_head=False).eval()
    predictor = Predictor(model, DatasetSpec(num_classes=3, test_scale=(64, 32)), max_pixels=40 * 30)
    assert predictor.predict(np.zeros((30, 40, 3), np.uint8)).shape == (30, 40)
    with pytest.raises(ImageTooLargeError, match=r"image is 41 x 30 = 0.0 MP, above the limit"):
        predictor.predict(np.zeros((30, 41, 3), np.uint8))
    assert Predictor(model).max_pixels == 40_000_000


def test_pixel_bomb_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small PNG declaring 9400 x 9400 pixels: refused from its header, naming the file, in bounded memory."""
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9400, 9400)).save(bomb, optimize=True)  # 1-bit zeros: a few KB on disk, 88 MP declared
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "ok.png")
    assert bomb.stat().st_size < 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = ImageFolder(tmp_path, eval_transform((64, 32)))
    decoded = []
    monkeypatch.setattr(ade20k, "read_rgb", lambda path, **kw: decoded.append(path) or read_rgb(path, **kw))
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match=rf"{bomb} is 9400 x 9400 = 88.4 MP, above the limit of 40.0 MP"):
        folder[folder.files.index(bomb)]
    assert time.perf_counter() - start < 1.0 and decoded == []  # refused from the header: 265 MB never decoded
    assert tuple(folder[folder.files.index(tmp_path / "ok.png")]["orig_size"]) == (20, 30)
    assert decoded == [tmp_path / "ok.png"]
