"""MLLA linear attention with RoPE (Han et al., "Demystify Mamba in Vision: A Linear Attention Perspective",
NeurIPS 2024, arXiv 2405.16605; MILA in the final paper) and the Mamba-like block around it.

The maths lives in pure functions over (B, h, N, d) tensors that autograd differentiates:
:func:`rope_angles` / :func:`rope_rotate` (2-D rotary position embedding over all C channels, rows in the first
C / 2, columns in the last C / 2) and :func:`mlla_linear_attention`

    o_i = rho(q_i) [ (1/N) sum_j rho(k_j)^T v_j ] / ( q_i . (1/N) sum_j k_j + eps ),  q, k = ELU(.) + 1,

with the normaliser taken on the un-rotated q and k. :class:`MllaAttention` is the thin module owning the
``qk`` projection and the locally-enhanced positional encoding ``lepe`` (values are the attention input
itself: there is no value projection); :class:`MllaBlock` is the published block (names as the released
checkpoints, so they load unchanged).

Positions: the angles are computed from the live (H, W) grid on every call, as the published segmentation
backbone does; the classification models' stored ``rope.rotations`` buffer (fixed at the 224 x 224 grid) is not
a part of these modules. At 224 x 224 both give the same angles.

Numerics: the kernel, the rotation, the d x d summary and the normaliser run in float32 even under autocast,
in the mean-based form (summary k^T v / N, normaliser q . mean(k)) that keeps every intermediate independent
of N, so fp16 inputs cannot overflow the sums.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from seg.layers.mlp import Mlp

__all__ = ["DENOM_EPS", "ROPE_BASE", "MllaAttention", "MllaBlock", "RoPE", "mlla_linear_attention", "rope_angles",
           "rope_rotate"]

DENOM_EPS = 1e-6  # added to the normaliser q . mean(k), outside the dot product
ROPE_BASE = 10000.0

Size = tuple[int, int]


def _at_least_fp32(x: Tensor) -> Tensor:
    """Half-precision tensors promoted to float32; float32 / float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def rope_angles(size: Size, dim: int, device: torch.device | None = None, base: float = ROPE_BASE) -> Tensor:
    """Rotation angles (N, C / 2) of the C / 2 channel pairs of every token of an H x W grid, float32.

    With K = C / 4 frequencies theta_k = base^(-k / K), pair m < K turns by y * theta_m (row index y) and
    pair m >= K by x * theta_(m - K) (column index x).
    """
    if dim % 4:
        raise ValueError(f"2-D RoPE needs channels divisible by 4, got {dim}")
    H, W = size
    K = dim // 4
    theta = 1.0 / (base ** (torch.arange(K, device=device) / K))  # (K,) float32
    rows = torch.arange(H, device=device).unsqueeze(-1) * theta  # (H, K)
    cols = torch.arange(W, device=device).unsqueeze(-1) * theta  # (W, K)
    angles = torch.cat([rows.unsqueeze(1).expand(H, W, K), cols.unsqueeze(0).expand(H, W, K)], dim=-1)  # (H, W, 2K)
    return angles.reshape(H * W, 2 * K)  # (N, C/2)


