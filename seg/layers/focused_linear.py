"""Focused linear attention (FLatten, Han et al., ICCV 2023, arXiv 2308.00442).

The maths lives in three pure functions over (B, h, N, d) tensors; :class:`FocusedLinearAttention`
is a thin module that owns the projections, the optional spatial reduction, the learned positional
encoding on k, the per-channel temperature and the depthwise conv (DWC) that restores the rank.

Numerics: the kernel, the power and the norms run in float32 even under autocast (x**3 of an fp16
activation overflows), and the d x d summary keeps the published mean-based formulation
(kv = k^T v / n, z = 1 / (q . mean(k) + eps)) that avoids the fp16 overflow of plain sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg.layers.fused import (
    DENOM_EPS,
    KERNEL_EPS,
    FocusedTokens,
    depthwise_conv_same,
    focused_attention_into,
    focused_tokens_inference,
)
from seg.layers.linear import Linear, linear

__all__ = [
    "FocusedLinearAttention",
    "focus",
    "focused_kernel",
    "focused_linear_attention",
    "focused_linear_attention_tokens",
    "linear_attention",
    "resize_token_grid",
]


def _at_least_fp32(x: Tensor) -> Tensor:
    """Half-precision tensors promoted to float32; float32 / float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


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
    """phi_p(x) = f_p((ReLU(x) + eps) / softplus(scale)), computed in float32.

    Args:
        x: raw projections (B, h, N, d), any float dtype.
        scale: the learnable temperature (1, 1, C) with C = h * d.
        p: focusing factor.
    """
    h, d = x.shape[1], x.shape[3]
    temperature = F.softplus(_at_least_fp32(scale)).view(1, h, 1, d)  # (1, C) channel order is head-major
    x = (F.relu(_at_least_fp32(x)) + KERNEL_EPS) / temperature
    return focus(x, p)


def linear_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Normalised linear attention out_i = sum_j (q_i . k_j) v_j / sum_j (q_i . k_j), linear order.

    Uses the mean-based form: kv = k^T v / n (d x d per head) and z = 1 / (q . mean_j k_j + eps),
    so no intermediate grows with n. q: (B, h, N, d), k and v: (B, h, n, d) -> (B, h, N, d).
    """
    n = k.shape[-2]
    kv = k.transpose(-2, -1) @ (v * (1.0 / n))  # (B, h, d, d)
    k_mean = k.mean(dim=-2, keepdim=True).transpose(-2, -1)  # (B, h, d, 1)
    # one matmul for numerator and denominator: q @ [kv | mean(k)]
    qkv = q @ torch.cat([kv, k_mean], dim=-1)  # (B, h, N, d + 1)
    return qkv[..., :-1] / (qkv[..., -1:] + DENOM_EPS)


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
        out = linear_attention(q, k, _at_least_fp32(v))
    return out.to(v.dtype)


def focused_linear_attention_tokens(
    q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, focusing_factor: float = 3.0
) -> Tensor:
    """Focused linear attention on token-layout tensors, without the DWC term; equal to
    :func:`focused_linear_attention` with heads as contiguous channel blocks, but with fewer passes:

    - f_p's per-token rescale s cancels between numerator and denominator except at the eps, so q is
      never rescaled: out = (g_q . KV) / (g_q . mean(phi(k)) + eps / s_q) with g = y^p;
    - all heads share one block-diagonal (C, C) summary, so no head permutes are materialised.

    Args:
        q: raw queries (B, N, C); k: raw keys with positional encoding (B, n, C); v: values (B, n, C).
        scale: learnable temperature (1, 1, C).
        num_heads: heads h (C = h * d).
        focusing_factor: power p.

    Returns:
        (B, N, C) in v's dtype.
    """
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


def resize_token_grid(tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a (1, n, C) table stored on a square grid to (1, H * W, C), bilinear, align_corners=False."""
    n, c = tokens.shape[1], tokens.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"a token table of {n} entries is not a square grid")
    if (side, side) == tuple(size):
        return tokens
    grid = tokens.reshape(1, side, side, c).permute(0, 3, 1, 2)  # (1, C, s, s)
    grid = F.interpolate(_at_least_fp32(grid), size=size, mode="bilinear", align_corners=False).to(tokens.dtype)
    return grid.flatten(2).transpose(1, 2)  # (1, H*W, C)


