"""MALA and PolaFormer: the attention maths against direct quadratic forms, the float32 islands, the encoders'
shapes at any size, the letters of ``attn_type``, and the checkpoint rule that tells MALA from RAVLT."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import seg  # noqa: F401  (registers the encoders)
from seg.model.backbones._weights import CheckpointMismatchError
from seg.model.layers import (
    MALAttention,
    PolaLinearAttention,
    RALAttention,
    RoPE,
    RoPESoftmaxAttention,
    apply_rope,
    magnitude_aware_linear_attention,
    polarity_aware_linear_attention,
)
from seg.model.layers.softmax import SpatialReductionAttention
from seg.model.layers.window import WindowAttention


def _mala_scores(q: torch.Tensor, k: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """The N x N score matrix MALA's linear form stands for: beta_i (s / N) rope(q_i) . rope(k_j) - z_i / N."""
    q, k = F.elu(q) + 1, F.elu(k) + 1
    N, d = k.shape[-2:]
    s = d**-0.5
    z = s * q @ k.mean(-2, keepdim=True).transpose(-2, -1)  # (B, h, N, 1)
    dots = apply_rope(q, sin, cos) @ apply_rope(k, sin, cos).transpose(-2, -1)  # (B, h, N, N)
    return (1 + 1 / (z + 1e-6)) * (s / N) * dots - z / N


def test_mala_equals_its_quadratic_form_and_rows_sum_to_one_without_rope() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 35, 8, dtype=torch.float64).unbind(0)
    sin, cos = (t.double() for t in RoPE(8)((5, 7)))
    out = magnitude_aware_linear_attention(q, k, v, sin, cos)
    torch.testing.assert_close(out, _mala_scores(q, k, sin, cos) @ v, rtol=1e-10, atol=1e-10)
    zero, one = torch.zeros_like(sin), torch.ones_like(cos)  # no rotation: every row of scores sums to 1
    rows = _mala_scores(q, k, zero, one).sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=1e-5, atol=1e-5)
    # the score offset uses the un-rotated features: rotating them first would change the output
    assert not torch.allclose(out, magnitude_aware_linear_attention(q, k, v, zero, one))


