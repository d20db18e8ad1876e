"""The float32 island every attention's maths runs in under autocast: half precision promoted, float32 and
float64 kept."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["at_least_fp32"]


def at_least_fp32(x: Tensor) -> Tensor:
    """Half-precision tensors promoted to float32; float32 / float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
