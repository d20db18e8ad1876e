"""seg.serve.export: strict torch.export with dynamic H x W, and ONNX (onnxruntime) equal to eager at other sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import seg  # noqa: F401  (registers the encoders)
from seg.data.spec import DatasetSpec
from seg.kernels import set_backend
from seg.model.layers import FocusedLinearAttention
from seg.model.segmentor import Segmentor
from seg.serve.export import (
    WholeImage,
    export_onnx,
    export_program,
    export_supported,
    load_predictor,
    load_segmentor,
    preprocessing,
)
from seg.serve.predictor import Predictor

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _segmentor(encoder: str, decoder: str, **encoder_kwargs) -> Segmentor:
    torch.manual_seed(0)
    model = Segmentor(encoder, decoder, num_classes=5, decoder_channels=16, aux_head=False,
                      encoder_kwargs=encoder_kwargs or None)
    return set_backend(model, "reference").eval()


def _check_onnx(model: Segmentor, path, sizes) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    for h, w in sizes:
        image = torch.randn(1, 3, h, w)
        with torch.no_grad():
            expected = model(image)["out"].numpy()
        (got,) = session.run(None, {"image": image.numpy()})
        assert got.shape == (1, 5, h, w)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def _check(encoder: str, decoder: str, trace: tuple[int, int], sizes, tmp_path, **encoder_kwargs) -> None:
    model = _segmentor(encoder, decoder, **encoder_kwargs)
    program = export_program(model, torch.randn(1, 3, *trace))
    image = torch.randn(1, 3, *sizes[0])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(image), model(image)["out"], atol=1e-5, rtol=0)
    _check_onnx(model, export_onnx(program, tmp_path / "model.onnx"), sizes)


def test_pvt_v2_semantic_fpn_dynamic_sizes(tmp_path):
    """Traced at 64 x 96, run at 96 x 64 and a size that is no multiple of 32 (strict program and ONNX); a
    torch whose exporter cannot trace the models (torch 2.4) refuses with the reason instead."""
    if not export_supported():
        for dynamic in (True, False):
            with pytest.raises(RuntimeError, match="cannot export these models.*upgrade torch"):
                export_program(_segmentor("test_flatten_pvt_v2", "semantic_fpn"), torch.randn(1, 3, 64, 96),
                               dynamic=dynamic)
        return
    _check("test_flatten_pvt_v2", "semantic_fpn", (64, 96), [(96, 64), (75, 101)], tmp_path)


@pytest.mark.slow
def test_pvt_v1_semantic_fpn_dynamic_sizes(tmp_path):
    _check("test_flatten_pvt", "semantic_fpn", (64, 96), [(96, 64), (75, 101)], tmp_path)


# UperNet's pyramid pooling averages the stride-32 map into 6 x 6 cells; the exported adaptive pooling needs
# at least that many tokens (inputs of 192 pixels or more a side, as every real segmentation input is)
UPERNET_TRACE, UPERNET_SIZES = (192, 256), [(256, 192), (203, 229)]


@pytest.mark.slow
def test_swin_linear_upernet_dynamic_sizes(tmp_path):
    """Swin with focused linear attention in every stage: any size."""
    _check("test_flatten_swin", "upernet", UPERNET_TRACE, UPERNET_SIZES, tmp_path, attn_type="LLLL")


@pytest.mark.slow
def test_swin_windows_upernet_static(tmp_path):
    """Swin's default LLSS exports at a fixed size; a dynamic export is refused with the reason."""
    model = _segmentor("test_flatten_swin", "upernet")
    with pytest.raises(ValueError, match="window attention"):
        export_program(model, torch.randn(1, 3, 64, 96))
    program = export_program(model, torch.randn(1, 3, 64, 96), dynamic=False)
    _check_onnx(model, export_onnx(program, tmp_path / "model.onnx"), [(64, 96)])


