"""MLLA linear attention with RoPE (Han et al., "Demystify Mamba in Vision: A Linear Attention Perspective",
NeurIPS 2024, arXiv 2405.16605; MILA in the final paper) and the Mamba-like block around it.

The maths lives in pure functions over (B, h, N, d) tensors that autograd differentiates:
:func:`mlla_linear_attention` with the 2-D rotary position embedding of :mod:`seg.model.layers.rope` over all C
channels (rows in the first C / 2, columns in the last C / 2)

    o_i = rho(q_i) [ (1/N) sum_j rho(k_j)^T v_j ] / ( q_i . (1/N) sum_j k_j + eps ),  q, k = ELU(.) + 1,

with the normaliser taken on the un-rotated q and k. :class:`MllaAttention` is the thin module owning the
``qk`` projection and the locally-enhanced positional encoding ``lepe`` (values are the attention input
itself: there is no value projection); the Mamba-like block around it is in :mod:`seg.model.backbones.mlla`.

Positions: the angles are computed from the live (H, W) grid on every call, as the published segmentation
backbone does; the classification models' stored ``rope.rotations`` buffer (fixed at the 224 x 224 grid) is not
a part of these modules. At 224 x 224 both give the same angles.

Numerics: the kernel, the rotation, the d x d summary and the normaliser run in float32 even under autocast,
in the mean-based form (summary k^T v / N, normaliser q . mean(k)) that keeps every intermediate independent
of N, so fp16 inputs cannot overflow the sums.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seg.kernels.onednn import Linear
from seg.model.layers.precision import elu_feature_inputs
from seg.model.layers.rope import RoPE, apply_rope

__all__ = ["DENOM_EPS", "MllaAttention", "conv_tokens", "mlla_linear_attention"]

DENOM_EPS = 1e-6  # added to the normaliser q . mean(k), outside the dot product

Size = tuple[int, int]


def mlla_linear_attention(q: Tensor, k: Tensor, v: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """MLLA linear attention without the LePE term, returned in v's dtype.

    Args:
        q: raw query projections (B, h, N, d).
        k: raw key projections (B, h, N, d).
        v: values (B, h, N, d).
        sin, cos: RoPE tables (h, N, d) of the token grid (:class:`seg.model.layers.rope.RoPE` split into heads).
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, vf, sin, cos = elu_feature_inputs(q, k, v, sin, cos)
        q_rot, k_rot = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        n = k.shape[-2]
        kv = k_rot.transpose(-2, -1) @ (vf * (1.0 / n))  # (B, h, d, d) mean over tokens
        k_mean = k.mean(dim=-2, keepdim=True).transpose(-2, -1)  # (B, h, d, 1)
        out = (q_rot @ kv) / (q @ k_mean + DENOM_EPS)  # (B, h, N, d)
    return out.to(v.dtype)


class MllaAttention(nn.Module):
    """Linear attention with RoPE and LePE over an H x W token grid, as in the published MLLA models.

    Parameter names match the published checkpoints: ``qk`` (Linear C -> 2C, [q | k]) and ``lepe``
    (depthwise 3 x 3 with bias on the values); ``rope`` holds no tensors.

    Args:
        dim: channels C.
        num_heads: heads h; head dim d = C / h.
        qkv_bias: bias in the ``qk`` projection.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads or dim % 4 or (dim // num_heads) % 2:
            raise ValueError(f"MLLA needs channels divisible by the heads and by 4 and an even head dim, got C={dim}, "
                             f"h={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk = Linear(dim, dim * 2, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.rope = RoPE(dim, endpoint=False, persistent=False)  # angles of the live grid, never loaded

    def forward(self, x: Tensor, size: Size) -> Tensor:
        """x: (B, N, C) tokens of an H x W grid, also the values -> (B, N, C)."""
        B, N, C = x.shape
        if N != size[0] * size[1]:
            raise ValueError(f"{N} tokens do not form a {size[0]} x {size[1]} grid")
        q, k = self.qk(x).chunk(2, dim=-1)  # (B, N, C) each
        heads = lambda t: t.reshape(-1, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        sin, cos = (heads(t)[0] for t in self.rope(size))  # (N, C) -> (h, N, d)
        out = mlla_linear_attention(heads(q), heads(k), heads(x), sin, cos)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return out + conv_tokens(self.lepe, x, size)


def conv_tokens(conv: nn.Module, x: Tensor, size: Size) -> Tensor:
    """Apply a same-size conv to (B, N, C) tokens as a (B, C, H, W) map: -> (B, N, C)."""
    B, N, C = x.shape
    y = conv(x.transpose(1, 2).reshape(B, C, *size))  # (B, C, H, W)
    return y.flatten(2).transpose(1, 2)  # (B, N, C)
