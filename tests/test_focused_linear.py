"""Focused linear attention against a naive O(N^2) reference that forms the attention matrix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seg.kernels import set_backend
from seg.model.layers import FocusedLinearAttention, focus, focused_linear_attention

torch.manual_seed(0)


def naive_phi(x: torch.Tensor, scale: torch.Tensor, p: float) -> torch.Tensor:
    """phi_p over (B, N, C) tokens, written as the paper states it (norms over all C channels)."""
    x = (F.relu(x) + 1e-6) / F.softplus(scale)
    norm = x.norm(dim=-1, keepdim=True)
    xp = x**p
    return xp / xp.norm(dim=-1, keepdim=True) * norm


def naive_attention(q, k, v, scale, heads: int, p: float = 3.0) -> torch.Tensor:
    """(B, N, C), (B, n, C), (B, n, C) -> (B, N, C) via the explicit N x n attention matrix per head."""
    B, N, C = q.shape
    n = k.shape[1]
    d = C // heads
    fq, fk = naive_phi(q, scale, p), naive_phi(k, scale, p)
    out = torch.empty_like(q)
    for b in range(B):
        for i in range(heads):
            sl = slice(i * d, (i + 1) * d)
            sim = fq[b, :, sl] @ fk[b, :, sl].T  # (N, n)
            attn = sim / (sim.sum(dim=-1, keepdim=True) + n * 1e-6)  # published eps: 1e-6 on the mean
            out[b, :, sl] = attn @ v[b, :, sl]
    return out


def split(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, N, C = x.shape
    return x.reshape(B, N, heads, C // heads).transpose(1, 2)


@pytest.mark.parametrize(("N", "n", "heads"), [(49, 49, 2), (30, 12, 3), (11, 11, 1)])
def test_pure_function_equals_dense_reference(N: int, n: int, heads: int) -> None:
    C = heads * 8
    q, k, v = (torch.randn(2, m, C, dtype=torch.float64) for m in (N, n, n))
    scale = torch.randn(1, 1, C, dtype=torch.float64)
    expected = naive_attention(q, k, v, scale, heads)
    got = focused_linear_attention(split(q, heads), split(k, heads), split(v, heads), scale)
    got = got.transpose(1, 2).reshape(2, N, C)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def module_reference(attn: FocusedLinearAttention, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The whole module written out: projections, sr, resized positional encoding, dense attention, DWC."""
    B, N, C = x.shape
    H, W = size
    h, d = attn.num_heads, attn.head_dim
    q = x @ attn.q.weight.T + attn.q.bias
    src = x
    kv_size = size
    if attn.sr_ratio > 1:
        m = F.conv2d(x.transpose(1, 2).reshape(B, C, H, W), attn.sr.weight, attn.sr.bias, stride=attn.sr_ratio)
        kv_size = (m.shape[2], m.shape[3])
        src = F.layer_norm(m.flatten(2).transpose(1, 2), (C,), attn.norm.weight, attn.norm.bias)
    kv = src @ attn.kv.weight.T + attn.kv.bias
    k, v = kv[..., :C], kv[..., C:]
    side = int(attn.positional_encoding.shape[1] ** 0.5)
    pe = attn.positional_encoding.reshape(1, side, side, C).permute(0, 3, 1, 2)
    pe = F.interpolate(pe, size=kv_size, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    out = naive_attention(q, k + pe, v, attn.scale, h)
    v_map = v.reshape(B, *kv_size, h, d).permute(0, 3, 4, 1, 2).reshape(B * h, d, *kv_size)
    v_map = F.interpolate(v_map, size=size, mode="bilinear", align_corners=False)
    dwc = F.conv2d(v_map, attn.dwc.weight, attn.dwc.bias, padding=attn.dwc.padding, groups=d)
    out = out + dwc.reshape(B, h, d, N).permute(0, 3, 1, 2).reshape(B, N, C)
    return out @ attn.proj.weight.T + attn.proj.bias


def randomised(attn: FocusedLinearAttention) -> FocusedLinearAttention:
    with torch.no_grad():
        attn.scale.normal_(0, 0.5)
        attn.positional_encoding.normal_(0, 0.5)
    return attn.double()


@pytest.mark.parametrize("size", [(7, 7), (6, 9), (9, 5)])
@pytest.mark.parametrize("sr", [1, 2])
def test_module_equals_dense_reference(size: tuple[int, int], sr: int) -> None:
    attn = randomised(FocusedLinearAttention(24, 3, grid_size=(8, 8), sr_ratio=sr)).eval()
    x = torch.randn(2, size[0] * size[1], 24, dtype=torch.float64)
    torch.testing.assert_close(attn(x, size), module_reference(attn, x, size), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("heads", "batch"), [(1, 1), (1, 2), (3, 1), (3, 2)])
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_cpu_inference_path_equals_dense_reference(heads: int, batch: int, fused_qkv: bool) -> None:
    """Without autograd the cpu backend folds 1 / T into the q / k projection and runs q and k together."""
    attn = randomised(FocusedLinearAttention(8 * heads, heads, grid_size=(8, 8), fused_qkv=fused_qkv)).eval()
    set_backend(attn, "cpu")
    x = torch.randn(batch, 42, 8 * heads, dtype=torch.float64)
    expected = attn(x, (6, 7)).detach()  # autograd path
    if not fused_qkv:
        torch.testing.assert_close(expected, module_reference(attn, x, (6, 7)), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, (6, 7)), expected, rtol=1e-10, atol=1e-10)
    attn.float()
    with torch.inference_mode():
        low = attn(x.float(), (6, 7)).double()
    assert (low - expected).norm() / expected.norm() < 1e-5


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_inference_follows_temperature_and_weight_updates(backend: str) -> None:
    attn = set_backend(randomised(FocusedLinearAttention(16, 2, grid_size=(4, 4))).float().eval(), backend)
    x = torch.randn(1, 30, 16)
    with torch.no_grad():
        first = attn(x, (5, 6))
        attn.scale.add_(0.7)
        attn.q.weight.mul_(1.5)
        changed = attn(x, (5, 6))
    assert not torch.allclose(changed, first)
    torch.testing.assert_close(changed, attn(x, (5, 6)).detach(), rtol=1e-5, atol=1e-6)


