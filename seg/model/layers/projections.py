"""The projections the token attentions of the PVT / Swin skeletons share: linear projections of the tokens, an
optional sr-times spatial reduction of the key / value tokens and the output projection, with PVT's parameter
names (``sr``, ``norm``, ``proj``) so published checkpoints load unchanged."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from seg.kernels.onednn import Linear

__all__ = ["ProjectedAttention"]


class ProjectedAttention(nn.Module):
    """Base of :class:`~seg.model.layers.SpatialReductionAttention`,
    :class:`~seg.model.layers.FocusedLinearAttention` and :class:`~seg.model.layers.PolaLinearAttention`;
    subclasses add their own tables and ``forward``.

    Args:
        dim: channels C.
        num_heads: heads h; head dim d = C / h.
        projections: input projections by name, each C -> k C for its multiple k (e.g. ``{'q': 1, 'kv': 2}``).
        qkv_bias: bias in the input projections.
        sr_ratio: spatial reduction of keys and values (conv k = s = sr, then LayerNorm); 1: none.
        proj_drop: dropout after the output projection.
        fused: one projection of the same tokens for queries, keys and values (needs ``sr_ratio=1``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        projections: Mapping[str, int],
        qkv_bias: bool = True,
        sr_ratio: int = 1,
        proj_drop: float = 0.0,
        fused: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if fused and sr_ratio > 1:
            raise ValueError("fused_qkv projects q, k and v from the same tokens: it needs sr_ratio=1")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        for name, multiple in projections.items():
            self.add_module(name, Linear(dim, multiple * dim, bias=qkv_bias))
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def key_value_tokens(self, x: Tensor, size: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """The tokens keys and values are projected from: x itself, or its sr-reduced grid (B, n, C)."""
        if self.sr_ratio == 1:
            return x, size
        B, N, C = x.shape
        x_map = self.sr(x.transpose(1, 2).reshape(B, C, *size))  # (B, C, H', W')
        return self.norm(x_map.flatten(2).transpose(1, 2)), (x_map.shape[2], x_map.shape[3])  # (B, n, C)
