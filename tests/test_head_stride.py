"""The opt-in for the heads' stride-4 logits: ``Segmentor(..., full_size=False)`` and the predictor's use of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seg.model.segmentor import Segmentor
from seg.serve.predictor import Predictor


@pytest.fixture(scope="module")
def model() -> Segmentor:
    torch.manual_seed(0)
    return Segmentor("test_flatten_pvt_v2", decoder="segformer", num_classes=6, aux_head=False).eval()


def test_full_size_is_the_resized_head_logits(model: Segmentor) -> None:
    x = torch.randn(2, 3, 96, 72)
    with torch.no_grad():
        coarse = model(x, full_size=False)["out"]
        full = model(x)["out"]
    assert coarse.shape == (2, 6, 24, 18)
    torch.testing.assert_close(full, F.interpolate(coarse, size=(96, 72), mode="bilinear", align_corners=False))


def test_head_stride_refuses_sizes_and_padded_inputs(model: Segmentor) -> None:
    with pytest.raises(ValueError, match="one image size"):
        model(torch.randn(2, 3, 64, 64), sizes=[(64, 64), (32, 48)], full_size=False)
    fpn = Segmentor("test_flatten_pvt_v2", decoder="fpn", num_classes=3, aux_head=False).eval()
    with pytest.raises(ValueError, match="divisible by 32"):
        fpn(torch.randn(1, 3, 70, 64), full_size=False)


def test_predictor_takes_the_head_logits_when_asked(model: Segmentor, monkeypatch) -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(150, 200, 3), dtype=np.uint8)
    default = Predictor(model).predict(image)
    calls: list[bool] = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x, *a, **k: calls.append(k.get("full_size", True)) or
                        forward(x, *a, **k))
    coarse = Predictor(model, head_stride_logits=True).predict(image)
    assert calls == [False]
    assert coarse.shape == default.shape == (150, 200)
    assert (coarse == default).mean() > 0.9  # one bilinear resize instead of two: boundaries may move
