"""Focused linear attention on CPU tensors: tensors in, tensors out (the ``cpu`` and ``cpu_inference`` modes).

Tuned for CPUs with few cores, tested equal to the reference: the closed-form backward of
:mod:`seg.kernels.focused_linear.cpu.closed_form`, a channels-last DWC on all C channels at once, and without autograd a
leaner inference (:func:`fused_inference`): the kernel's 1 / T and eps folded into one stacked q / k
projection, q and k through the power and norms together in place, per-head summaries, and the attention
added onto the DWC term. Inputs are float32 or float64 (:func:`~seg.kernels.focused_linear.dispatch.select_mode`
sends everything else to the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from seg.kernels.focused_linear.cpu.closed_form import (
    FocusedTokens,
    depthwise_conv_same,
    focused_attention_into,
    focused_attention_into_direct,
    focused_tokens_inference,
)
from seg.kernels.focused_linear.reference import KERNEL_EPS, resize_token_grid
from seg.kernels.onednn import linear
from seg.kernels.precision import at_least_fp32

__all__ = ["focused_linear_attention", "fused_inference", "rank_restoration"]

Size = tuple[int, int]


def focused_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, focusing_factor: float = 3.0
) -> Tensor:
    """:func:`~seg.kernels.focused_linear.reference.focused_linear_attention` on token-layout tensors (heads as
    contiguous channel blocks), without the DWC term: q (B, N, C), k with positional encoding and v (B, n, C),
    scale (1, 1, C)
    -> (B, N, C) in v's dtype. Runs :class:`FocusedTokens` (closed-form backward) under autograd."""
    v_dtype = v.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        inv_temp = 1.0 / F.softplus(at_least_fp32(scale))  # (1, 1, C)
        q = at_least_fp32(q)
        k, v, inv_temp = (t.to(q.dtype) for t in (at_least_fp32(k), at_least_fp32(v), inv_temp))
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, inv_temp)):
            out = FocusedTokens.apply(q, k, v, inv_temp, num_heads, focusing_factor)
        else:
            out = focused_tokens_inference(q, k, v, inv_temp, num_heads, focusing_factor)
    return out.to(v_dtype)


def rank_restoration(
    v: Tensor, kv_size: Size, size: Size, weight: Tensor, bias: Tensor | None, num_heads: int
) -> Tensor:
    """DWC(v) channels-last on all C channels at once (the d filters repeated per head): (B, n, C) -> (B, N, C).

    weight (d, 1, k, k) and bias (d,): one filter bank shared by all heads; with n != N, v is first resized
    bilinearly to the H x W grid."""
    B, n, C = v.shape
    v_map = v.reshape(B, *kv_size, C).permute(0, 3, 1, 2)  # (B, C, H', W'), channels-last memory
    if kv_size != size:
        v_map = F.interpolate(v_map, size=size, mode="bilinear", align_corners=False)
    weight = weight.repeat(num_heads, 1, 1, 1)  # (C, 1, k, k)
    bias = bias.repeat(num_heads) if bias is not None else None
    out = depthwise_conv_same(v_map, weight, bias)  # (B, C, H, W)
    return out.permute(0, 2, 3, 1).reshape(B, -1, C)  # (B, N, C)


def _kernel_tables(
    wq: Tensor, bq: Tensor | None, wk: Tensor, bk: Tensor | None, positional_encoding: Tensor, scale: Tensor,
    size: Size,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The q and k projections with the kernel's 1 / T and eps folded in.

    (ReLU(z) + eps) / T = max(z / T + eps / T, eps / T) for T > 0, so with W' = W / T, b' = (b + eps) / T
    and pe' = pe / T the kernel input is one matmul, one add (keys) and one clamp. Returns W' of q and k
    stacked (2C, C), their b' (2C,), pe' (1, N, C) and the floor eps / T (C,). Rebuilt every call (a few
    C x C element-wise operations next to the N x C x 2C product), so parameter updates are always seen.
    """
    inv_temp = 1.0 / F.softplus(scale.view(-1))  # (C,)
    floor = KERNEL_EPS * inv_temp
    bias = lambda b: floor if b is None else b * inv_temp + floor
    weight = torch.cat([wq * inv_temp[:, None], wk * inv_temp[:, None]])  # (2C, C)
    pe = resize_token_grid(positional_encoding * inv_temp, size)  # bilinear is linear: scale the small table
    return weight, torch.cat([bias(bq), bias(bk)]), pe, floor


def fused_inference(
    x: Tensor,
    size: Size,
    projections: tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor, Tensor | None],
    positional_encoding: Tensor,
    scale: Tensor,
    dwc_weight: Tensor,
    dwc_bias: Tensor | None,
    num_heads: int,
    focusing_factor: float,
) -> Tensor:
    """Attention plus DWC term of a layer with global keys, without autograd: (B, N, C) -> (B, N, C), before
    the output projection.

    One folded q / k matmul, q and k through the kernel together in place, the attention added onto the DWC
    term. ``projections`` are (w, b) of q, k and v; ``positional_encoding`` the stored (1, n0, C) table."""
    B, N, C = x.shape
    wq, bq, wk, bk, wv, bv = projections
    weight, bias, pe, floor = _kernel_tables(wq, bq, wk, bk, positional_encoding, scale, size)

    def kernel_inputs() -> Tensor:  # (B, N, 2, C): (ReLU(.) + eps) / T of q and k
        y = linear(x, weight.to(x.dtype), bias.to(x.dtype))  # (B, N, 2C): q and k, over T, plus eps / T
        y[..., C:] += pe.to(x.dtype)  # keys carry the positional encoding
        return y.view(B, N, 2, C).clamp_min_(floor.to(x.dtype))

    v = linear(x, wv, bv)  # (B, N, C)
    out = rank_restoration(v, size, size, dwc_weight, dwc_bias, num_heads)
    done = focused_attention_into_direct(kernel_inputs(), v, num_heads, focusing_factor, out)
    if done is None:  # y^p left the floating-point range: power the unit vectors instead
        done = focused_attention_into(kernel_inputs(), v, num_heads, focusing_factor, out)
    return done