@pytest.mark.slow
def test_soft_upernet_dynamic_sizes(tmp_path):
    _check("test_soft", "upernet", UPERNET_TRACE, UPERNET_SIZES, tmp_path)


def test_cli_builds_from_config_and_checkpoint(tmp_path):
    """load_segmentor parses the config like cli.py (no data or logs written) and loads a task checkpoint."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model:\n  model:\n    class_path: seg.model.Segmentor\n    init_args:\n"
        "      encoder: test_flatten_pvt_v2\n      decoder: semantic_fpn\n      decoder_channels: 16\n"
        "      aux_head: false\n"
        f"data:\n  root: {tmp_path / 'data'}\n  spec:\n    num_classes: 5\n"
    )
    reference = _segmentor("test_flatten_pvt_v2", "semantic_fpn")
    state = {f"model.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 0}, tmp_path / "best.ckpt")
    model = load_segmentor([str(config)], str(tmp_path / "best.ckpt"))
    assert model.num_classes == 5 and not model.training
    assert all(m.attn_backend == "reference" for m in model.modules() if isinstance(m, FocusedLinearAttention))
    image = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(WholeImage(model)(image), reference(image)["out"])
    assert not (tmp_path / "data").exists()


def test_saved_model_with_its_preprocessing(tmp_path):
    """--pretrained: the saved model on the reference backend, and the input the graph expects, in words."""
    reference = _segmentor("test_flatten_pvt_v2", "semantic_fpn")
    spec = DatasetSpec(num_classes=5, test_scale=(640, 160), mean=(100, 110, 120))
    Predictor(reference, spec).save_pretrained(tmp_path / "saved")
    predictor = load_predictor(pretrained=str(tmp_path / "saved"))
    layers = [m for m in predictor.model.modules() if isinstance(m, FocusedLinearAttention)]
    assert all(m.attn_backend == "reference" for m in layers)
    image = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(WholeImage(predictor.model)(image), reference(image)["out"], rtol=0, atol=0)
    assert preprocessing(predictor) == (
        "input: an RGB photo rescaled to fit 640 x 160 (long x short side, keeping its aspect ratio), then "
        "(x - mean) / std per channel on the 8-bit pixel scale, mean (100, 110, 120), std (58.395, 57.12, 57.375)")
    with pytest.raises(ValueError, match="not both"):
        load_predictor(["configs/demo.yaml"], pretrained=str(tmp_path / "saved"))


def test_bin_average_pool_equals_adaptive_average_pool() -> None:
    """The export-friendly pyramid pooling computes PyTorch's adaptive average pooling, shrinking or growing."""
    from seg.serve.export import BinAveragePool2d

    for bins in (1, 2, 3, 6, (2, 5)):
        reference = torch.nn.AdaptiveAvgPool2d(bins)
        pool = torch.nn.AdaptiveAvgPool2d(bins)
        pool.__class__ = BinAveragePool2d
        for size in ((2, 3), (6, 8), (7, 5), (16, 11)):
            x = torch.randn(2, 4, *size, dtype=torch.float64)
            torch.testing.assert_close(pool(x), reference(x), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(("encoder", "decoder", "kwargs"), [
    ("test_pola_pvt", "semantic_fpn", {}),
    ("test_mala", "semantic_fpn", {}),
    ("test_pola_swin", "upernet", {"attn_type": "LLLL"}),
])
def test_mala_and_pola_dynamic_sizes(encoder, decoder, kwargs, tmp_path):
    """Polarity-aware (resized positional encoding) and magnitude-aware linear attention (RoPE from the live
    grid) trace with dynamic H x W; PolaFormer-Swin's window stages (default LLSS) export at a fixed size only."""
    trace, sizes = ((64, 96), [(96, 64), (75, 101)]) if decoder == "semantic_fpn" else (UPERNET_TRACE, UPERNET_SIZES)
    _check(encoder, decoder, trace, sizes, tmp_path, **kwargs)
