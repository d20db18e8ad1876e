"""The ``cpu`` backend's forward of :class:`~seg.layers.FocusedLinearAttention`.

Tuned for CPUs with few cores, tested equal to the reference: oneDNN products for the projections, the
closed-form backward of :mod:`seg.kernels.cpu_focused`, a channels-last DWC on all C channels at once, and
without autograd a leaner inference: the kernel's 1 / T and eps folded into one stacked q / k projection, q
and k through the power and norms together in place, per-head summaries, and the attention added onto the
DWC term. :func:`cpu_forward` returns None (so the reference runs) off the CPU, for half-precision inputs
and under the compiler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from seg.kernels.cpu_focused import FocusedTokens, depthwise_conv_same, focused_attention_into, focused_tokens_inference
from seg.kernels.onednn import linear
from seg.layers.focused_linear import KERNEL_EPS, FocusedLinearAttention, resize_token_grid

__all__ = ["cpu_forward", "focused_linear_attention_tokens"]

Size = tuple[int, int]


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def focused_linear_attention_tokens(
    q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, focusing_factor: float = 3.0
) -> Tensor:
    """:func:`~seg.layers.focused_linear_attention` on token-layout tensors (heads as contiguous channel
    blocks), without the DWC term: q (B, N, C), k with positional encoding and v (B, n, C), scale (1, 1, C)
    -> (B, N, C) in v's dtype. Runs :class:`FocusedTokens` (closed-form backward) under autograd."""
    v_dtype = v.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        inv_temp = 1.0 / F.softplus(_at_least_fp32(scale))  # (1, 1, C)
        q = _at_least_fp32(q)
        k, v, inv_temp = (t.to(q.dtype) for t in (_at_least_fp32(k), _at_least_fp32(v), inv_temp))
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, inv_temp)):
            out = FocusedTokens.apply(q, k, v, inv_temp, num_heads, focusing_factor)
        else:
            out = focused_tokens_inference(q, k, v, inv_temp, num_heads, focusing_factor)
    return out.to(v_dtype)


def _project(attn: FocusedLinearAttention, x: Tensor, size: Size) -> tuple[Tensor, Tensor, Tensor, Size]:
    """q (B, N, C), k (with positional encoding) and v (B, n, C) through oneDNN, each output contiguous."""
    wq, bq, wk, bk, wv, bv = attn.projection_weights()
    x_kv, kv_size = attn.key_value_tokens(x, size)
    k = linear(x_kv, wk, bk)
    k = k + attn.positional_encoding_at(kv_size).to(k.dtype)
    return linear(x, wq, bq), k, linear(x_kv, wv, bv), kv_size


def _rank_restoration(attn: FocusedLinearAttention, v: Tensor, kv_size: Size, size: Size) -> Tensor:
    """DWC(v) channels-last on all C channels at once (the d filters repeated per head): (B, n, C) -> (B, N, C)."""
    B, n, C = v.shape
    v_map = v.view(B, *kv_size, C).permute(0, 3, 1, 2)  # (B, C, H', W'), channels-last memory
    if kv_size != size:
        v_map = F.interpolate(v_map, size=size, mode="bilinear", align_corners=False)
    weight = attn.dwc.weight.repeat(attn.num_heads, 1, 1, 1)  # (C, 1, k, k)
    bias = attn.dwc.bias.repeat(attn.num_heads) if attn.dwc.bias is not None else None
    out = depthwise_conv_same(v_map, weight, bias)  # (B, C, H, W)
    return out.permute(0, 2, 3, 1).reshape(B, -1, C)  # (B, N, C)


def _kernel_tables(attn: FocusedLinearAttention, size: Size) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The q and k projections with the kernel's 1 / T and eps folded in.

    (ReLU(z) + eps) / T = max(z / T + eps / T, eps / T) for T > 0, so with W' = W / T, b' = (b + eps) / T
    and pe' = pe / T the kernel input is one matmul, one add (keys) and one clamp. Returns W' of q and k
    stacked (2C, C), their b' (2C,), pe' (1, N, C) and the floor eps / T (C,). Rebuilt every call (a few
    C x C element-wise operations next to the N x C x 2C product), so parameter updates are always seen.
    """
    wq, bq, wk, bk, _, _ = attn.projection_weights()
    inv_temp = 1.0 / F.softplus(attn.scale.view(-1))  # (C,)
    floor = KERNEL_EPS * inv_temp
    bias = lambda b: floor if b is None else b * inv_temp + floor
    weight = torch.cat([wq * inv_temp[:, None], wk * inv_temp[:, None]])  # (2C, C)
    pe = resize_token_grid(attn.positional_encoding, size) * inv_temp
    return weight, torch.cat([bias(bq), bias(bk)]), pe, floor


def _forward_inference(attn: FocusedLinearAttention, x: Tensor, size: Size) -> Tensor:
    """The forward without autograd (global keys): one folded q / k matmul, q and k through the kernel
    together in place, and the attention added onto the DWC term."""
    B, N, C = x.shape
    weight, bias, pe, floor = _kernel_tables(attn, size)
    *_, wv, bv = attn.projection_weights()
    y = linear(x, weight.to(x.dtype), bias.to(x.dtype))  # (B, N, 2C): q and k, over T, plus eps / T
    y[..., C:] += pe.to(x.dtype)  # keys carry the positional encoding
    y = y.view(B, N, 2, C).clamp_min_(floor.to(x.dtype))  # (ReLU(.) + eps) / T
    v = linear(x, wv, bv)  # (B, N, C)
    out = _rank_restoration(attn, v, size, size)
    out = focused_attention_into(y, v, attn.num_heads, attn.focusing_factor, out)
    return attn.proj_drop(attn.proj(out))


def cpu_forward(attn: FocusedLinearAttention, x: Tensor, size: Size) -> Tensor | None:
    """The module's forward on CPU for float32 / float64 tokens (autocast allowed with autograd), else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or torch.compiler.is_compiling():
        return None
    if not torch.is_grad_enabled() and attn.sr_ratio == 1 and not torch.is_autocast_enabled("cpu"):
        return _forward_inference(attn, x, size)
    q, k, v, kv_size = _project(attn, x, size)
    out = focused_linear_attention_tokens(q, k, v, attn.scale, attn.num_heads, attn.focusing_factor)
    out = out + _rank_restoration(attn, v, kv_size, size)
    return attn.proj_drop(attn.proj(out))
