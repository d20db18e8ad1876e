"""The deterministic weights and inputs behind ``tests/fixtures/published_logits``.

Every value is a uniform draw of ``torch.rand`` (float32: 24 random bits of torch's Mersenne Twister, scaled
exactly) from a generator seeded per tensor, followed by exactly rounded float32 arithmetic, so the tensors
are the same bit for bit on any CPU. The fixture's README describes the same rule in words; the
published-model outputs stored there were computed from tensors made by exactly these functions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SKIPPED_SUFFIXES", "make_input", "make_state_dict", "unit_uniform", "value_for"]

# Structural buffers the published models compute from their geometry: never filled, kept as built.
SKIPPED_SUFFIXES = ("attn_mask", "relative_position_index", "num_batches_tracked")
_SQRT3 = math.sqrt(3.0)


def unit_uniform(seed: int, shape: tuple[int, ...]) -> Tensor:
    """float32 values uniform on [-sqrt 3, sqrt 3) (zero mean, unit variance) from ``manual_seed(seed)``."""
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return (u * 2.0 - 1.0) * _SQRT3


def value_for(index: int, name: str, shape: tuple[int, ...]) -> Tensor:
    """The float32 value of the ``index``-th tensor (sorted published names) called ``name``."""
    u = unit_uniform(index, shape)
    if name.endswith("running_var"):
        v = 1.0 + 0.5 * u.abs()
    elif name.endswith(("running_mean", ".bias")):
        v = 0.1 * u
    elif name.endswith("weight") and len(shape) >= 2:  # linear / conv: variance 1 / fan_in
        v = u / math.sqrt(math.prod(shape) // shape[0])
    elif name.endswith("weight"):  # LayerNorm / BatchNorm affine
        v = 1.0 + 0.1 * u
    else:  # position tables, positional_encoding, scale, relative_position_bias_table, cls_token
        v = 0.5 * u
    return v


def make_state_dict(keys: list[tuple[str, tuple[int, ...]]]) -> dict[str, Tensor]:
    """Published names and shapes -> the fixture's state dict (skipped buffers as zero placeholders).

    The placeholders stand where a released file holds ``attn_mask`` / ``relative_position_index`` /
    ``num_batches_tracked``: the project rebuilds or ignores them, so their values must not matter.
    """
    out = {}
    for index, (name, shape) in enumerate(sorted(keys)):
        if name.endswith(SKIPPED_SUFFIXES):
            dtype = torch.float32 if name.endswith("attn_mask") else torch.int64
            out[name] = torch.zeros(shape, dtype=dtype)
        else:
            out[name] = value_for(index, name, tuple(shape))
    return out


def make_input(batch: int, height: int, width: int) -> Tensor:
    """The fixture's input images: unit-variance values from seed 1_000_000 + height * 10_000 + width."""
    return unit_uniform(1_000_000 + height * 10_000 + width, (batch, 3, height, width))
