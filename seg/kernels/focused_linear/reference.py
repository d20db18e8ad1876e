"""Focused linear attention (FLatten, Han et al., ICCV 2023, arXiv 2308.00442): the maths, the reference.

Pure functions over (B, h, N, d) tensors that autograd differentiates; the fast paths beside this file (``cpu``,
``triton``) compute what these functions compute, and the tests compare them. The module that owns the
projections, the positional encoding and the DWC is :class:`seg.model.layers.FocusedLinearAttention`.

Numerics: the kernel, the power and the norms run in float32 even under autocast (x**3 of an fp16
activation overflows), and the d x d summary keeps the published mean-based formulation
(kv = k^T v / n, z = 1 / (q . mean(k) + eps)) that avoids the fp16 overflow of plain sums.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from seg.kernels.precision import at_least_fp32

__all__ = [
    "DENOM_EPS",
    "KERNEL_EPS",
    "focus",
    "focused_kernel",
    "focused_linear_attention",
    "focused_linear_attention_tokens",
    "linear_attention",
    "rank_restoration",
    "resize_token_grid",
]

KERNEL_EPS = 1e-6  # added after ReLU so that no feature is exactly zero
DENOM_EPS = 1e-6  # added to the normaliser q . mean(k)


def focus(x: Tensor, p: float) -> Tensor:
    """Focusing function f_p: element-wise power p, rescaled to keep each token's norm.

    Args:
        x: positive features (B, h, N, d); the norm is taken over all h * d channels of a token.
        p: focusing factor (3 in every published model).
    """
    norm = x.square().sum(dim=(1, 3), keepdim=True).sqrt()  # (B, 1, N, 1) norm over h*d channels
    # f_p is invariant to the scale of x: powering the unit vector keeps every value in [0, 1]
    # and its norm >= C^(-p/2), so nothing under- or overflows (the published form powers x itself)
    up = (x / norm).pow(p)
    return up * (norm / up.square().sum(dim=(1, 3), keepdim=True).sqrt())


def focused_kernel(x: Tensor, scale: Tensor, p: float) -> Tensor:
    """phi_p(x) = f_p((ReLU(x) + eps) / softplus(scale)), computed in float32 (float64 stays float64).

    Args:
        x: raw projections (B, h, N, d), any float dtype.
        scale: the learnable temperature (1, 1, C) with C = h * d.
        p: focusing factor.
    """
    h, d = x.shape[1], x.shape[3]
    temperature = F.softplus(at_least_fp32(scale)).view(1, h, 1, d)  # (1, C) channel order is head-major
    x = (F.relu(at_least_fp32(x)) + KERNEL_EPS) / temperature
    return focus(x, p)


def linear_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Normalised linear attention out_i = sum_j (q_i . k_j) v_j / sum_j (q_i . k_j), linear order.

    Uses the mean-based form: kv = k^T v / n (d x d per head) and z = 1 / (q . mean_j k_j + eps),
    so no intermediate grows with n. q: (B, h, N, d), k and v: (B, h, n, d) -> (B, h, N, d).
    """
    n = k.shape[-2]
    kv = k.transpose(-2, -1) @ (v * (1.0 / n))  # (B, h, d, d)
    k_mean = k.mean(dim=-2, keepdim=True).transpose(-2, -1)  # (B, h, d, 1)
    return (q @ kv) / (q @ k_mean + DENOM_EPS)  # (B, h, N, d)


def focused_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: Tensor, focusing_factor: float = 3.0
) -> Tensor:
    """Focused linear attention without the DWC term, returned in v's dtype.

    Args:
        q: raw query projections (B, h, N, d).
        k: raw key projections (B, h, n, d), positional encoding already added.
        v: values (B, h, n, d).
        scale: learnable temperature (1, 1, h * d); softplus(scale) divides q and k.
        focusing_factor: the power p of the focusing function.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = focused_kernel(q, scale, focusing_factor)
        k = focused_kernel(k, scale, focusing_factor)
        out = linear_attention(q, k, at_least_fp32(v))
    return out.to(v.dtype)


def focused_linear_attention_tokens(
    q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, focusing_factor: float = 3.0
) -> Tensor:
    """:func:`focused_linear_attention` on token-layout tensors, heads as contiguous channel blocks:
    q (B, N, C), k and v (B, n, C) -> (B, N, C)."""
    B, N, C = q.shape
    heads = lambda t: t.reshape(B, t.shape[1], num_heads, C // num_heads).transpose(1, 2)  # (B, h, N, d)
    out = focused_linear_attention(heads(q), heads(k), heads(v), scale, focusing_factor)
    return out.transpose(1, 2).reshape(B, N, C)  # (B, N, C)


def resize_token_grid(tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a (1, n, C) table stored on a square grid to (1, H * W, C), bilinear, align_corners=False."""
    n, c = tokens.shape[1], tokens.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"a token table of {n} entries is not a square grid")
    if (side, side) == tuple(size) and not torch.compiler.is_compiling():  # tracing: no guard on the stored grid
        return tokens
    grid = tokens.reshape(1, side, side, c).permute(0, 3, 1, 2)  # (1, C, s, s)
    grid = F.interpolate(at_least_fp32(grid), size=size, mode="bilinear", align_corners=False).to(tokens.dtype)
    return grid.flatten(2).transpose(1, 2)  # (1, H*W, C)


def rank_restoration(
    v: Tensor, kv_size: tuple[int, int], size: tuple[int, int], weight: Tensor, bias: Tensor | None, num_heads: int
) -> Tensor:
    """DWC(v), one depthwise filter bank of d channels shared by all heads: (B, n, C) -> (B, N, C).

    weight (d, 1, k, k), bias (d,). With spatial reduction (n != N), v is first brought back to the H x W grid
    by a 2-D bilinear resize (the published code interpolates the flattened sequence in 1-D, which mixes rows
    on non-square maps).
    """
    B, n, C = v.shape
    h, d = num_heads, C // num_heads
    v_map = v.reshape(B, *kv_size, h, d).permute(0, 3, 4, 1, 2).reshape(B * h, d, *kv_size)  # (B*h, d, H', W')
    if tuple(kv_size) != tuple(size):
        v_map = F.interpolate(v_map, size=size, mode="bilinear", align_corners=False)  # (B*h, d, H, W)
    out = F.conv2d(v_map, weight, bias, padding=weight.shape[-1] // 2, groups=d)  # (B*h, d, H, W)
    return out.reshape(B, h, d, -1).permute(0, 3, 1, 2).reshape(B, -1, C)  # (B, N, C)
