"""2-D rotary position embedding (RoPE) of the MLLA and RAVLT / MALA attentions, computed for the live grid.

Channel pairs (2m, 2m + 1) turn as complex numbers; over C channels with K = C / 4 frequencies f_k, pair m < K
turns by y * f_m (row index y) and pair m >= K by x * f_(m - K) (column index x). The two families differ only
in the frequencies: MLLA spreads them over all C channels with f_k = base^(-k / K) (then splits the tables into
heads), RAVLT over each head's d channels with f_k = base^(-k / (K - 1)) (``endpoint``), stored as the published
buffer ``angle``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seg.model.layers.precision import at_least_fp32

__all__ = ["ROPE_BASE", "RoPE", "apply_rope", "rope_frequencies", "rotate_pairs"]

ROPE_BASE = 10000.0

Size = tuple[int, int]


def rope_frequencies(n: int, base: float = ROPE_BASE, endpoint: bool = False) -> Tensor:
    """n frequencies base^(-k / n) for k < n, or base^(-k / (n - 1)) with ``endpoint`` (float32)."""
    if endpoint:
        return base ** -torch.linspace(0, 1, n)
    return 1.0 / (base ** (torch.arange(n) / n))


def rotate_pairs(x: Tensor) -> Tensor:
    """Each channel pair (2m, 2m+1) as the complex number a + ib, multiplied by i: (a, b) -> (-b, a)."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([-b, a], dim=-1).flatten(-2)  # (..., d)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate every channel pair of x (..., N, d) by its angle: x cos + rotate_pairs(x) sin; sin, cos (..., N, d)."""
    return x * cos + rotate_pairs(x) * sin


class RoPE(nn.Module):
    """2-D RoPE tables over ``dim`` channels (a multiple of 4) for any H x W grid.

    The buffer ``angle`` (C / 2) holds the C / 4 frequencies, each repeated for the two channels of its pair;
    channels [0, C/2) turn by row * angle, channels [C/2, C) by column * angle.

    Args:
        dim: channels C the tables cover (RAVLT: one head, MLLA: all heads).
        base: frequency base.
        endpoint: RAVLT's frequencies (``linspace(0, 1)`` exponents) instead of MLLA's.
        persistent: keep ``angle`` in the state dict (RAVLT's published checkpoints hold it; MLLA's do not).
    """

    def __init__(self, dim: int, base: float = ROPE_BASE, endpoint: bool = True, persistent: bool = True) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"2-D RoPE needs channels divisible by 4, got {dim}")
        self.register_buffer("angle", rope_frequencies(dim // 4, base, endpoint).repeat_interleave(2),
                             persistent=persistent)

    def forward(self, size: Size) -> tuple[Tensor, Tensor]:
        """(sin, cos) tables (N, C) in at least float32 for an H x W grid, tokens in row-major order."""
        H, W = size
        angle = at_least_fp32(self.angle)
        rows = torch.arange(H, device=angle.device, dtype=angle.dtype)[:, None] * angle  # (H, C/2)
        cols = torch.arange(W, device=angle.device, dtype=angle.dtype)[:, None] * angle  # (W, C/2)
        half = angle.shape[0]
        phase = torch.cat([rows[:, None].expand(H, W, half), cols[None].expand(H, W, half)], dim=-1)  # (H, W, C)
        phase = phase.reshape(H * W, 2 * half)  # (N, C)
        return phase.sin(), phase.cos()
