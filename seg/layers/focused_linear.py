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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FocusedLinearAttention",
    "focus",
    "focused_kernel",
    "focused_linear_attention",
    "focused_linear_attention_tokens",
    "linear_attention",
    "resize_token_grid",
]

KERNEL_EPS = 1e-6  # added after ReLU so that no feature is exactly zero
DENOM_EPS = 1e-6  # added to the normaliser q . mean(k)


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


class _KernelPower(torch.autograd.Function):
    """g = u^p with u = y / |y| and s = |y| / |u^p| for y = (ReLU(x) + eps) / T, so that f_p(y) = s * g.

    Powering the unit vector keeps every value bounded (u, g in (0, 1], |g| >= C^(-p/2)): nothing under-
    or overflows in float32, whatever the scale of y (a token whose channels are all <= 0 has y = eps / T).
    The backward is written in closed form, which saves most of the passes autograd would make through
    ReLU, the power and two norms. With G = dL/dg, S = dL/ds, n = |y|:
    dL/dy = [p (g / u) (G - S s g / |g|^2) + u ((p + 1) S s - p G.g)] / n,
    then dL/dx = dL/dy / T where x > 0, and dL/d(1/T) = sum over tokens of dL/dy (ReLU(x) + eps).
    """

    @staticmethod
    def forward(ctx, x: Tensor, inv_temp: Tensor, p: float) -> tuple[Tensor, Tensor]:
        y = torch.addcmul(inv_temp * KERNEL_EPS, F.relu(x), inv_temp)  # (ReLU(x) + eps) / T in one pass
        norm_y = torch.linalg.vector_norm(y, dim=-1, keepdim=True)  # (B, N, 1)
        u = y * norm_y.reciprocal()
        g = u.pow(p)
        norm_g = torch.linalg.vector_norm(g, dim=-1, keepdim=True)  # >= C^(-p/2)
        s = norm_y / norm_g
        ctx.save_for_backward(y, u, g, norm_y, norm_g, s, inv_temp)
        ctx.p = p
        return g, s

    @staticmethod
    def backward(ctx, grad_g: Tensor | None, grad_s: Tensor | None) -> tuple[Tensor, Tensor, None]:
        y, u, g, norm_y, norm_g, s, inv_temp = ctx.saved_tensors
        p = ctx.p
        grad_g = torch.zeros_like(g) if grad_g is None else grad_g
        grad_s = torch.zeros_like(s) if grad_s is None else grad_s
        ss = grad_s * s  # (B, N, 1)
        t = torch.addcmul(grad_g, g, ss / norm_g.square(), value=-1)  # G - S s g / |g|^2
        radial = (p + 1) * ss - p * torch.linalg.vecdot(grad_g, g).unsqueeze(-1)  # (B, N, 1)
        grad_y = torch.addcmul(u * radial, t, g / u, value=p) / norm_y
        grad_inv_temp = (grad_y * y).sum(dim=tuple(range(y.dim() - 1)), keepdim=True) / inv_temp  # (1, 1, C)
        grad_x = (grad_y * inv_temp).masked_fill_(y <= inv_temp * KERNEL_EPS, 0.0)  # ReLU's gate
        return grad_x, grad_inv_temp, None


