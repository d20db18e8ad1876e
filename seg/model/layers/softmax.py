"""Softmax spatial-reduction attention of PVT (Wang et al., ICCV 2021): the A/B baseline of FLatten-PVT."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from seg.model.layers.projections import ProjectedAttention

__all__ = ["SpatialReductionAttention"]


class SpatialReductionAttention(ProjectedAttention):
    """Multi-head softmax attention whose keys and values come from an sr-times reduced grid.

    Parameter names match PVT checkpoints (``q``, ``kv``, ``proj``, ``sr``, ``norm``). The attention
    itself runs through ``scaled_dot_product_attention``; with ``fused=False`` it materialises the N x n
    matrix softmax(q k^T / sqrt(d)) as the published PVT code does (the baseline the benchmarks compare with).

    Args:
        dim: channels C.
        num_heads: heads h.
        qkv_bias: bias in the q / kv projections.
        sr_ratio: spatial reduction of keys and values (conv k = s = sr, then LayerNorm).
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
        fused: run through ``scaled_dot_product_attention`` (True) or the explicit matrix (False).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        sr_ratio: int = 1,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused: bool = True,
    ) -> None:
        super().__init__(dim, num_heads, {"q": 1, "kv": 2}, qkv_bias, sr_ratio, proj_drop)
        self.attn_drop = attn_drop
        self.fused = fused

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x: (B, N, C) tokens of an H x W grid -> (B, N, C)."""
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)  # (B, h, N, d)
        x, _ = self.key_value_tokens(x, size)  # (B, n, C)
        k, v = self.kv(x).reshape(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, n, d)
        drop = self.attn_drop if self.training else 0.0
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:
            attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, h, N, n)
            out = F.dropout(attn.softmax(dim=-1), drop) @ v  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(out))
