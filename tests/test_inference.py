"""Whole, sliding-window and multi-scale inference on tiny deterministic models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser
from torch import Tensor, nn

from seg.model.inference import (
    InferenceConfig,
    multiscale_inference,
    multiscale_sizes,
    run_inference,
    slide_inference,
    slide_windows,
    whole_inference,
)

K = 4


def conv_model(kernel: int, seed: int = 0, symmetric: bool = False) -> nn.Conv2d:
    """A float64 conv 3 -> K; ``kernel=1`` is translation-equivariant, ``kernel=3`` pads with zeros."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, K, kernel, padding=kernel // 2).double().eval()
    if symmetric:  # mirror-symmetric kernel: the model commutes with a horizontal flip
        with torch.no_grad():
            conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    return conv.requires_grad_(False)


class Recorder:
    """Wraps a model and records the batch shape of every forward call."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, x: Tensor) -> Tensor:
        self.shapes.append(tuple(x.shape))
        return self.model(x)


def image(height: int, width: int, batch: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)).double()


def test_slide_windows_follow_mmseg_grid() -> None:
    # h_grids = ceil((10-6)/4)+1 = 2, w_grids = ceil((17-6)/4)+1 = 4; the last window is clamped to the border
    boxes = slide_windows(10, 17, crop_size=6, stride=4)
    starts = [(y1, x1) for y1, _, x1, _ in boxes]
    assert starts == [(y, x) for y in (0, 4) for x in (0, 4, 8, 11)]
    assert all((y2 - y1, x2 - x1) == (6, 6) for y1, y2, x1, x2 in boxes)
    # an image smaller than the crop gives one window of the image size
    assert slide_windows(5, 30, crop_size=(8, 32), stride=4) == [(0, 5, 0, 30)]


def test_slide_visits_the_expected_windows() -> None:
    ys, xs = torch.meshgrid(torch.arange(10.0), torch.arange(17.0), indexing="ij")
    coords = torch.stack([ys, xs, torch.zeros_like(ys)])[None].double()  # (1, 3, H, W): pixel coordinates
    seen = []

    def model(crop: Tensor) -> Tensor:
        seen.append((int(crop[0, 0, 0, 0]), int(crop[0, 1, 0, 0]), tuple(crop.shape[-2:])))
        return crop.new_zeros(crop.shape[0], K, *crop.shape[-2:])

    slide_inference(model, coords, crop_size=6, stride=4)
    assert seen == [(y, x, (6, 6)) for y in (0, 4) for x in (0, 4, 8, 11)]


def test_slide_equals_whole_when_crop_covers_image() -> None:
    model, x = conv_model(3), image(20, 24)
    out = slide_inference(model, x, crop_size=(32, 32), stride=(21, 21))
    assert torch.equal(out, whole_inference(model, x))


def test_slide_of_pointwise_model_equals_whole() -> None:
    model, x = conv_model(1), image(37, 50)
    recorder = Recorder(model)
    out = slide_inference(recorder, x, crop_size=(16, 20), stride=(11, 13), num_classes=K)
    torch.testing.assert_close(out, whole_inference(model, x), rtol=0, atol=1e-12)
    assert len(recorder.shapes) == 3 * 4  # (ceil(21/11) + 1) x (ceil(30/13) + 1) windows
    # a 3x3 conv sees zero padding at window borders, so there the windows really differ from one pass
    conv3 = conv_model(3)
    gap = (slide_inference(conv3, x, crop_size=(16, 20), stride=(11, 13)) - whole_inference(conv3, x)).abs()
    assert gap.max() > 1e-3


def test_batch_windows_match_single_windows() -> None:
    model, x = conv_model(3), image(21, 30)
    one, five = Recorder(model), Recorder(model)
    ref = slide_inference(one, x, crop_size=12, stride=8)
    out = slide_inference(five, x, crop_size=12, stride=8, batch_windows=5)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert len(one.shapes) == 12  # (ceil(9/8) + 1) x (ceil(18/8) + 1) = 3 x 4 windows
    assert [s[0] for s in five.shapes] == [10, 10, 4]  # 5 windows x 2 images per call, then 2 windows


def test_num_classes_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="classes"):
        slide_inference(conv_model(1), image(8, 8), crop_size=4, stride=4, num_classes=K + 1)


def test_out_size_resizes_logits() -> None:
    model, x = conv_model(1), image(20, 28)
    expected = F.interpolate(model(x), size=(31, 45), mode="bilinear", align_corners=False)
    assert torch.equal(whole_inference(model, x, out_size=(31, 45)), expected)
    slid = slide_inference(model, x, crop_size=8, stride=6, out_size=(31, 45))
    torch.testing.assert_close(slid, expected, rtol=0, atol=1e-12)
    assert multiscale_inference(model, x, scales=(0.5, 1.0), out_size=(31, 45)).shape == (2, K, 31, 45)
    assert whole_inference(model, x, out_size=9).shape == (2, K, 9, 9)


def test_whole_resizes_low_resolution_logits_to_input() -> None:
    x = image(16, 24)
    out = whole_inference(lambda t: F.avg_pool2d(conv_model(1)(t), 4), x)
    assert out.shape == (2, K, 16, 24)


def test_single_scale_without_flip_equals_whole() -> None:
    model, x = conv_model(3), image(18, 26)
    whole = whole_inference(model, x)
    out = multiscale_inference(model, x, scales=(1.0,), flip=False)
    torch.testing.assert_close(out, whole.log_softmax(1), rtol=0, atol=1e-12)
    assert torch.equal(out.argmax(1), whole.argmax(1))
    pointwise = conv_model(1)
    slid = multiscale_inference(pointwise, x, scales=(1.0,), flip=False, mode="slide", crop_size=8, stride=5)
    torch.testing.assert_close(slid, whole_inference(pointwise, x).log_softmax(1), rtol=0, atol=1e-12)


def test_flip_with_symmetric_model_changes_nothing() -> None:
    model, x = conv_model(3, symmetric=True), image(18, 26)
    out = multiscale_inference(model, x, scales=(1.0,), flip=True)
    torch.testing.assert_close(out, whole_inference(model, x).log_softmax(1), rtol=0, atol=1e-12)


def test_flip_logits_are_flipped_back() -> None:
    model, x = conv_model(3, seed=2), image(18, 26)
    plain = model(x).softmax(1)
    mirrored = model(x.flip(-1)).flip(-1).softmax(1)
    out = multiscale_inference(model, x, scales=(1.0,), flip=True)
    torch.testing.assert_close(out.softmax(1), (plain + mirrored) / 2, rtol=0, atol=1e-12)
    assert (out.softmax(1) - plain).abs().max() > 1e-3  # the asymmetric model does see the flip


def test_multiscale_averages_resized_probabilities() -> None:
    model, x = conv_model(3), image(20, 27)
    out = multiscale_inference(model, x, scales=(0.5, 1.0), flip=False, out_size=(40, 54))
    half = F.interpolate(x, size=(10, 14), mode="bilinear", align_corners=False)  # int(27 * 0.5 + 0.5) = 14
    probs = [
        F.interpolate(model(view), size=(40, 54), mode="bilinear", align_corners=False).softmax(1)
        for view in (half, x)
    ]
    torch.testing.assert_close(out.softmax(1), (probs[0] + probs[1]) / 2, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(2, 40, 54).double(), rtol=0, atol=1e-12)


def pointwise_two_class(x: Tensor) -> Tensor:
    """A cheap per-pixel model (B, 3, H, W) -> (B, 2, H, W), translation-equivariant like a 1x1 conv."""
    return torch.cat([2 * x[:, :1] - x[:, 1:2], x[:, 2:] + 0.5], dim=1)


def test_large_image_slides_with_bounded_windows() -> None:
    model = pointwise_two_class
    x = torch.randn(1, 3, 3000, 2000, generator=torch.Generator().manual_seed(0))
    recorder = Recorder(model)
    with torch.inference_mode():
        out = slide_inference(recorder, x, crop_size=512, stride=341)
        whole = model(x)
    h_grids = math.ceil((3000 - 512) / 341) + 1
    w_grids = math.ceil((2000 - 512) / 341) + 1
    assert (h_grids, w_grids) == (9, 6)
    assert len(recorder.shapes) == 54
    assert set(recorder.shapes) == {(1, 3, 512, 512)}  # one window per forward, never more than the crop
    assert out.shape == (1, 2, 3000, 2000)
    assert float((out - whole).abs().max()) < 1e-5


def test_run_inference_dispatches_on_config() -> None:
    model, x = conv_model(3), image(20, 26)
    whole = whole_inference(model, x, out_size=(25, 30))
    assert torch.equal(run_inference(model, x, InferenceConfig(), out_size=(25, 30)), whole)
    slide_cfg = InferenceConfig(mode="slide", crop_size=(12, 16), stride=8, batch_windows=2)
    slid = slide_inference(model, x, crop_size=(12, 16), stride=8, out_size=(25, 30))
    torch.testing.assert_close(run_inference(model, x, slide_cfg, (25, 30)), slid, rtol=0, atol=1e-12)
    ms_cfg = InferenceConfig(mode="multiscale", scales=(0.75, 1.25), flip=True)
    ms = multiscale_inference(model, x, scales=(0.75, 1.25), flip=True, out_size=(25, 30))
    assert torch.equal(run_inference(model, x, ms_cfg, (25, 30)), ms)
    flip_cfg = InferenceConfig(mode="slide", crop_size=12, stride=8, flip=True)
    flipped = multiscale_inference(model, x, (1.0,), True, "slide", crop_size=12, stride=8)
    assert torch.equal(run_inference(model, x, flip_cfg), flipped)


def test_inference_config_validates_and_parses_from_yaml_dict() -> None:
    with pytest.raises(ValueError, match="mode"):
        InferenceConfig(mode="slid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scales"):
        InferenceConfig(scales=())
    parser = ArgumentParser()
    parser.add_argument("--inference", type=InferenceConfig, default=InferenceConfig())
    cfg = parser.parse_args(["--inference.mode=slide", "--inference.crop_size=[256, 512]"])
    built = parser.instantiate_classes(cfg).inference
    assert built == InferenceConfig(mode="slide", crop_size=(256, 512))
    with pytest.raises(SystemExit):
        parser.parse_args(["--inference.mode=slid"])


def _recording_model(sizes: list[tuple[int, int]], k: int = 3):
    def model(x: torch.Tensor) -> torch.Tensor:
        sizes.append(tuple(x.shape[-2:]))
        return torch.zeros(x.shape[0], k, *x.shape[-2:])
    return model


def test_multiscale_view_sizes_follow_mmseg_from_the_original_image() -> None:
    """A 300 x 500 original, test box (2048, 512). Scale s fits the original into (int(2048 s), int(512 s)):
    0.5: box (1024, 256), factor min(1024 / 500, 256 / 300) = 0.8533 -> 256 x int(426.67 + 0.5) = 256 x 427;
    1.0: box (2048, 512), factor 1.7067 -> 512 x int(853.33 + 0.5) = 512 x 853 (the test pipeline's own size);
    1.75: box (3584, 896), factor 2.9867 -> 896 x int(1493.33 + 0.5) = 896 x 1493."""
    expected = [(256, 427), (512, 853), (896, 1493)]
    assert multiscale_sizes((300, 500), (0.5, 1.0, 1.75), (2048, 512)) == expected
    sizes: list[tuple[int, int]] = []
    image = torch.randn(1, 3, 512, 853)  # the test-resized image
    cfg = InferenceConfig(mode="multiscale", scales=(0.5, 1.0, 1.75), flip=True)
    out = run_inference(_recording_model(sizes), image, cfg, out_size=(300, 500), image_scale=(2048, 512))
    assert out.shape == (1, 3, 300, 500)
    assert sizes == [size for size in expected for _ in range(2)]  # each scale, then its flip


def test_multiscale_sizes_come_from_the_original_not_the_resized_image() -> None:
    """A wide 200 x 1000 original: the test resize is limited by the long side (factor 2048 / 1000 = 2.048,
    410 x 2048). At 1.75 the box (3584, 896) gives factor 3.584: int(716.8 + 0.5) = 717 rows, where rescaling the
    410-row test image would give int(717.5 + 0.5) = 718."""
    assert multiscale_sizes((200, 1000), (1.0, 1.75), (2048, 512)) == [(410, 2048), (717, 3584)]
    sizes: list[tuple[int, int]] = []
    multiscale_inference(_recording_model(sizes), torch.randn(1, 3, 410, 2048), (1.75,), flip=False)
    assert sizes == [(718, 3584)]  # without image_scale: relative to the input, as before


def test_single_scale_flip_ignores_image_scale() -> None:
    sizes: list[tuple[int, int]] = []
    cfg = InferenceConfig(mode="whole", flip=True)
    run_inference(_recording_model(sizes), torch.randn(1, 3, 40, 60), cfg, out_size=(20, 30), image_scale=(2048, 512))
    assert sizes == [(40, 60), (40, 60)]


def test_task_sizes_multiscale_views_from_the_data_module_test_scale() -> None:
    from types import SimpleNamespace

    from seg.model.segmentor import Segmentor
    from seg.train.task import SegmentationTask

    model = Segmentor("test_flatten_pvt", "semantic_fpn", num_classes=3, aux_head=False)
    task = SegmentationTask(model, inference=InferenceConfig(mode="multiscale", scales=(0.5, 1.0), flip=False))
    assert task._test_scale() is None  # no trainer: views relative to the input
    task._trainer = SimpleNamespace(datamodule=SimpleNamespace(test_scale=(128, 64)))
    assert task._test_scale() == (128, 64)
    sizes: list[tuple[int, int]] = []
    record = _recording_model(sizes)
    model.forward = lambda x: {"out": record(x)}  # type: ignore[method-assign]
    task(torch.randn(1, 3, 64, 107), out_size=(30, 50))
    assert sizes == multiscale_sizes((30, 50), (0.5, 1.0), (128, 64)) == [(32, 53), (64, 107)]
