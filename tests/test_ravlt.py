"""RAVLT encoders: sizes, features at any size, published-format checkpoints, padding invariance and export."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import seg  # noqa: F401  (registers the encoders)
from seg.model.backbones._weights import CheckpointMismatchError
from seg.model.backbones.ravlt import RAVLT
from seg.model.layers.rala import RALAttention, RoPESoftmaxAttention
from seg.model.segmentor import Segmentor


def _tiny(**kwargs) -> RAVLT:
    torch.manual_seed(0)
    return timm.create_model("test_ravlt", **kwargs).eval()


def _published_state_dict(model: RAVLT) -> dict[str, torch.Tensor]:
    """``model``'s weights as a published classification checkpoint stores them: no output norms, the
    classifier ``head`` as a 1x1 conv."""
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("extra_norms.")}
    state["head.weight"] = state["head.weight"][:, :, None, None]  # (classes, C, 1, 1)
    return state


# (model params with the 1000-class head, backbone params) in millions: /work/shared/SPEC-family.md sections 2-3,
# the published classes instantiated; the README rounds them to 15 / 26 / 48 / 95M
PARAMS = {"ravlt_tiny": (14.90, 13.35), "ravlt_small": (25.59, 24.04), "ravlt_base": (48.24, 46.69),
          "ravlt_large": (95.24, 93.56)}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("ravlt_base", "ravlt_large") else n
                                  for n in PARAMS])
def test_parameter_counts_match_the_published_models(name: str) -> None:
    with torch.device("meta"):
        full = sum(p.numel() for p in timm.create_model(name).parameters()) / 1e6
        backbone = sum(p.numel() for p in timm.create_model(name, features_only=True).parameters()) / 1e6
    assert full == pytest.approx(PARAMS[name][0], rel=0.02)
    assert backbone == pytest.approx(PARAMS[name][1], rel=0.02)


def test_published_layout_head_dims_and_layer_scale() -> None:
    """Stages 1-2 RALA, 3-4 softmax; head dims 64 (tiny) and 96, 96, 64, 64 (base); gamma init per size."""
    with torch.device("meta"):
        tiny, base = (timm.create_model(name, depths=(1, 1, 1, 1)) for name in ("ravlt_tiny", "ravlt_base"))
    kinds = [type(stage.blocks[0].attn) for stage in tiny.layers]
    assert kinds == [RALAttention, RALAttention, RoPESoftmaxAttention, RoPESoftmaxAttention]
    assert [stage.blocks[0].attn.head_dim for stage in tiny.layers] == [64] * 4
    assert [stage.blocks[0].attn.head_dim for stage in base.layers] == [96, 96, 64, 64]
    assert [stage.RoPE.angle.numel() for stage in base.layers] == [48, 48, 32, 32]
    assert isinstance(base.patch_embed.proj[1], torch.nn.BatchNorm2d) and base.patch_embed.proj[0].stride == (2, 2)
    narrow = dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 1, 1))  # values, not shapes
    gammas = lambda name: [s.blocks[0].gamma_1.unique().item() for s in timm.create_model(name, **narrow).layers]
    assert gammas("ravlt_tiny") == gammas("ravlt_small") == [1.0] * 4
    assert gammas("ravlt_base") == pytest.approx([1.0, 1.0, 1e-6, 1e-6])
    assert gammas("ravlt_large") == pytest.approx([1e-6] * 4)


@pytest.mark.parametrize("size", [(32, 32), (37, 53), (97, 141), (64, 200)])
def test_features_at_any_size(size: tuple[int, int]) -> None:
    model = _tiny(features_only=True)
    with torch.no_grad():
        feats = model(torch.randn(2, 3, *size))
    half = lambda hw: (-(-hw[0] // 2), -(-hw[1] // 2))  # every 3x3 stride-2 conv (padding 1) ceil-halves
    expected = [half(half(size))]  # the stem has two
    for _ in range(3):
        expected.append(half(expected[-1]))
    assert [tuple(f.shape[-2:]) for f in feats] == expected
    assert [f.shape[1] for f in feats] == model.feature_info.channels() == [16, 32, 48, 64]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert all(torch.isfinite(f).all() for f in feats)


def test_forward_intermediates_equals_features_only_and_uses_the_extra_norms() -> None:
    model = _tiny(feature_norms=True)
    features = timm.create_model("test_ravlt", features_only=True).eval()
    wanted = features.state_dict()
    features.load_state_dict({f"model.{k}": v for k, v in model.state_dict().items() if f"model.{k}" in wanted})
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(inter, features(x))
        nhwc = model.forward_intermediates(x, indices=[1], output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(nhwc[0], inter[1].permute(0, 2, 3, 1))
        torch.testing.assert_close(final, model.forward_features(x))
        # the features are the stage outputs through extra_norms: a changed norm changes exactly its map
        model.extra_norms["2"].norm.bias.add_(1.0)
        changed = model.forward_intermediates(x, intermediates_only=True)
    assert [not torch.equal(a, b) for a, b in zip(inter, changed, strict=True)] == [False, False, True, False]


def test_classifier_and_gradients() -> None:
    model = _tiny(num_classes=7).train()
    out = model(torch.randn(2, 3, 48, 64))
    assert out.shape == (2, 7)
    out.square().sum().backward()
    assert not hasattr(model, "extra_norms")  # the output norms exist in feature models only
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    x = torch.randn(1, 3, 40, 56)
    grads = []
    for enable in (False, True):
        model = _tiny().train()
        model.set_grad_checkpointing(enable)
        model(x).sum().backward()
        grads.append(model.layers[0].blocks[0].attn.qkvo.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_attn_type_letters() -> None:
    for attn_type in ("vvvv", "SSSS"):  # the published letter and the alphabet's softmax
        model = _tiny(attn_type=attn_type)
        assert all(isinstance(s.blocks[0].attn, RoPESoftmaxAttention) for s in model.layers)
    assert isinstance(_tiny(attn_type="LLSS").layers[1].blocks[0].attn, RALAttention)
    with pytest.raises(ValueError, match="unknown letter.*x"):
        _tiny(attn_type="llvx")


def test_published_checkpoint_loads_strictly(tmp_path: Path) -> None:
    source = _tiny()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "ravlt.pth"
    torch.save({"model": _published_state_dict(source), "epoch": 3}, path)
    model = timm.create_model("test_ravlt", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    fresh = _tiny()
    for name, value in model.state_dict().items():
        expected = fresh.state_dict()[name] if name.startswith("extra_norms.") else source.state_dict()[name]
        torch.testing.assert_close(value, expected, msg=name)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    # another class count keeps the trunk and the model's own head
    other = timm.create_model("test_ravlt", pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(other.layers[3].blocks[0].attn.qkvo.weight, source.layers[3].blocks[0].attn.qkvo.weight)
    assert other.head.weight.shape == (5, 64)


def test_ema_weights_are_taken_when_the_file_holds_them(tmp_path: Path) -> None:
    """timm's file loader prefers ``model_ema`` (documented in checkpoint_filter_fn)."""
    plain, ema = _tiny(), _tiny()
    with torch.no_grad():
        ema.layers[0].blocks[0].gamma_1.fill_(0.5)
    path = tmp_path / "ravlt.pth"
    torch.save({"model": _published_state_dict(plain), "model_ema": _published_state_dict(ema)}, path)
    model = timm.create_model("test_ravlt", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert model.layers[0].blocks[0].gamma_1.unique().item() == 0.5


def test_mismatched_checkpoint_lists_names(tmp_path: Path) -> None:
    state = _published_state_dict(_tiny())
    del state["layers.1.blocks.0.attn.lepe.weight"]
    state["layers.1.blocks.0.attn.qkv.weight"] = torch.zeros(3)
    state["layers.2.RoPE.angle"] = torch.zeros(5)
    path = tmp_path / "wrong.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        timm.create_model("test_ravlt", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    message = str(err.value)
    assert "wrong.pth" in message and "layers.1.blocks.0.attn.lepe.weight" in message
    assert "layers.1.blocks.0.attn.qkv.weight" in message and "layers.2.RoPE.angle: file (5,) vs model (8,)" in message


@pytest.mark.parametrize("decoder", ["semantic_fpn", "upernet"])
def test_logits_equal_with_and_without_64_padded_pixels(decoder: str) -> None:
    torch.manual_seed(0)
    model = Segmentor("test_ravlt", decoder, num_classes=5, decoder_channels=32, aux_head=False).eval()
    x = torch.randn(1, 3, 240, 320)
    padded = F.pad(x, (0, 64, 0, 64))
    with torch.no_grad():
        plain = model(x)["out"]
        with_padding = model(padded, sizes=[(240, 320)])["out"]
    assert with_padding.shape[-2:] == (304, 384)
    torch.testing.assert_close(with_padding[..., :240, :320], plain, rtol=1e-5, atol=1e-5)


def _export_check(decoder: str, trace: tuple[int, int], sizes: list[tuple[int, int]], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import numpy as np
    import onnxruntime as ort

    from seg.kernels import set_backend
    from seg.serve.export import export_onnx, export_program, export_supported

    if not export_supported():
        pytest.skip("this torch cannot export the models")
    torch.manual_seed(0)
    model = Segmentor("test_ravlt", decoder, num_classes=5, decoder_channels=16, aux_head=False)
    model = set_backend(model, "reference").eval()
    program = export_program(model, torch.randn(1, 3, *trace))
    image = torch.randn(1, 3, *sizes[0])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(image), model(image)["out"], atol=1e-5, rtol=0)
    session = ort.InferenceSession(str(export_onnx(program, tmp_path / "model.onnx")),
                                   providers=["CPUExecutionProvider"])
    for h, w in sizes:
        image = torch.randn(1, 3, h, w)
        with torch.no_grad():
            expected = model(image)["out"].numpy()
        (got,) = session.run(None, {"image": image.numpy()})
        assert got.shape == (1, 5, h, w)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow  # about 40 s of CPU to trace and 30 s to convert
def test_semantic_fpn_exports_with_dynamic_sizes(tmp_path: Path) -> None:
    """Traced at 64 x 96, run at 96 x 64 and 75 x 101 (strict program and ONNX): RoPE follows the live size."""
    _export_check("semantic_fpn", (64, 96), [(96, 64), (75, 101)], tmp_path)


@pytest.mark.slow
def test_upernet_exports_with_dynamic_sizes(tmp_path: Path) -> None:
    _export_check("upernet", (192, 256), [(256, 192), (203, 229)], tmp_path)
