"""Shifted-window softmax attention with relative position bias (Swin, Liu et al., ICCV 2021) at any map size.

The softmax baseline of FLatten-Swin. Pure helpers (window geometry, partition, relative position index,
shift mask, bias-table resize) plus :class:`WindowAttention`, a module that takes the tokens of a whole
H x W map and does the windowing itself, so it has the same call signature as
:class:`~seg.model.layers.focused_linear.FocusedLinearAttention`.

Any H x W, as in the Swin segmentation backbone: the map is zero-padded at the bottom / right to a multiple
of the window, cyclically shifted by window // 2 in shifted blocks, and the shift mask (-100 between tokens
of different regions of the shifted, padded map) is built for the padded size. Padded tokens are not masked.
An axis no longer than the window is a single window with no shift on that axis (Swin's rule, applied
per axis): its bias rows come from the same table, which equals a full window with the missing rows
removed. At 224 x 224 this reproduces the published models exactly (stage 4, 7 x 7: one window, no shift).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from seg.kernels.onednn import Linear

__all__ = [
    "WindowAttention",
    "relative_position_index",
    "resize_bias_table",
    "shift_mask",
    "window_geometry",
    "window_partition",
    "window_reverse",
]

MASK_VALUE = -100.0  # Swin's additive mask between regions (exp(-100) is 0 in float32 after the softmax)


def window_geometry(
    size: tuple[int, int], window: int, shift: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Per-axis window and shift for an H x W map: an axis of <= ``window`` tokens is one unshifted window."""
    win = (min(window, size[0]), min(window, size[1]))
    shifts = (0 if size[0] <= window else shift, 0 if size[1] <= window else shift)
    return win, shifts