def _kernel_power(x: Tensor, inv_temp: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """g = (y / |y|)^p and the per-token factor s = |y| / |g| with f_p(y) = s * g, y = (ReLU(x) + eps) / T.

    x: (B, N, C) float32, inv_temp: (1, 1, C) -> g (B, N, C), s (B, N, 1).
    """
    return _KernelPower.apply(x, inv_temp, p)


def _head_blocks(channels: int, num_heads: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(C, C) block-diagonal ones (one d x d block per head) and the (C, h) channel-to-head indicator."""
    head = torch.arange(channels, device=device) // (channels // num_heads)  # (C,) head of each channel
    onehot = F.one_hot(head, num_heads).to(dtype)  # (C, h)
    return onehot @ onehot.T, onehot


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
    B, N, C = q.shape
    n = k.shape[1]
    with torch.autocast(device_type=q.device.type, enabled=False):
        inv_temp = 1.0 / F.softplus(_at_least_fp32(scale))  # (1, 1, C)
        g_q, s_q = _kernel_power(_at_least_fp32(q), inv_temp, focusing_factor)
        g_k, s_k = _kernel_power(_at_least_fp32(k), inv_temp, focusing_factor)
        phi_k = g_k * (s_k * (1.0 / n))  # (B, n, C) phi(k) / n
        kv = phi_k.transpose(1, 2) @ _at_least_fp32(v)  # (B, C, C), sum_j phi(k_j) v_j^T / n
        k_mean = phi_k.sum(dim=1).unsqueeze(-1)  # (B, C, 1) mean_j phi(k_j)
        if num_heads > 1:
            blocks, onehot = _head_blocks(C, num_heads, q.device, g_q.dtype)
            kv = kv * blocks  # keep each head's d x d block
            k_mean = k_mean * onehot  # (B, C, h)
        num_den = g_q @ torch.cat([kv, k_mean], dim=-1)  # (B, N, C + h)
        d = C // num_heads
        num = num_den[..., :C].view(B, N, num_heads, d)  # (B, N, h, d)
        den = num_den[..., C:].unsqueeze(-1) + (DENOM_EPS / s_q).unsqueeze(-1)  # (B, N, h, 1)
        out = (num * den.reciprocal()).view(B, N, C)  # (B, N, C)
    return out.to(v.dtype)


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
        self._pe_cache: dict[tuple, Tensor] = {}

    def positional_encoding_at(self, size: tuple[int, int]) -> Tensor:
        """The positional encoding resized to an (H', W') key grid; cached per size in eval mode."""
        pe = self.positional_encoding
        if self.training or torch.is_grad_enabled():
            return resize_token_grid(pe, size)
        key = (size, pe.device, pe.dtype, pe._version)
        cached = self._pe_cache.get(key)
        if cached is None:
            if len(self._pe_cache) > 16:
                self._pe_cache.clear()
            cached = self._pe_cache[key] = resize_token_grid(pe.detach(), size)
        return cached

    def _project(self, x: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
        """q (B, N, C) and k, v (B, n, C) plus the key grid (H', W').

        The fused ``kv`` / ``qkv`` weights are applied slice by slice so that each output is contiguous.
        """
        B, N, C = x.shape
        if self.fused_qkv:
            wq, wk, wv = self.qkv.weight.chunk(3)
            bq, bk, bv = self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None, None, None)
            return F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv), size
        q = self.q(x)
        if self.sr_ratio > 1:
            x_map = x.transpose(1, 2).reshape(B, C, *size)  # (B, C, H, W)
            x_map = self.sr(x_map)  # (B, C, H', W')
            kv_size = (x_map.shape[2], x_map.shape[3])
            x = self.norm(x_map.flatten(2).transpose(1, 2))  # (B, n, C)
        else:
            kv_size = size
        wk, wv = self.kv.weight.chunk(2)
        bk, bv = self.kv.bias.chunk(2) if self.kv.bias is not None else (None, None)
        return q, F.linear(x, wk, bk), F.linear(x, wv, bv), kv_size

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x: (B, N, C) tokens of an H x W grid (N = H * W) -> (B, N, C)."""
        B, N, C = x.shape
        H, W = size
        if N != H * W:
            raise ValueError(f"{N} tokens do not form a {H} x {W} grid")
        q, k, v, kv_size = self._project(x, size)
        k = k + self.positional_encoding_at(kv_size).to(k.dtype)
        out = focused_linear_attention_tokens(q, k, v, self.scale, self.num_heads, self.focusing_factor)
        out = out + self._rank_restoration(v, kv_size, size)
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
        out = F.conv2d(v_map, weight, bias, padding=self.dwc.padding, groups=C)  # (B, C, H, W)
        return out.permute(0, 2, 3, 1).reshape(B, -1, C)  # (B, N, C)
