"""RALA and RAVLT's RoPE softmax attention: the pure functions against dense float64 references written from the
formulas, the RoPE tables, gradients, and the float32 discipline under autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seg.model.layers import (
    RALAttention,
    RoPE,
    RoPESoftmaxAttention,
    apply_rope,
    rank_augmented_linear_attention,
    rope_softmax_attention,
)


def _qkv(B: int, h: int, N: int, d: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, N, d, generator=gen, dtype=dtype) for _ in range(3)]


def _pair_angles(size: tuple[int, int], d: int) -> torch.Tensor:
    """One angle per channel pair (N, d/2), float64: pair m < d/4 turns by row * f_m, the others by
    column * f_(m - d/4), f = 10000^-linspace(0, 1, d/4); tokens of the H x W grid in row-major order."""
    H, W = size
    freq = 10000.0 ** -torch.linspace(0, 1, d // 4, dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    return torch.cat([ys.reshape(-1, 1) * freq, xs.reshape(-1, 1) * freq], dim=1)


def _rope(size: tuple[int, int], d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (sin, cos) tables (N, d) from the definition (the module's own tables: tested separately)."""
    pos = _pair_angles(size, d).repeat_interleave(2, dim=-1)
    return pos.sin(), pos.cos()


def _rotate_dense(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """RoPE as a 2 x 2 rotation of each channel pair (a, b) of x (B, h, N, d)."""
    pos = _pair_angles(size, x.shape[-1])
    a, b = x[..., 0::2], x[..., 1::2]
    rot = torch.stack([a * pos.cos() - b * pos.sin(), b * pos.cos() + a * pos.sin()], dim=-1)
    return rot.flatten(-2)


def test_rope_frequencies_and_tables() -> None:
    rope = RoPE(16)
    assert rope.angle.shape == (8,)
    torch.testing.assert_close(rope.angle[0::2], rope.angle[1::2])  # one angle per channel pair
    assert rope.angle[0].item() == 1.0 and rope.angle[-1].item() == pytest.approx(1e-4)  # linspace endpoint
    sin, cos = rope((3, 5))
    assert sin.shape == cos.shape == (15, 16) and sin.dtype == torch.float32
    expected_sin, expected_cos = _rope((3, 5), 16)
    torch.testing.assert_close(sin.double(), expected_sin, rtol=0, atol=1e-6)
    torch.testing.assert_close(cos.double(), expected_cos, rtol=0, atol=1e-6)
    # channels [0, 8) follow the row only, [8, 16) the column only
    grid = sin.reshape(3, 5, 16)
    torch.testing.assert_close(grid[:, :, :8], grid[:, :1, :8].expand(3, 5, 8))
    torch.testing.assert_close(grid[:, :, 8:], grid[:1, :, 8:].expand(3, 5, 8))


@pytest.mark.parametrize("size", [(4, 6), (5, 3)])
def test_apply_rope_equals_pairwise_rotations(size: tuple[int, int]) -> None:
    x = _qkv(2, 3, size[0] * size[1], 8)[0]
    torch.testing.assert_close(apply_rope(x, *_rope(size, 8)), _rotate_dense(x, size), rtol=1e-12, atol=1e-12)


def test_rope_scores_depend_on_relative_position_only() -> None:
    """rope(q)_i . rope(k)_j is unchanged when both tokens move by the same (dy, dx)."""
    H, W, d = 6, 7, 8
    q, k = torch.randn(2, d, dtype=torch.float64)
    sin, cos = RoPE(d)((H, W))
    q, k = q.float(), k.float()
    score = lambda i, j: (apply_rope(q, sin[i], cos[i]) * apply_rope(k, sin[j], cos[j])).sum()
    at = lambda y, x: y * W + x
    torch.testing.assert_close(score(at(1, 2), at(3, 1)), score(at(2, 5), at(4, 4)))
    assert not torch.allclose(score(at(1, 2), at(3, 1)), score(at(1, 2), at(3, 2)))


def _rala_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """RALA written as the sums of its definition (no mean form), float64."""
    kq, kk = F.elu(q) + 1, F.elu(k) + 1
    d = q.shape[-1]
    alpha = torch.softmax(torch.einsum("bhd,bhjd->bhj", kq.mean(2), kk) / d**0.5, dim=-1)  # (B, h, N)
    rq, rk = _rotate_dense(kq, size), _rotate_dense(kk, size)
    num = torch.einsum("bhid,bhj,bhjd,bhje->bhie", rq, alpha, rk, v)  # sum_j alpha_j (rq_i . rk_j) v_j
    den = torch.einsum("bhid,bhj,bhjd->bhi", kq, alpha, kk)  # sum_j alpha_j (kq_i . kk_j)
    return num / (den[..., None] + 1e-6)


@pytest.mark.parametrize("size", [(7, 9), (1, 12)])
def test_rala_equals_its_definition(size: tuple[int, int]) -> None:
    q, k, v = _qkv(2, 2, size[0] * size[1], 8)
    got = rank_augmented_linear_attention(q, k, v, *_rope(size, 8))
    torch.testing.assert_close(got, _rala_dense(q, k, v, size), rtol=1e-10, atol=1e-10)


def test_softmax_attention_equals_the_explicit_matrix() -> None:
    size = (5, 6)
    q, k, v = _qkv(2, 3, 30, 8)
    rq, rk = _rotate_dense(q, size), _rotate_dense(k, size)
    expected = torch.softmax(rq @ rk.transpose(-2, -1) / 8**0.5, dim=-1) @ v
    torch.testing.assert_close(rope_softmax_attention(q, k, v, *_rope(size, 8)), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn", [rank_augmented_linear_attention, rope_softmax_attention])
def test_gradcheck_float64(fn) -> None:
    q, k, v = (t.mul(0.5).requires_grad_() for t in _qkv(1, 1, 6, 4))
    sin, cos = _rope((2, 3), 4)
    assert torch.autograd.gradcheck(lambda q, k, v: fn(q, k, v, sin, cos), (q, k, v), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn", [rank_augmented_linear_attention, rope_softmax_attention])
def test_bf16_autocast_runs_the_maths_in_float32(fn) -> None:
    """Under autocast the products run in float32 (half-precision inputs are promoted, not the reverse), so
    the result equals the float32 one on the same rounded inputs; it comes back in the input dtype."""
    q, k, v = (t.mul(3.0).bfloat16() for t in _qkv(2, 2, 32 * 32, 16, torch.float32))
    sin, cos = RoPE(16)((32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(q, k, v, sin, cos)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    expected = fn(q.float(), k.float(), v.float(), sin, cos)
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def test_rala_normaliser_stays_finite_for_large_fp16_maps() -> None:
    """A 128 x 128 map (16384 tokens) of large fp16 activations: the mean form keeps every sum bounded."""
    q, k, v = (t.mul(8.0).half() for t in _qkv(1, 1, 128 * 128, 16, torch.float32))
    out = rank_augmented_linear_attention(q, k, v, *RoPE(16)((128, 128)))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


@pytest.mark.parametrize("cls", [RALAttention, RoPESoftmaxAttention])
def test_module_splits_qkvo_into_contiguous_heads(cls) -> None:
    """qkvo's output is [q | k | v | o], heads are contiguous channel blocks; out = proj((attn + lepe(v)) * o)."""
    torch.manual_seed(0)
    attn = cls(12, 3).double()
    x = torch.randn(2, 12, 4, 5, dtype=torch.float64)
    rope = _rope((4, 5), 4)
    q, k, v, o = attn.qkvo(x).split(12, dim=1)
    heads = lambda t: t.reshape(2, 3, 4, 20).transpose(-2, -1)  # (B, h, N, d)
    fn = rank_augmented_linear_attention if cls is RALAttention else rope_softmax_attention
    out = fn(heads(q), heads(k), heads(v), *rope).transpose(-2, -1).reshape(2, 12, 4, 5)
    expected = attn.proj((out + attn.lepe(v)) * o)
    torch.testing.assert_close(attn(x, rope), expected)
    assert {n for n, _ in attn.named_parameters()} == {f"{m}.{p}" for m in ("qkvo", "lepe", "proj")
                                                       for p in ("weight", "bias")}
    assert attn.lepe.kernel_size == (5, 5) and attn.lepe.groups == 12


def test_rope_needs_a_head_dim_divisible_by_4() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        RoPE(6)
