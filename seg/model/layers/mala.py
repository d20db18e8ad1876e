"""Magnitude-aware linear attention (MALA; Fan et al., ICCV 2025, arXiv 2507.00698), the linear attention of
the MALA encoders (RAVLT's skeleton, :mod:`seg.model.backbones.mala`).

Plain linear attention normalises every query's scores to sum to one, so a query's magnitude drops out of
the output. MALA keeps it: with kappa(z) = ELU(z) + 1, s = d^-1/2 and the per-head RoPE of RAVLT,

    z_i   = s * kappa(q_i) . mean_j kappa(k_j)                        (un-rotated features; (B, h, N, 1))
    out_i = (1 + 1 / (z_i + 1e-6)) * rope(kappa(q_i)) [(s / N) sum_j rope(kappa(k_j))^T v_j] - z_i * mean_j v_j

i.e. scores beta_i * (s / N) q_i . k_j - z_i / N with a query-dependent scale beta and offset. As published,
z is taken before the rotation, so with RoPE the rows do not sum exactly to one; the released weights were
trained that way. The projections, the 5 x 5 LePE on v, the raw output gate and ``proj`` are RALA's
(:class:`seg.model.layers.rala.RALAttention`), whose module this one extends.

Numerics: the kernel, the d x d product, the 1 / z gain and the ``- z * mean(v)`` cancellation run in float32
under autocast (float64 stays float64); the result is cast back to v's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seg.model.layers.precision import elu_feature_inputs
from seg.model.layers.rala import DENOM_EPS, _GatedRoPEAttention
from seg.model.layers.rope import apply_rope

__all__ = ["MALAttention", "magnitude_aware_linear_attention"]


def magnitude_aware_linear_attention(q: Tensor, k: Tensor, v: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """MALA without the LePE term and the gate, returned in v's dtype; q, k raw projections, v values, each
    (B, h, N, d), and the RoPE tables sin, cos (N, d), as
    :func:`~seg.model.layers.rala.rank_augmented_linear_attention`."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, vf, sin, cos = elu_feature_inputs(q, k, v, sin, cos)
        N, d = k.shape[-2], k.shape[-1]
        s = d**-0.5
        z = s * (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1))  # (B, h, N, 1), before the rotation
        kv = apply_rope(k, sin, cos).transpose(-2, -1) @ (vf * (s / N))  # (B, h, d, d)
        gain = 1.0 + 1.0 / (z + DENOM_EPS)  # (B, h, N, 1)
        out = (apply_rope(q, sin, cos) @ kv) * gain - z * vf.mean(dim=-2, keepdim=True)  # (B, h, N, d)
    return out.to(v.dtype)


class MALAttention(_GatedRoPEAttention):
    """Magnitude-aware linear attention (published ``AddLinearAttention``): linear in N; parameter names
    ``qkvo``, ``lepe``, ``proj`` as the published checkpoints."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
        return magnitude_aware_linear_attention(q, k, v, sin, cos)
