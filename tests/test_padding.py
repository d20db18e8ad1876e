"""Pixels added only to reach a multiple of the stride never change the logits of real pixels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seg.model.inference import InferenceConfig, run_inference
from seg.model.segmentor import Segmentor

# every encoder family with the decoder of its recipe (small widths so the test runs in seconds)
FAMILIES = [
    ("test_flatten_pvt", "semantic_fpn"),
    ("test_flatten_pvt_v2", "semantic_fpn"),
    ("test_flatten_swin", "upernet"),
    ("test_soft", "upernet"),
    ("test_mala", "semantic_fpn"),
    ("test_pola_pvt", "semantic_fpn"),
    ("test_pola_swin", "upernet"),
]


def _model(encoder: str, decoder: str) -> Segmentor:
    torch.manual_seed(0)
    return Segmentor(encoder, decoder, num_classes=5, decoder_channels=32, aux_head=False).eval()


@pytest.mark.parametrize(("encoder", "decoder"), FAMILIES)
def test_logits_equal_with_and_without_64_padded_pixels(encoder: str, decoder: str) -> None:
    model = _model(encoder, decoder)
    x = torch.randn(1, 3, 480, 640)
    padded = F.pad(x, (0, 64, 0, 64))  # (1, 3, 544, 704): a batch padded to a common size
    with torch.no_grad():
        plain = model(x)["out"]
        with_padding = model(padded, sizes=[(480, 640)])["out"]
    assert with_padding.shape[-2:] == (544, 704)
    torch.testing.assert_close(with_padding[..., :480, :640], plain, rtol=1e-5, atol=1e-5)


def test_batch_of_different_sizes_equals_each_image_alone() -> None:
    model = _model("test_flatten_pvt_v2", "semantic_fpn")
    a, b = torch.randn(1, 3, 70, 101), torch.randn(1, 3, 96, 64)
    batch = torch.cat([F.pad(a, (0, 0, 0, 26)), F.pad(b, (0, 37, 0, 0))])  # (2, 3, 96, 101)
    with torch.no_grad():
        out = model(batch, sizes=[(70, 101), (96, 64)])["out"]
        torch.testing.assert_close(out[:1, :, :70, :101], model(a)["out"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1:, :, :96, :64], model(b)["out"], rtol=1e-5, atol=1e-5)
    assert out[:1, :, 70:].abs().sum() == 0 and out[1:, :, :, 64:].abs().sum() == 0


@pytest.mark.parametrize(
    "cfg",
    [
        InferenceConfig(mode="whole"),
        InferenceConfig(mode="slide", crop_size=64, stride=48),
        InferenceConfig(mode="multiscale", scales=(0.5, 1.25), flip=True),
    ],
    ids=["whole", "slide", "multiscale"],
)
def test_inference_modes_never_pad_the_encoder_input(cfg: InferenceConfig) -> None:
    """Whole, sliding-window and multi-scale inference hand the encoder each view at its own size."""
    model = _model("test_flatten_pvt", "semantic_fpn")
    seen: list[tuple[int, int]] = []
    model.encoder.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    image = torch.randn(1, 3, 90, 141)  # no side a multiple of 32
    with torch.no_grad():
        logits = run_inference(lambda x: model(x)["out"], image, cfg)
    assert logits.shape == (1, 5, 90, 141)
    expected = {
        "whole": {(90, 141)},
        "slide": {(64, 64)},
        "multiscale": {(45, 71), (113, 176)},  # int(side * scale + 0.5)
    }[cfg.mode]
    assert set(seen) == expected


def test_smp_fpn_alone_is_padded_to_32() -> None:
    """smp's FPN upsamples by exact factors of 2, so its input is padded to /32 and the logits cropped."""
    model = Segmentor("test_flatten_pvt", "fpn", num_classes=5, decoder_channels=32, aux_head=False).eval()
    seen: list[tuple[int, int]] = []
    model.encoder.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 70, 101))["out"].shape[-2:] == (70, 101)
    assert seen == [(96, 128)]
