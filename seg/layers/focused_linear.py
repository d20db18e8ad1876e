"""Focused linear attention (FLatten, Han et al., ICCV 2023, arXiv 2308.00442): the reference.

The maths lives in pure functions over (B, h, N, d) tensors that autograd differentiates;
:class:`FocusedLinearAttention` is a thin module that owns the projections, the optional spatial
reduction, the learned positional encoding on k, the per-channel temperature and the depthwise conv
(DWC) that restores the rank. This is what runs on every device unless a backend of :mod:`seg.kernels`
(``cpu``: closed-form backward and oneDNN products; ``triton``: fused CUDA kernels) takes over; the
backends are tested equal to it.

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

__all__ = [
    "DENOM_EPS",
    "KERNEL_EPS",
    "FocusedLinearAttention",
    "focus",
    "focused_kernel",
    "focused_linear_attention",
    "linear_attention",
    "resize_token_grid",
]

KERNEL_EPS = 1e-6  # added after ReLU so that no feature is exactly zero
DENOM_EPS = 1e-6  # added to the normaliser q . mean(k)

# A backend's forward: (module, x, size) -> output, or None to leave this call to the reference.
FastPath = Callable[["FocusedLinearAttention", Tensor, tuple[int, int]], "Tensor | None"]


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
    """phi_p(x) = f_p((ReLU(x) + eps) / softplus(scale)), computed in float32 (float64 stays float64).

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
        out = linear_attention(q, k, _at_least_fp32(v))
    return out.to(v.dtype)


def resize_token_grid(tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a (1, n, C) table stored on a square grid to (1, H * W, C), bilinear, align_corners=False."""
    n, c = tokens.shape[1], tokens.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"a token table of {n} entries is not a square grid")
    if (side, side) == tuple(size) and not torch.compiler.is_compiling():  # tracing: no guard on the stored grid
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

    ``fast_path`` is set by :func:`seg.kernels.set_backend`; None (the default) runs this reference.
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
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2,
                             groups=self.head_dim)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        kv_grid = (grid_size[0] // sr_ratio) * (grid_size[1] // sr_ratio)
        self.positional_encoding = nn.Parameter(torch.zeros(1, kv_grid, dim))
        self.fast_path: FastPath | None = None

    def positional_encoding_at(self, size: tuple[int, int]) -> Tensor:
        """The positional encoding resized to an (H', W') key grid: (1, H' * W', C)."""
        return resize_token_grid(self.positional_encoding, size)

    def projection_weights(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor, Tensor | None]:
        """(w, b) of q, k and v, whichever of ``q`` / ``kv`` / ``qkv`` holds them."""
        if self.fused_qkv:
            wq, wk, wv = self.qkv.weight.chunk(3)
            bq, bk, bv = self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None, None, None)
        else:
            wq, bq = self.q.weight, self.q.bias
            wk, wv = self.kv.weight.chunk(2)
            bk, bv = self.kv.bias.chunk(2) if self.kv.bias is not None else (None, None)
        return wq, bq, wk, bk, wv, bv

    def key_value_tokens(self, x: Tensor, size: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """The tokens keys and values are projected from: x itself, or its sr-reduced grid (B, n, C)."""
        if self.sr_ratio == 1:
            return x, size
        B, N, C = x.shape
        x_map = self.sr(x.transpose(1, 2).reshape(B, C, *size))  # (B, C, H', W')
        return self.norm(x_map.flatten(2).transpose(1, 2)), (x_map.shape[2], x_map.shape[3])  # (B, n, C)

    def project(self, x: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
        """q (B, N, C), k with the positional encoding and v (B, n, C), and the key grid (H', W')."""
        if self.fused_qkv:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            kv_size = size
        else:
            x_kv, kv_size = self.key_value_tokens(x, size)
            q = self.q(x)
            k, v = self.kv(x_kv).chunk(2, dim=-1)
        return q, k + self.positional_encoding_at(kv_size).to(k.dtype), v, kv_size

    def rank_restoration(self, v: Tensor, kv_size: tuple[int, int], size: tuple[int, int]) -> Tensor:
        """DWC(v), one filter bank of d channels shared by all heads: (B, n, C) -> (B, N, C).

        With sr > 1, v is first brought back to the H x W grid by a 2-D bilinear resize (the published
        code interpolates the flattened sequence in 1-D, which mixes rows on non-square maps).
        """
        B, n, C = v.shape
        h, d = self.num_heads, self.head_dim
        v_map = v.reshape(B, *kv_size, h, d).permute(0, 3, 4, 1, 2).reshape(B * h, d, *kv_size)  # (B*h, d, H', W')
        if kv_size != size:
            v_map = F.interpolate(v_map, size=size, mode="bilinear", align_corners=False)  # (B*h, d, H, W)
        out = self.dwc(v_map)  # (B*h, d, H, W)
        return out.reshape(B, h, d, -1).permute(0, 3, 1, 2).reshape(B, -1, C)  # (B, N, C)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x: (B, N, C) tokens of an H x W grid (N = H * W) -> (B, N, C)."""
        B, N, C = x.shape
        H, W = size
        if N != H * W:
            raise ValueError(f"{N} tokens do not form a {H} x {W} grid")
        if self.fast_path is not None:
            out = self.fast_path(self, x, size)
            if out is not None:
                return out
        q, k, v, kv_size = self.project(x, size)
        heads = lambda t: t.reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        out = focused_linear_attention(heads(q), heads(k), heads(v), self.scale, self.focusing_factor)
        out = out.transpose(1, 2).reshape(B, N, C) + self.rank_restoration(v, kv_size, size)  # (B, N, C)
        return self.proj_drop(self.proj(out))