class FocusedLinearAttention(nn.Module):
    """Focused linear attention over an H x W token grid, as in the published FLatten models.

    Parameter names match the published checkpoints: ``q``, ``kv`` (or ``qkv`` when ``fused_qkv``),
    ``proj``, ``scale``, ``positional_encoding``, ``dwc`` and, with ``sr_ratio > 1``, ``sr``, ``norm``.

    Args:
        dim: channels C.
        num_heads: heads h; head dim d = C / h.
        grid_size: (H, W) token grid the positional encoding is stored at (the training grid,
            56 x 56 for stage 1 at 224 x 224). It is resized to any other grid on the fly.
        qkv_bias: bias in the q / kv projections.
        sr_ratio: spatial reduction of keys and values (conv k = s = sr, then LayerNorm).
        focusing_factor: power p of the focusing function.
        kernel_size: DWC kernel; one depthwise filter bank of size d shared by all heads.
        proj_drop: dropout after the output projection.
        fused_qkv: one ``qkv`` projection (Swin naming) instead of ``q`` and ``kv`` (PVT naming).

    With autograd the attention core is :class:`~seg.layers.fused.FocusedTokens` (closed-form backward).
    Without it (inference; float32 / float64, global keys) the forward takes a leaner path, tested equal:
    1 / T and eps folded into one stacked q / k projection (cached per grid while the parameters are
    unchanged), q and k through the kernel together in place, per-head summaries, and the attention added
    onto the DWC term.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: tuple[int, int] = (56, 56),
        qkv_bias: bool = True,
        sr_ratio: int = 1,
        focusing_factor: float = 3.0,
        kernel_size: int = 5,
        proj_drop: float = 0.0,
        fused_qkv: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if fused_qkv and sr_ratio > 1:
            raise ValueError("fused_qkv projects q, k and v from the same tokens: it needs sr_ratio=1")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.focusing_factor = focusing_factor
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        else:
            self.q = Linear(dim, dim, bias=qkv_bias)
            self.kv = Linear(dim, dim * 2, bias=qkv_bias)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2,
                             groups=self.head_dim)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        kv_grid = (grid_size[0] // sr_ratio) * (grid_size[1] // sr_ratio)
        self.positional_encoding = nn.Parameter(torch.zeros(1, kv_grid, dim))
        self._cache: dict[tuple, object] = {}

    def _eval_cached(self, name: str, size: tuple[int, int], build: Callable[[], object]) -> object:
        """``build()``, cached per (name, size) outside training and autograd while no parameter changes."""
        if self.training or torch.is_grad_enabled():
            return build()
        key = (name, size, tuple((p.device, p.dtype, p._version) for p in self.parameters()))
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) > 16:
                self._cache.clear()
            with torch.no_grad():
                cached = self._cache[key] = build()
        return cached

    def positional_encoding_at(self, size: tuple[int, int]) -> Tensor:
        """The positional encoding resized to an (H', W') key grid; cached per size in eval mode."""
        return self._eval_cached("pe", size, lambda: resize_token_grid(self.positional_encoding, size))

    def _projection_weights(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor, Tensor | None]:
        """(w, b) of q, k and v, whichever of ``q`` / ``kv`` / ``qkv`` holds them."""
        if self.fused_qkv:
            wq, wk, wv = self.qkv.weight.chunk(3)
            bq, bk, bv = self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None, None, None)
        else:
            wq, bq = self.q.weight, self.q.bias
            wk, wv = self.kv.weight.chunk(2)
            bk, bv = self.kv.bias.chunk(2) if self.kv.bias is not None else (None, None)
        return wq, bq, wk, bk, wv, bv

    def _kernel_tables(self, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The q and k projections with the kernel's 1 / T and eps folded in, for :meth:`_forward_inference`.

        (ReLU(z) + eps) / T = max(z / T + eps / T, eps / T) for T > 0, so with W' = W / T, b' = (b + eps) / T
        and pe' = pe / T the kernel input is one matmul, one add (keys) and one clamp. Returns W' of q and k
        stacked (2C, C), their b' (2C,), pe' (1, N, C) and the floor eps / T (C,).
        """
        wq, bq, wk, bk, _, _ = self._projection_weights()
        inv_temp = 1.0 / F.softplus(self.scale.view(-1))  # (C,)
        floor = KERNEL_EPS * inv_temp
        bias = lambda b: floor if b is None else b * inv_temp + floor
        weight = torch.cat([wq * inv_temp[:, None], wk * inv_temp[:, None]])  # (2C, C)
        pe = resize_token_grid(self.positional_encoding, size) * inv_temp
        return weight, torch.cat([bias(bq), bias(bk)]), pe, floor

    def _fast_inference(self, x: Tensor) -> bool:
        """Whether :meth:`_forward_inference` applies: no autograd, autocast or compiler, global keys."""
        return (
            self.sr_ratio == 1
            and not torch.is_grad_enabled()
            and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(x.device.type)
            and not torch.compiler.is_compiling()
        )

    def _project(self, x: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
        """q (B, N, C) and k, v (B, n, C) plus the key grid (H', W').

        The fused ``kv`` / ``qkv`` weights are applied slice by slice so that each output is contiguous.
        """
        B, N, C = x.shape
        wq, bq, wk, bk, wv, bv = self._projection_weights()
        q = linear(x, wq, bq)
        if self.sr_ratio > 1:
            x_map = x.transpose(1, 2).reshape(B, C, *size)  # (B, C, H, W)
            x_map = self.sr(x_map)  # (B, C, H', W')
            size = (x_map.shape[2], x_map.shape[3])
            x = self.norm(x_map.flatten(2).transpose(1, 2))  # (B, n, C)
        return q, linear(x, wk, bk), linear(x, wv, bv), size

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x: (B, N, C) tokens of an H x W grid (N = H * W) -> (B, N, C)."""
        B, N, C = x.shape
        H, W = size
        if N != H * W:
            raise ValueError(f"{N} tokens do not form a {H} x {W} grid")
        if self._fast_inference(x):
            return self._forward_inference(x, size)
        q, k, v, kv_size = self._project(x, size)
        k = k + self.positional_encoding_at(kv_size).to(k.dtype)
        out = focused_linear_attention_tokens(q, k, v, self.scale, self.num_heads, self.focusing_factor)
        out = out + self._rank_restoration(v, kv_size, size)
        return self.proj_drop(self.proj(out))

    def _forward_inference(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """:meth:`forward` without autograd: the kernel's scale folded into the q / k projection (one matmul),
        q and k through the kernel together, in place, and the attention added onto the DWC term."""
        B, N, C = x.shape
        weight, bias, pe, floor = self._eval_cached("kernel", size, lambda: self._kernel_tables(size))
        *_, wv, bv = self._projection_weights()
        y = linear(x, weight.to(x.dtype), bias.to(x.dtype))  # (B, N, 2C): q and k, over T, plus eps / T
        y[..., C:] += pe.to(x.dtype)  # keys carry the positional encoding
        y = y.view(B, N, 2, C).clamp_min_(floor.to(x.dtype))  # (ReLU(.) + eps) / T
        v = linear(x, wv, bv)  # (B, N, C)
        out = self._rank_restoration(v, size, size)
        out = focused_attention_into(y, v, self.num_heads, self.focusing_factor, out)
        return self.proj_drop(self.proj(out))

    def _rank_restoration(self, v: Tensor, kv_size: tuple[int, int], size: tuple[int, int]) -> Tensor:
        """DWC(v) on the H x W map with one filter bank shared by all heads: (B, n, C) -> (B, N, C).

        Runs channels-last on all C channels at once, the d filters repeated for each head, so the
        token layout needs no copies in or out.
        """
        B, n, C = v.shape
        v_map = v.view(B, *kv_size, C).permute(0, 3, 1, 2)  # (B, C, H', W'), channels-last memory
        if kv_size != size:
            # sr > 1: bring v back to the full grid with a 2-D bilinear resize (the published code
            # interpolates the flattened sequence in 1-D, which mixes rows on non-square maps)
            v_map = F.interpolate(v_map, size=size, mode="bilinear", align_corners=False)
        weight = self.dwc.weight.repeat(self.num_heads, 1, 1, 1)  # (C, 1, k, k)
        bias = self.dwc.bias.repeat(self.num_heads) if self.dwc.bias is not None else None
        out = depthwise_conv_same(v_map, weight, bias)  # (B, C, H, W)
        return out.permute(0, 2, 3, 1).reshape(B, -1, C)  # (B, N, C)