def test_pola_equals_its_quadratic_form() -> None:
    torch.manual_seed(0)
    B, h, N, n, d, alpha = 2, 3, 20, 12, 6, 4.0
    q = torch.randn(B, h, N, d, dtype=torch.float64)
    k, v = torch.randn(2, B, h, n, d, dtype=torch.float64).unbind(0)
    scale, power = torch.randn(2, 1, h, 1, d, dtype=torch.float64).unbind(0)
    out = polarity_aware_linear_attention(q, k, v, scale, power, alpha)
    p = 1 + alpha * torch.sigmoid(power)
    t = F.softplus(scale)
    qp, qn = F.relu(q / t) ** p, F.relu(-q / t) ** p
    kp, kn = F.relu(k / t) ** p, F.relu(-k / t) ** p
    same = qp @ kp.transpose(-2, -1) + qn @ kn.transpose(-2, -1)  # (B, h, N, n): same-sign interactions
    opp = qn @ kp.transpose(-2, -1) + qp @ kn.transpose(-2, -1)  # opposite-sign interactions
    expected = torch.cat([(same @ v[..., : d // 2]) / (same.sum(-1, keepdim=True) + 1e-6 * n),
                          (opp @ v[..., d // 2:]) / (opp.sum(-1, keepdim=True) + 1e-6 * n)], dim=-1)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layer", ["mala", "pola"])
def test_half_precision_inputs_are_computed_in_float32(layer: str) -> None:
    """float16 q, k, v (as under autocast): the result is the float32 one rounded to float16, where a float16
    computation loses the powers (Pola's p near 5 underflows) and MALA's 1 / z gain and -z * mean(v) offset."""
    torch.manual_seed(0)
    q, k, v = (4 * torch.randn(3, 2, 2, 54, 16)).half().unbind(0)
    if layer == "mala":
        q, k, v = 8 * q, 8 * k, 8 * v  # outputs near 1e4: float16 intermediates lose 1e-3 of them
        sin, cos = RoPE(16)((6, 9))
        run = lambda *t: magnitude_aware_linear_attention(*t, sin, cos)
    else:
        scale, power = torch.zeros(1, 2, 1, 16), torch.full((1, 2, 1, 16), 5.0)  # p = 1 + 4 sigmoid(5) = 4.97
        run = lambda *t: polarity_aware_linear_attention(*t, scale, power, 4.0)
    low = run(q, k, v)
    ref = run(q.float(), k.float(), v.float())
    assert low.dtype == torch.float16 and torch.isfinite(low).all()
    tolerance = 6e-4 if layer == "mala" else 2e-3  # float16 computation: MALA 1.3e-3, Pola not finite
    torch.testing.assert_close(low.float(), ref, rtol=0, atol=tolerance * ref.abs().max().item())


def test_pola_positional_encoding_is_resized_to_the_live_grid() -> None:
    torch.manual_seed(0)
    module = PolaLinearAttention(16, 2, grid_size=(8, 8)).eval()
    with torch.no_grad():
        module.positional_encoding.normal_()
        out = module(torch.randn(1, 5 * 11, 16), (5, 11))
    assert out.shape == (1, 55, 16) and module.positional_encoding.shape == (1, 64, 16)


def test_pola_key_reduction_and_fused_projection() -> None:
    reduced = PolaLinearAttention(16, 2, grid_size=(8, 8), sr_ratio=2)
    assert reduced.positional_encoding.shape == (1, 16, 16) and hasattr(reduced, "sr")
    assert reduced(torch.randn(1, 7 * 9, 16), (7, 9)).shape == (1, 63, 16)  # odd map: 3 x 4 keys
    fused = PolaLinearAttention(16, 2, fused_qkv=True)
    assert fused.qkvg.weight.shape == (64, 16) and not hasattr(fused, "qg")
    with pytest.raises(ValueError, match="even head dim"):
        PolaLinearAttention(15, 5)


@pytest.mark.parametrize("name", ["test_mala", "test_pola_pvt", "test_pola_swin"])
@pytest.mark.parametrize("size", [(32, 32), (97, 141)])
def test_features_at_any_size(name: str, size: tuple[int, int]) -> None:
    model = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, *size))
    assert [tuple(f.shape[2:]) for f in maps] == [(math.ceil(size[0] / s), math.ceil(size[1] / s))
                                                  for s in (4, 8, 16, 32)]
    assert [f.shape[1] for f in maps] == model.feature_info.channels()


def test_attention_letters() -> None:
    mala = timm.create_model("test_mala")
    kinds = [type(stage.blocks[0].attn) for stage in mala.layers]
    assert kinds == [MALAttention, MALAttention, RoPESoftmaxAttention, RoPESoftmaxAttention]
    assert isinstance(timm.create_model("test_ravlt").layers[0].blocks[0].attn, RALAttention)  # RAVLT unchanged
    pvt = timm.create_model("test_pola_pvt", attn_type="LSLS")
    assert [type(getattr(pvt, f"block{i}")[0].attn) for i in range(1, 5)] == [
        PolaLinearAttention, SpatialReductionAttention, PolaLinearAttention, SpatialReductionAttention]
    swin = timm.create_model("test_pola_swin")
    assert [type(stage.blocks[0].attn) for stage in swin.layers] == [
        PolaLinearAttention, PolaLinearAttention, WindowAttention, WindowAttention]
    assert swin.layers[0].blocks[0].attn.positional_encoding.shape[1] == 56 * 56  # the 224 stage-1 grid
    assert [type(stage.blocks[0].attn) for stage in timm.create_model("test_mala", attn_type="LSLS").layers] == [
        MALAttention, RoPESoftmaxAttention, MALAttention, RoPESoftmaxAttention]  # one alphabet, l / v its aliases
    with pytest.raises(ValueError, match="unknown letter"):
        timm.create_model("test_mala", attn_type="lvxv")


def test_published_pvt_settings_are_the_released_ones() -> None:
    """Global keys in every L stage (the released '1111', not the builders' '8421'), alpha 4, kernel 5."""
    with torch.device("meta"):
        model = timm.create_model("pola_pvt_tiny")
    attns = [getattr(model, f"block{i}")[0].attn for i in range(1, 5)]
    assert [a.sr_ratio for a in attns] == [1, 1, 1, 1] and {a.alpha for a in attns} == {4.0}
    assert [a.positional_encoding.shape[1] for a in attns] == [3136, 784, 196, 49]
    assert attns[0].dwc.kernel_size == (5, 5)


def test_a_ravlt_checkpoint_is_refused_by_mala(tmp_path) -> None:
    """MALA and RAVLT share every backbone key; the classifier projection's width tells them apart."""
    state = timm.create_model("test_ravlt", projection=32).state_dict()
    path = tmp_path / "ravlt.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointMismatchError, match="proj.weight"):
        timm.create_model("test_mala", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
