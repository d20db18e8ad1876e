"""The float32 islands of the attention maths: kernels, sums and normalisers run in at least float32 under
autocast (float64 stays float64), and the results go back to the values' dtype."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from seg.kernels.precision import at_least_fp32

__all__ = ["at_least_fp32", "elu_feature_inputs"]


def elu_feature_inputs(
    q: Tensor, k: Tensor, v: Tensor, sin: Tensor, cos: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The inputs of the ELU-kernel linear attentions (MLLA, RALA, MALA) inside their float32 island:
    kappa(q), kappa(k) with kappa(z) = ELU(z) + 1, the values and the RoPE tables, all in at least float32.

    Call it under ``torch.autocast(..., enabled=False)``.
    """
    q = F.elu(at_least_fp32(q)) + 1.0
    k = F.elu(at_least_fp32(k)) + 1.0
    return q, k, at_least_fp32(v), sin.to(q.dtype), cos.to(q.dtype)
