"""Polarity-aware linear attention (PolaFormer; Meng et al., ICLR 2025, arXiv 2501.15061), the linear
attention of the PolaFormer encoders on the FLatten-PVT and FLatten-Swin skeletons (:mod:`seg.model.backbones.pola`).

A ReLU kernel keeps only the positive-positive part of q . k. PolaFormer splits every query and key into its
positive and negative parts, raised to a learned power p, and lets same-sign and opposite-sign interactions
write to two halves of the value channels:

    t      = softplus(scale)                       per-channel temperature (1, 1, C); q <- q / t, k <- k + PE, k / t
    p      = 1 + alpha * sigmoid(power)            one power per head and channel (1, h, 1, d), in (1, 1 + alpha)
    K_j    = [relu(k_j)^p || relu(-k_j)^p]                                 (B, h, n, 2d)
    Qs_i   = [relu(q_i)^p || relu(-q_i)^p],  Qo_i = [relu(-q_i)^p || relu(q_i)^p]
    Os_i   = Qs_i (mean_j K_j^T vs_j) / (Qs_i . mean_j K_j + 1e-6)       same-sign half
    Oo_i   = Qo_i (mean_j K_j^T vo_j) / (Qo_i . mean_j K_j + 1e-6)       opposite-sign half; out_i = [Os_i || Oo_i]

with v = [vs || vo] split in halves of d / 2 channels. The module adds FLatten's rank-restoring depthwise conv of
v (one d-channel filter bank shared by the heads), multiplies by the raw gate g and projects.

Numerics: the temperature, the powers (p up to 1 + alpha underflows in half precision, leaving only the 1e-6
of the normaliser), the products, the means and the normalisers run in float32 under autocast (float64 stays
float64); the result is cast back to v's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg.kernels.focused_linear.reference import rank_restoration, resize_token_grid
from seg.model.layers.precision import at_least_fp32
from seg.model.layers.projections import ProjectedAttention
from seg.model.layers.rala import DENOM_EPS

__all__ = ["PolaLinearAttention", "polarity_aware_linear_attention"]


def polarity_aware_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: Tensor, power: Tensor, alpha: float
) -> Tensor:
    """Polarity-aware linear attention without the DWC term and the gate, returned in v's dtype.

    Args:
        q: raw queries (B, h, N, d), d even.
        k: raw keys with the positional encoding added (B, h, n, d).
        v: values (B, h, n, d).
        scale: temperature parameter before softplus, per head and channel (1, h, 1, d).
        power: power parameter before the sigmoid (1, h, 1, d).
        alpha: range of the power: p = 1 + alpha * sigmoid(power).
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, vf = at_least_fp32(q), at_least_fp32(k), at_least_fp32(v)
        t = F.softplus(scale.to(q.dtype))
        p = 1.0 + alpha * torch.sigmoid(power.to(q.dtype))  # (1, h, 1, d)
        q, k = q / t, k / t
        q_pos, q_neg = F.relu(q) ** p, F.relu(-q) ** p  # (B, h, N, d) each
        keys = torch.cat([F.relu(k) ** p, F.relu(-k) ** p], dim=-1)  # (B, h, n, 2d)
        k_mean = keys.mean(dim=-2, keepdim=True).transpose(-2, -1)  # (B, h, 2d, 1)
        v_same, v_opp = vf.chunk(2, dim=-1)  # 2 x (B, h, n, d/2)
        n = keys.shape[-2]
        halves = []
        for queries, values in (((q_pos, q_neg), v_same), ((q_neg, q_pos), v_opp)):
            queries = torch.cat(queries, dim=-1)  # (B, h, N, 2d)
            kv = keys.transpose(-2, -1) @ (values * (1.0 / n))  # (B, h, 2d, d/2)
            halves.append((queries @ kv) / (queries @ k_mean + DENOM_EPS))  # (B, h, N, d/2)
        out = torch.cat(halves, dim=-1)  # (B, h, N, d)
    return out.to(v.dtype)


class PolaLinearAttention(ProjectedAttention):
    """Polarity-aware linear attention over an H x W token grid, as in the published PolaFormer models.

    Parameter names match the published checkpoints: ``qg`` and ``kv`` (PVT naming) or ``qkvg`` (Swin naming,
    ``fused_qkv``), ``proj``, ``dwc``, ``power``, ``scale``, ``positional_encoding`` and, with
    ``sr_ratio > 1``, ``sr``, ``norm``.

    Args:
        dim: channels C.
        num_heads: heads h; head dim d = C / h (even).
        grid_size: (H, W) token grid the positional encoding is stored at (the 224 x 224 training grid); it is
            resized bilinearly to any other grid.
        alpha: range of the learned power, p in (1, 1 + alpha).
        kernel_size: DWC kernel.
        qkv_bias: bias in the q / g / k / v projections.
        sr_ratio: spatial reduction of keys and values (conv k = s = sr, then LayerNorm); v is brought back to
            the H x W grid for the DWC by a 2-D bilinear resize.
        proj_drop: dropout after the output projection.
        fused_qkv: one ``qkvg`` projection (Swin naming) instead of ``qg`` and ``kv``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: tuple[int, int] = (56, 56),
        *,
        alpha: float = 4.0,
        kernel_size: int = 5,
        qkv_bias: bool = True,
        sr_ratio: int = 1,
        proj_drop: float = 0.0,
        fused_qkv: bool = False,
    ) -> None:
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} / num_heads {num_heads} must give an even head dim")
        super().__init__(dim, num_heads, {"qkvg": 4} if fused_qkv else {"qg": 2, "kv": 2}, qkv_bias, sr_ratio,
                         proj_drop, fused=fused_qkv)
        self.alpha = alpha
        self.fused_qkv = fused_qkv
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2,
                             groups=self.head_dim)
        self.power = nn.Parameter(torch.zeros(1, num_heads, 1, self.head_dim))
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        kv_grid = (grid_size[0] // sr_ratio) * (grid_size[1] // sr_ratio)
        self.positional_encoding = nn.Parameter(torch.zeros(1, kv_grid, dim))

    def project(self, x: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[int, int]]:
        """q and the gate g (B, N, C), k with the positional encoding and v (B, n, C), and the key grid."""
        if self.fused_qkv:
            q, k, v, g = self.qkvg(x).chunk(4, dim=-1)
            kv_size = size
        else:
            q, g = self.qg(x).chunk(2, dim=-1)
            x_kv, kv_size = self.key_value_tokens(x, size)
            k, v = self.kv(x_kv).chunk(2, dim=-1)
        pe = resize_token_grid(self.positional_encoding, kv_size).to(k.dtype)
        return q, g, k + pe, v, kv_size

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x: (B, N, C) tokens of an H x W grid (N = H * W) -> (B, N, C)."""
        B, N, C = x.shape
        if N != size[0] * size[1]:
            raise ValueError(f"{N} tokens do not form a {size[0]} x {size[1]} grid")
        h, d = self.num_heads, self.head_dim
        q, g, k, v, kv_size = self.project(x, size)
        heads = lambda t: t.reshape(B, -1, h, d).transpose(1, 2)  # (B, n, C) -> (B, h, n, d)
        scale = self.scale.reshape(1, h, 1, d)  # channel c = head * d + j
        out = polarity_aware_linear_attention(heads(q), heads(k), heads(v), scale, self.power, self.alpha)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, h, N, d) -> (B, N, C)
        out = out + rank_restoration(v, kv_size, size, self.dwc.weight, self.dwc.bias, h)
        return self.proj_drop(self.proj(out * g))