def rope_rotate(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate channel pairs (2m, 2m + 1) as complex numbers: (a, b) -> (a cos - b sin, b cos + a sin).

    Args:
        x: (B, h, N, d) features, d even.
        angles: (h, N, d / 2) angle of every pair (the (N, C / 2) table split into heads).
    """
    pairs = x.unflatten(-1, (-1, 2))  # (B, h, N, d/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)  # (B, h, N, d)


def mlla_linear_attention(q: Tensor, k: Tensor, v: Tensor, angles: Tensor) -> Tensor:
    """MLLA linear attention without the LePE term, returned in v's dtype.

    Args:
        q: raw query projections (B, h, N, d).
        k: raw key projections (B, h, N, d).
        v: values (B, h, N, d).
        angles: RoPE angles (h, N, d / 2), see :func:`rope_angles`.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.elu(_at_least_fp32(q)) + 1.0
        k = F.elu(_at_least_fp32(k)) + 1.0
        vf = _at_least_fp32(v)
        angles = angles.to(q.dtype)
        q_rot, k_rot = rope_rotate(q, angles), rope_rotate(k, angles)
        n = k.shape[-2]
        kv = k_rot.transpose(-2, -1) @ (vf * (1.0 / n))  # (B, h, d, d) mean over tokens
        k_mean = k.mean(dim=-2, keepdim=True).transpose(-2, -1)  # (B, h, d, 1)
        out = (q_rot @ kv) / (q @ k_mean + DENOM_EPS)  # (B, h, N, d)
    return out.to(v.dtype)


class RoPE(nn.Module):
    """2-D rotary position embedding over all C channels; parameter-free, angles from the live grid.

    Args:
        dim: channels C (a multiple of 4).
        num_heads: heads h; :meth:`angles` splits the channel pairs into heads of d / 2 pairs.
        base: frequency base.
    """

    def __init__(self, dim: int, num_heads: int, base: float = ROPE_BASE) -> None:
        super().__init__()
        if dim % 4 or (dim // num_heads) % 2:
            raise ValueError(f"RoPE needs channels divisible by 4 and an even head dim, got C={dim}, h={num_heads}")
        self.dim, self.num_heads, self.base = dim, num_heads, base

    def angles(self, size: Size, device: torch.device) -> Tensor:
        """(h, N, d / 2) angles of an H x W grid."""
        angles = rope_angles(size, self.dim, device, self.base)  # (N, C/2)
        return angles.unflatten(-1, (self.num_heads, -1)).transpose(0, 1)  # (h, N, d/2)

    def forward(self, x: Tensor, size: Size) -> Tensor:
        """Rotate (B, h, N, d) features of an H x W grid (angles computed in float32, applied in x's dtype)."""
        return rope_rotate(x, self.angles(size, x.device).to(x.dtype))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, base={self.base:g}"


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
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.rope = RoPE(dim, num_heads)

    def forward(self, x: Tensor, size: Size) -> Tensor:
        """x: (B, N, C) tokens of an H x W grid, also the values -> (B, N, C)."""
        B, N, C = x.shape
        if N != size[0] * size[1]:
            raise ValueError(f"{N} tokens do not form a {size[0]} x {size[1]} grid")
        q, k = self.qk(x).chunk(2, dim=-1)  # (B, N, C) each
        heads = lambda t: t.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        out = mlla_linear_attention(heads(q), heads(k), heads(x), self.rope.angles(size, x.device))
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return out + _conv_tokens(self.lepe, x, size)


def _conv_tokens(conv: nn.Module, x: Tensor, size: Size) -> Tensor:
    """Apply a same-size conv to (B, N, C) tokens as a (B, C, H, W) map: -> (B, N, C)."""
    B, N, C = x.shape
    y = conv(x.transpose(1, 2).reshape(B, C, *size))  # (B, C, H, W)
    return y.flatten(2).transpose(1, 2)  # (B, N, C)


class MllaBlock(nn.Module):
    """The MLLA block (x: (B, N, C) tokens of an H x W grid):

    x += CPE1(x); x = x + DropPath(out_proj(Attn(SiLU(DWC(in_proj(LN1 x)))) * SiLU(act_proj(LN1 x))));
    x += CPE2(x); x = x + DropPath(MLP(LN2 x)).

    Args:
        dim: channels C.
        num_heads: heads of the attention.
        mlp_ratio: MLP expansion.
        qkv_bias: bias in the attention's ``qk`` projection.
        drop: dropout in the MLP.
        drop_path: stochastic depth of both residual branches.
        attn_layer: builds the attention, a module taking ((B, N, C), (H, W)); None: :class:`MllaAttention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        drop_path: float = 0.0,
        attn_layer: Callable[[], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, dim)
        self.act_proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.act = nn.SiLU()
        self.attn = attn_layer() if attn_layer is not None else MllaAttention(dim, num_heads, qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor, size: Size) -> Tensor:
        """(B, N, C) tokens of an H x W grid -> (B, N, C)."""
        x = x + _conv_tokens(self.cpe1, x, size)
        u = self.norm1(x)
        gate = self.act(self.act_proj(u))
        t = self.act(_conv_tokens(self.dwc, self.in_proj(u), size))
        x = x + self.drop_path(self.out_proj(self.attn(t, size) * gate))
        x = x + _conv_tokens(self.cpe2, x, size)
        return x + self.drop_path(self.mlp(self.norm2(x)))