def window_partition(x: Tensor, window: tuple[int, int]) -> Tensor:
    """(B, Hp, Wp, C), Hp and Wp multiples of the window -> (B, nW, wh * ww, C), windows row-major."""
    B, Hp, Wp, C = x.shape
    wh, ww = window
    x = x.view(B, Hp // wh, wh, Wp // ww, ww, C)  # (B, nh, wh, nw, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, -1, wh * ww, C)  # (B, nW, n, C)


def window_reverse(windows: Tensor, window: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: (B, nW, wh * ww, C) -> (B, Hp, Wp, C)."""
    B, _, _, C = windows.shape
    (wh, ww), (Hp, Wp) = window, size
    x = windows.view(B, Hp // wh, Wp // ww, wh, ww, C)  # (B, nh, nw, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)  # (B, Hp, Wp, C)


def relative_position_index(window: tuple[int, int], table_window: tuple[int, int]) -> Tensor:
    """(n, n) index of each token pair's offset into a (2 Th - 1)(2 Tw - 1) bias table; n = wh * ww."""
    th, tw = table_window
    coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij"))
    coords = coords.flatten(1)  # (2, n)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, n, n): offset of token i from token j
    return (rel[0] + th - 1) * (2 * tw - 1) + (rel[1] + tw - 1)


def shift_mask(padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> Tensor:
    """(nW, n, n) additive mask for the cyclically shifted, padded map: 0 inside a region, -100 across.

    Regions are labelled on the padded map: along a shifted axis of size P the slices [0, P - w),
    [P - w, P - s) and [P - s, P) are different regions (the last two wrapped around by the roll).
    """
    labels = []
    for P, w, s in zip(padded, window, shift, strict=True):
        lab = torch.zeros(P, dtype=torch.long)
        if s > 0:
            lab[P - w : P - s] = 1
            lab[P - s :] = 2
        labels.append(lab)
    region = labels[0][:, None] * 3 + labels[1][None, :]  # (Hp, Wp)
    windows = window_partition(region[None, :, :, None], window)[0, :, :, 0]  # (nW, n)
    different = windows[:, :, None] != windows[:, None, :]  # (nW, n, n)
    return torch.zeros(different.shape).masked_fill(different, MASK_VALUE)


def resize_bias_table(table: Tensor, side: int) -> Tensor:
    """Resize a ((2w - 1)^2, h) relative position bias table to (side^2, h), bicubic (as Swin fine-tunes)."""
    n, h = table.shape
    src = math.isqrt(n)
    if src * src != n:
        raise ValueError(f"a bias table of {n} rows is not a square grid of offsets")
    grid = table.T.reshape(1, h, src, src)  # (1, h, s, s)
    grid = F.interpolate(grid.float(), size=(side, side), mode="bicubic", align_corners=False)
    return grid.reshape(h, side * side).T.to(table.dtype)  # (side^2, h)


class WindowAttention(nn.Module):
    """Multi-head softmax attention in (shifted) windows with a learned relative position bias.

    Parameter names match Swin / FLatten-Swin checkpoints: ``qkv``, ``proj``,
    ``relative_position_bias_table``; ``relative_position_index`` is a non-persistent buffer (rebuilt,
    never loaded). Attention runs through
    ``scaled_dot_product_attention`` with bias + shift mask as the additive mask.

    Args:
        dim: channels C.
        num_heads: heads h.
        window_size: window side w (the bias table covers offsets of a w x w window).
        shift: shift the windows by w // 2 (the odd blocks of a Swin stage).
        qkv_bias: bias in the qkv projection.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after ``proj``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        *,
        shift: bool = False,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = window_size // 2 if shift else 0
        self.attn_drop = attn_drop
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        full = (window_size, window_size)
        self.register_buffer("relative_position_index", relative_position_index(full, full), persistent=False)
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._cache: dict[tuple, Tensor] = {}

    def _cached(self, key: tuple, build: Callable[[], Tensor]) -> Tensor:
        """A size-dependent constant (index, shift mask), built once per key."""
        value = self._cache.get(key)
        if value is None:
            if len(self._cache) > 32:
                self._cache.clear()
            value = self._cache[key] = build()
        return value

    def attention_bias(
        self, window: tuple[int, int], padded: tuple[int, int], shift: tuple[int, int]
    ) -> Tensor:
        """Relative position bias plus shift mask: (nW or 1, h, n, n)."""
        w = self.window_size
        device = self.relative_position_bias_table.device
        if window == (w, w):
            index = self.relative_position_index
        else:
            index = self._cached(("index", window, device),
                                 lambda: relative_position_index(window, (w, w)).to(device))
        n = window[0] * window[1]
        bias = self.relative_position_bias_table[index.reshape(-1)].view(n, n, -1)  # (n, n, h)
        bias = bias.permute(2, 0, 1).unsqueeze(0)  # (1, h, n, n)
        if any(shift):
            mask = self._cached(("mask", padded, window, shift, device),
                                lambda: shift_mask(padded, window, shift).to(device))
            bias = bias + mask.unsqueeze(1)  # (nW, h, n, n)
        return bias

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x: (B, N, C) tokens of an H x W map (N = H * W) -> (B, N, C)."""
        B, N, C = x.shape
        H, W = size
        if N != H * W:
            raise ValueError(f"{N} tokens do not form a {H} x {W} grid")
        window, shift = window_geometry(size, self.window_size, self.shift_size)
        Hp, Wp = math.ceil(H / window[0]) * window[0], math.ceil(W / window[1]) * window[1]
        x = F.pad(x.reshape(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H))  # (B, Hp, Wp, C), zeros bottom / right
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = window_partition(x, window)  # (B, nW, n, C)
        out = self._attend(windows, self.attention_bias(window, (Hp, Wp), shift))
        x = window_reverse(out, window, (Hp, Wp))  # (B, Hp, Wp, C)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :H, :W].reshape(B, N, C)  # (B, N, C)

    def _attend(self, windows: Tensor, bias: Tensor) -> Tensor:
        """Softmax attention per window: (B, nW, n, C), bias (nW or 1, h, n, n) -> (B, nW, n, C)."""
        B, nW, n, C = windows.shape
        h = self.num_heads
        qkv = self.qkv(windows).reshape(B, nW, n, 3, h, C // h)  # (B, nW, n, 3, h, d)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, B, nW * h, n, C // h).unbind(0)  # (B, nW*h, n, d)
        bias = bias.expand(nW, h, n, n).reshape(nW * h, n, n).to(q.dtype)  # (nW*h, n, n), broadcast over B
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        out = out.view(B, nW, h, n, C // h).transpose(2, 3).reshape(B, nW, n, C)  # (B, nW, n, C)
        return self.proj_drop(self.proj(out))