def test_focus_keeps_norm_and_sharpens() -> None:
    x = torch.rand(2, 3, 10, 4) + 1e-3  # (B, h, N, d), positive like the kernel's output
    y = focus(x, 3.0)
    norm = lambda t: t.square().sum(dim=(1, 3)).sqrt()
    torch.testing.assert_close(norm(y), norm(x))
    # direction moves towards the largest channel: its share of the norm grows
    share = lambda t: t.flatten(1, 3).amax(-1) / t.flatten(1, 3).norm(dim=-1)
    assert (share(y.transpose(1, 2)) > share(x.transpose(1, 2))).all()
    # tiny activations (the ReLU floor) do not underflow to NaN
    assert torch.isfinite(focus(torch.full((1, 1, 4, 8), 1e-7), 3.0)).all()


@pytest.mark.parametrize("sr", [1, 2])
def test_every_parameter_gets_a_gradient(sr: int) -> None:
    attn = FocusedLinearAttention(16, 2, grid_size=(6, 6), sr_ratio=sr)
    attn(torch.randn(2, 35, 16), (5, 7)).square().mean().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_eval_follows_ema_style_updates_through_param_data(backend: str) -> None:
    """EMA code writes through ``param.data`` (no version bump): validation must see the new values."""
    attn = set_backend(randomised(FocusedLinearAttention(16, 2, grid_size=(4, 4))).float().eval(), backend)
    shadow = set_backend(randomised(FocusedLinearAttention(16, 2, grid_size=(4, 4))).float().eval(), backend)
    x = torch.randn(1, 30, 16)
    with torch.no_grad():
        first = attn(x, (5, 6))
        assert attn(x, (5, 6)).equal(first)
        for p, q in zip(attn.parameters(), shadow.parameters(), strict=True):
            p.data.copy_(q.data)  # EMA-style swap: same storage, new values, no version bump
        swapped = attn(x, (5, 6))
        torch.testing.assert_close(swapped, shadow(x, (5, 6)))
    assert not swapped.equal(first)
    attn.train()
    torch.testing.assert_close(attn(x, (5, 6)).detach(), swapped)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_autocast_is_finite_for_large_activations_and_close_to_fp32(dtype: torch.dtype, backend: str) -> None:
    attn = set_backend(randomised(FocusedLinearAttention(64, 1, grid_size=(8, 8))).float().eval(), backend)
    x = (torch.rand(2, 64, 64) * 100 - 50)  # activations up to |50|
    with torch.no_grad():
        ref = attn(x, (8, 8))
        with torch.autocast("cpu", dtype=dtype):
            low = attn(x, (8, 8))
    assert torch.isfinite(low).all()
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.03, rel


def test_rejects_tokens_that_do_not_form_the_grid() -> None:
    attn = FocusedLinearAttention(16, 2)
    with pytest.raises(ValueError, match="do not form a 5 x 5 grid"):
        attn(torch.randn(1, 24, 16), (5, 5))


