"""Focused linear attention as a drop-in layer for convolutional networks: NCHW in, NCHW out, any H x W.

:class:`FocusedLinearAttention2d` wraps the token-level :class:`~seg.model.layers.FocusedLinearAttention` (same maths,
same parameters) in a pre-norm residual block, so it can be appended to a ResNet stage or a neck level::

    model.layer3 = nn.Sequential(model.layer3, FocusedLinearAttention2d(256, num_heads=4))

Choice: the layer is residual by default, ``x + gamma * attention(LayerNorm(x))`` with a learnable per-channel
``gamma`` (``layer_scale``, initialised at ``init_scale``); inserted into a pretrained network it starts close
to the identity. ``residual=False`` returns ``attention(LayerNorm(x))`` alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seg.model.layers.focused_linear import FocusedLinearAttention

__all__ = ["FocusedLinearAttention2d"]


class FocusedLinearAttention2d(nn.Module):
    """Focused linear attention over a (B, C, H, W) map -> (B, C, H, W).

    Args:
        dim: channels C.
        num_heads: heads h (C divisible by h).
        sr_ratio: spatial reduction of keys and values (strided conv + LayerNorm); 1 attends to every position.
        focusing_factor: power p of the focusing function.
        kernel_size: kernel of the rank-restoring depthwise conv.
        positional_encoding: learn a positional encoding on the keys, stored at ``grid_size`` and resized
            bilinearly to every map; False keeps it at zero and frozen (the DWC still sees positions).
        grid_size: (H, W) map size the positional encoding is stored at (e.g. the training map size).
        residual: return x + gamma * attention(norm(x)); False returns attention(norm(x)).
        init_scale: initial value of gamma (only with ``residual``); 1.0 for a plain residual sum.
        qkv_bias: bias in the q / kv projections.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        sr_ratio: int = 1,
        focusing_factor: float = 3.0,
        kernel_size: int = 5,
        positional_encoding: bool = True,
        grid_size: tuple[int, int] = (14, 14),
        residual: bool = True,
        init_scale: float = 1e-2,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = FocusedLinearAttention(dim, num_heads, grid_size, qkv_bias=qkv_bias, sr_ratio=sr_ratio,
                                           focusing_factor=focusing_factor, kernel_size=kernel_size,
                                           proj_drop=proj_drop)
        if positional_encoding:
            nn.init.trunc_normal_(self.attn.positional_encoding, std=0.02)
        else:
            self.attn.positional_encoding.requires_grad_(False)
        for linear in (self.attn.q, self.attn.kv, self.attn.proj):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        self.residual = residual
        self.layer_scale = nn.Parameter(torch.full((dim,), float(init_scale))) if residual else None

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        tokens = self.norm(x.flatten(2).transpose(1, 2))  # (B, N, C), N = H * W
        out = self.attn(tokens, (H, W))  # (B, N, C)
        out = out.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        if not self.residual:
            return out
        return x + self.layer_scale.view(1, C, 1, 1).to(out.dtype) * out
