"""Agent attention (Han et al., ECCV 2024, arXiv 2312.08874): softmax attention routed through a few agent tokens.

A small set of n_a agent tokens A, the query map average-pooled to an a_h x a_w grid, first gathers from all
keys, then hands the result back to every query:

    V_A = softmax(s A K^T + B_1) V              (B, h, n_a, d): agent aggregation
    O   = softmax(s Q A^T + B_2) V_A            (B, h, N, d):   agent broadcast
    Y   = proj(merge_heads(O) + DWC(V))         s = d^(-1/2), DWC a 3 x 3 depthwise conv on the V map

Cost is linear in N for a fixed agent grid. The position biases B_1 (h, n_a, N) and B_2 (h, N, n_a) are built
from six learned tables stored at the 224 x 224 training grid (published names and shapes, so checkpoints load
unchanged) and resized to the current map and agent grid as the published segmentation models do
(:func:`agent_position_biases`). :func:`agent_attention` is the maths; :class:`AgentAttention` is the thin
module that owns the projections, the pooling, the tables and the DWC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from seg.kernels.onednn import Linear

__all__ = ["AgentAttention", "agent_attention", "agent_grid", "agent_position_biases"]

Size = tuple[int, int]


def agent_attention(
    q: Tensor, k: Tensor, v: Tensor, agents: Tensor, agent_bias: Tensor, query_bias: Tensor, dropout_p: float = 0.0
) -> Tensor:
    """Agent attention without the DWC term: two softmax attentions through the agents, scale d^(-1/2).

    Args:
        q: queries (B, h, N, d).
        k: keys (B, h, N, d).
        v: values (B, h, N, d).
        agents: agent tokens (B, h, n_a, d).
        agent_bias: B_1 (h, n_a, N), added to the agent-to-key logits.
        query_bias: B_2 (h, N, n_a), added to the query-to-agent logits.
        dropout_p: dropout on both attention matrices (training only; the caller decides).

    Returns:
        (B, h, N, d).
    """
    agent_v = F.scaled_dot_product_attention(agents, k, v, attn_mask=agent_bias.to(q.dtype),
                                             dropout_p=dropout_p)  # (B, h, n_a, d)
    return F.scaled_dot_product_attention(q, agents, agent_v, attn_mask=query_bias.to(q.dtype),
                                          dropout_p=dropout_p)  # (B, h, N, d)


def _resize(x: Tensor, size: Size) -> Tensor:
    """Bilinear resize (align_corners False) of the last two axes of a 4-D tensor, in at least float32."""
    if not torch.compiler.is_compiling() and tuple(x.shape[-2:]) == tuple(size):
        return x
    dtype = x.dtype
    x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).to(dtype)


def _to_agent_grid(table: Tensor, size: Size, agent_shape: Size) -> Tensor:
    """(h, n, H0, W0) per-agent maps -> (h, N, n') on the H x W map and the a_h x a_w agent grid.

    The n stored agents form a p x p grid (agent a = row * p + col); both the map axes and the agent axes are
    resized bilinearly, map first (the published segmentation order).
    """
    h, n = table.shape[:2]
    p = math.isqrt(n)
    N = size[0] * size[1]
    table = _resize(table, size)  # (h, n, H, W)
    table = table.reshape(h, p, p, N).permute(0, 3, 1, 2)  # (h, N, p, p)
    table = _resize(table, agent_shape)  # (h, N, a_h, a_w)
    return table.reshape(h, N, agent_shape[0] * agent_shape[1])  # (h, N, n')


def agent_position_biases(
    an: Tensor, na: Tensor, ah: Tensor, aw: Tensor, ha: Tensor, wa: Tensor, size: Size, agent_shape: Size
) -> tuple[Tensor, Tensor]:
    """B_1 (h, n', N) and B_2 (h, N, n') for an H x W map and an a_h x a_w agent grid (n' = a_h a_w).

    Args:
        an: agent-to-token bias (h, n, 7, 7).
        na: token-to-agent bias (h, n, 7, 7).
        ah: agent-to-row bias (1, h, n, H0, 1).
        aw: agent-to-column bias (1, h, n, 1, W0).
        ha: row-to-agent bias (1, h, H0, 1, n).
        wa: column-to-agent bias (1, h, 1, W0, n).
        size: the map (H, W).
        agent_shape: the agent grid (a_h, a_w).
    """
    agent_bias = _to_agent_grid(an, size, agent_shape) + _to_agent_grid((ah + aw)[0], size, agent_shape)
    query_bias = _to_agent_grid(na, size, agent_shape) + _to_agent_grid(
        (ha + wa)[0].permute(0, 3, 1, 2), size, agent_shape)  # (h, H0, W0, n) -> (h, n, H0, W0)
    return agent_bias.transpose(1, 2), query_bias  # (h, n', N), (h, N, n')


def agent_grid(shape: int | Sequence[int] | None, agent_num: int) -> Size:
    """The agent grid (a_h, a_w): ``shape`` as a pair, an int n as (n, n), None as the stored p x p grid."""
    if shape is None:
        p = math.isqrt(agent_num)
        return (p, p)
    if isinstance(shape, int):
        return (shape, shape)
    if len(shape) != 2:
        raise ValueError(f"an agent grid is one int or (rows, columns), got {shape!r}")
    return (int(shape[0]), int(shape[1]))


class AgentAttention(nn.Module):
    """Agent attention over an H x W token grid, as in the published Agent-PVT / Agent-Swin models.

    Parameter names match the published checkpoints: ``q`` and ``kv`` (PVT) or ``qkv`` (Swin, ``fused_qkv``),
    ``proj``, ``dwc`` and the six bias tables ``an_bias``, ``na_bias`` (h, n, 7, 7), ``ah_bias`` (1, h, n, H0, 1),
    ``aw_bias`` (1, h, n, 1, W0), ``ha_bias`` (1, h, H0, 1, n), ``wa_bias`` (1, h, 1, W0, n).

    Args:
        dim: channels C.
        num_heads: heads h; head dim d = C / h.
        grid_size: (H0, W0) training map the row / column tables are stored at (56 x 56 for stage 1 at 224).
        agent_num: n, the stored agents, a square number (the tables' agent axis is a p x p grid).
        agent_shape: the agent grid the queries are pooled to: None for p x p (classification), or
            (a_h, a_w) / an int (the published segmentation models pool to a finer grid: the tables'
            agent axis is resized to it).
        qkv_bias: bias in the q / kv projections.
        kernel_size: DWC kernel (3 in every published model).
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
        fused_qkv: one ``qkv`` projection (Swin naming) instead of ``q`` and ``kv`` (PVT naming).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: Size = (56, 56),
        agent_num: int = 49,
        agent_shape: int | Sequence[int] | None = None,
        qkv_bias: bool = True,
        kernel_size: int = 3,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_qkv: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if math.isqrt(agent_num) ** 2 != agent_num:
            raise ValueError(f"agent_num {agent_num} is not a square number")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.agent_num = agent_num
        self.agent_shape = agent_grid(agent_shape, agent_num)
        self.attn_drop = attn_drop
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        else:
            self.q = Linear(dim, dim, bias=qkv_bias)
            self.kv = Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.pool = nn.AdaptiveAvgPool2d(self.agent_shape)
        h, n, (H0, W0) = num_heads, agent_num, grid_size
        self.an_bias = nn.Parameter(torch.zeros(h, n, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(h, n, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(1, h, n, H0, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, h, n, 1, W0))
        self.ha_bias = nn.Parameter(torch.zeros(1, h, H0, 1, n))
        self.wa_bias = nn.Parameter(torch.zeros(1, h, 1, W0, n))
        for table in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
            trunc_normal_(table, std=0.02)

    def position_biases(self, size: Size) -> tuple[Tensor, Tensor]:
        """B_1 (h, n', N) and B_2 (h, N, n') for an H x W map at this module's agent grid."""
        return agent_position_biases(self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias,
                                     self.wa_bias, size, self.agent_shape)

    def forward(self, x: Tensor, size: Size) -> Tensor:
        """x: (B, N, C) tokens of an H x W grid (N = H * W) -> (B, N, C)."""
        B, N, C = x.shape
        H, W = size
        if N != H * W:
            raise ValueError(f"{N} tokens do not form a {H} x {W} grid")
        h, d = self.num_heads, self.head_dim
        if self.fused_qkv:
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, N, C)
        else:
            q = self.q(x)
            k, v = self.kv(x).chunk(2, dim=-1)  # 2 x (B, N, C)
        agents = self.pool(q.transpose(1, 2).reshape(B, C, H, W))  # (B, C, a_h, a_w)
        agents = agents.flatten(2).reshape(B, h, d, -1).transpose(2, 3)  # (B, h, n', d)
        heads = lambda t: t.reshape(B, N, h, d).transpose(1, 2)  # (B, N, C) -> (B, h, N, d)
        agent_bias, query_bias = self.position_biases(size)
        out = agent_attention(heads(q), heads(k), heads(v), agents, agent_bias, query_bias,
                              self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        v_map = v.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        out = out + self.dwc(v_map).flatten(2).transpose(1, 2)  # (B, N, C)
        return self.proj_drop(self.proj(out))