@pytest.mark.parametrize("heads", [1, 3])
def test_hand_written_backward_passes_gradcheck_in_float64(heads: int) -> None:
    from seg.kernels.focused_linear.cpu.closed_form import FocusedTokens

    C = heads * 4
    q, k, v = (torch.randn(2, m, C, dtype=torch.float64) for m in (7, 5, 5))
    q[0, 0] = -1.0  # a query and a key at the kernel floor (all channels <= 0)
    k[1, 2] = -1.0
    inv_temp = torch.rand(1, 1, C, dtype=torch.float64) + 0.5
    inputs = tuple(t.requires_grad_() for t in (q, k, v, inv_temp))
    assert torch.autograd.gradcheck(lambda *t: FocusedTokens.apply(*t, heads, 3.0), inputs)


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("batch", [1, 2])
def test_float32_backward_matches_float64(heads: int, batch: int) -> None:
    """float32 on CPU takes the oneDNN products (one image) or batched matmuls; both match float64."""
    from seg.kernels.focused_linear.cpu.closed_form import FocusedTokens

    C = heads * 8
    q, k, v = (torch.randn(batch, 50, C, dtype=torch.float64) for _ in range(3))
    inv_temp = torch.rand(1, 1, C, dtype=torch.float64) + 0.5
    grad = torch.randn(batch, 50, C, dtype=torch.float64)

    def grads(dtype: torch.dtype) -> list[torch.Tensor]:
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v, inv_temp)]
        FocusedTokens.apply(*inputs, heads, 3.0).backward(grad.to(dtype))
        return [t.grad.double() for t in inputs]

    for low, ref in zip(grads(torch.float32), grads(torch.float64), strict=True):
        assert (low - ref).norm() / ref.norm() < 1e-5


def test_depthwise_conv_backward_passes_gradcheck_in_float64() -> None:
    from seg.kernels.focused_linear.cpu.closed_form import depthwise_conv_same

    x = torch.randn(2, 3, 6, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(3, 1, 5, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(depthwise_conv_same, inputs)
    ref = F.conv2d(x, weight, bias, padding=2, groups=3)
    torch.testing.assert_close(depthwise_conv_same(x, weight, bias), ref)


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("training", [False, True], ids=["inference-path", "autograd-path"])
def test_token_layout_function_equals_head_layout_function(heads: int, training: bool) -> None:
    from seg.kernels.focused_linear.cpu import focused_linear_attention as cpu_attention

    C = heads * 8
    q, k, v = (torch.randn(2, m, C, dtype=torch.float64) for m in (30, 20, 20))
    scale = torch.randn(1, 1, C, dtype=torch.float64, requires_grad=training)
    with torch.no_grad():
        ref = focused_linear_attention(split(q, heads), split(k, heads), split(v, heads), scale)
    got = cpu_attention(q, k, v, scale, heads)
    assert got.requires_grad == training
    torch.testing.assert_close(got, ref.transpose(1, 2).reshape(2, 30, C), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fill", [-1.0, 50.0])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradients_stay_finite_for_dead_and_large_tokens(fill: float, backend: str) -> None:
    attn = set_backend(FocusedLinearAttention(32, 2, grid_size=(4, 4)), backend)
    x = torch.randn(2, 16, 32)
    x[0, :5] = fill  # tokens whose channels are all <= 0 (kernel floor) or all large
    x.requires_grad_(True)
    attn(x, (4, 4)).square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in attn.named_parameters():
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("sr_ratio", [1, 2])
def test_softmax_baseline_explicit_matrix_equals_sdpa(sr_ratio: int) -> None:
    from seg.model.layers import SpatialReductionAttention

    torch.manual_seed(0)
    attn = SpatialReductionAttention(16, 2, sr_ratio=sr_ratio).double().eval()
    x = torch.randn(2, 48, 16, dtype=torch.float64)
    fused = attn(x, (6, 8))
    attn.fused = False
    explicit = attn(x, (6, 8))
    torch.testing.assert_close(explicit, fused, rtol=1e-10, atol=1e-10)
    # the reference maths: softmax(q k^T / sqrt(d)) v per head, computed by hand for sr = 1
    if sr_ratio == 1:
        q = attn.q(x).view(2, 48, 2, 8).transpose(1, 2)
        k, v = attn.kv(x).view(2, 48, 2, 2, 8).permute(2, 0, 3, 1, 4)
        ref = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, -1) @ v
        torch.testing.assert_close(explicit, attn.proj(ref.transpose(1, 2).reshape(2, 48, 16)))
