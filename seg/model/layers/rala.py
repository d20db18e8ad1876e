"""Rank-augmented linear attention (RALA) and the RoPE softmax attention of RAVLT (Fan et al., CVPR 2025,
arXiv 2411.07635).

Both attentions project a map with one 1x1 conv ``qkvo`` into [q | k | v | o], rotate queries and keys by a
2-D rotary position embedding (RoPE: half of each head's channels by the row index, half by the column index,
computed for the live H x W), add a 5x5 depthwise conv of v (LePE) to the attention output, gate the sum by
the raw o slice and project it with a 1x1 conv ``proj``.

RALA (stages 1-2, linear in N). With kappa(z) = ELU(z) + 1 on q and k:

    alpha   = softmax_j(d^-1/2 * mean_i kappa(q_i) . kappa(k_j))         context-aware key weights (B, h, N)
    k~_j    = N * alpha_j * kappa(k_j)                                   (mean_j k~_j = sum_j alpha_j kappa(k_j))
    out_i   = rope(kappa(q_i)) . [sum_j rope(k~_j)^T v_j / N] / (kappa(q_i) . mean_j k~_j + 1e-6)

so the alpha-weighted key summary raises the rank of the d x d key-value matrix, and the normaliser uses the
un-rotated features. Softmax attention (stages 3-4, quadratic in N): out = softmax(d^-1/2 rope(q) rope(k)^T) v.

Numerics: the kernel, the softmax over keys, the sums and the normaliser run in float32 under autocast
(float64 stays float64), keeping the published mean-based form in which no intermediate grows with N;
the result is cast back to v's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg.model.layers.precision import at_least_fp32, elu_feature_inputs
from seg.model.layers.rope import apply_rope

__all__ = [
    "DENOM_EPS",
    "RALAttention",
    "RoPESoftmaxAttention",
    "rank_augmented_linear_attention",
    "rope_softmax_attention",
]

DENOM_EPS = 1e-6  # added to the normaliser kappa(q) . mean(k~)


def rank_augmented_linear_attention(q: Tensor, k: Tensor, v: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """RALA without the LePE term and the gate, returned in v's dtype.

    Args:
        q: raw query projections (B, h, N, d).
        k: raw key projections (B, h, N, d).
        v: values (B, h, N, d).
        sin, cos: RoPE tables (N, d) of the token grid (:class:`seg.model.layers.rope.RoPE`).
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, vf, sin, cos = elu_feature_inputs(q, k, v, sin, cos)
        N, d = k.shape[-2], k.shape[-1]
        q_mean = q.mean(dim=-2, keepdim=True)  # (B, h, 1, d)
        alpha = torch.softmax(d**-0.5 * (q_mean @ k.transpose(-2, -1)), dim=-1)  # (B, h, 1, N)
        k = k * (alpha.transpose(-2, -1) * N)  # (B, h, N, d) k~, mean over tokens = alpha-weighted sum
        kv = apply_rope(k, sin, cos).transpose(-2, -1) @ (vf * (1.0 / N))  # (B, h, d, d)
        z = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + DENOM_EPS  # (B, h, N, 1)
        out = (apply_rope(q, sin, cos) @ kv) / z  # (B, h, N, d)
    return out.to(v.dtype)


def rope_softmax_attention(q: Tensor, k: Tensor, v: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """softmax(d^-1/2 rope(q) rope(k)^T) v over all N keys (float32 softmax), returned in v's dtype.

    q, k, v: (B, h, N, d); sin, cos: (N, d). Runs through ``scaled_dot_product_attention``, which never
    stores the N x N matrix where a memory-efficient kernel exists.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, vf = at_least_fp32(q), at_least_fp32(k), at_least_fp32(v)
        sin, cos = sin.to(q.dtype), cos.to(q.dtype)
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        out = F.scaled_dot_product_attention(q, k, vf, scale=q.shape[-1] ** -0.5)  # (B, h, N, d)
    return out.to(v.dtype)


class _GatedRoPEAttention(nn.Module):
    """Shared projections of RAVLT's attentions; parameter names as the published checkpoints
    (``qkvo``, ``lepe``, ``proj``). Subclasses give the attention itself (:meth:`attend`).

    Args:
        dim: channels C.
        num_heads: heads h; head dim d = C / h.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkvo = nn.Conv2d(dim, 4 * dim, 1)
        self.lepe = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """x: (B, C, H, W); rope: (sin, cos) tables (N, d) of the H x W grid -> (B, C, H, W)."""
        B, C, H, W = x.shape
        q, k, v, o = self.qkvo(x).chunk(4, dim=1)  # 4 x (B, C, H, W)
        heads = lambda t: t.reshape(B, self.num_heads, self.head_dim, H * W).transpose(-2, -1)  # (B, h, N, d)
        out = self.attend(heads(q), heads(k), heads(v), *rope)  # (B, h, N, d)
        out = out.transpose(-2, -1).reshape(B, C, H, W)  # (B, C, H, W)
        return self.proj((out + self.lepe(v)) * o)


class RALAttention(_GatedRoPEAttention):
    """Rank-augmented linear attention (published ``GateLinearAttentionNoSilu``): linear in N."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
        return rank_augmented_linear_attention(q, k, v, sin, cos)


class RoPESoftmaxAttention(_GatedRoPEAttention):
    """Softmax attention with RoPE (published ``VanillaSelfAttention``): quadratic in N."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
        return rope_softmax_attention(q, k, v, sin, cos)
