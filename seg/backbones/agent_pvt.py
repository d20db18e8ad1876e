"""Agent-PVT (Han et al., ECCV 2024, arXiv 2312.08874) as timm encoders for any image size.

The PVT v1 skeleton of :mod:`seg.backbones.pvt` (patch embeddings, ``pos_embed`` tables resized to every map,
pre-norm blocks, mean-pooled classifier without a final norm) with agent attention
(:class:`seg.layers.AgentAttention`) in the stages marked ``A`` of ``attn_type``; ``B`` stages keep PVT's own
softmax spatial-reduction attention (the published letters). Stage i pools its queries to ``agent_num[i]``
agents (9, 16, 49, 49: 3 x 3 ... 7 x 7) for classification, or to the grid ``agent_shapes[i]`` (the published
segmentation models use 12, 16, 28, 28; at 512 x 512 stage 4's 16 x 16 map is pooled *up* to 28 x 28); the
bias tables keep their published shapes and are resized to the map and the agent grid on the fly.

Features: as FLatten-PVT, 4 NCHW maps at strides 4/8/16/32 through new output norms ``norm1..4`` (built for feature
models only); published checkpoints load unchanged (names and shapes equal) with
``pretrained_cfg_overlay=dict(file=...)``. The published *segmentation* backbone differs in two ways, both options
here (``feature_norms=False, patch_floor=True``, as the Agent-PVT ADE20K configs set): it returns the trunk maps
unnormalised, and its patch embeddings floor odd sizes where this model pads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from seg.backbones._registry import build_encoder, imagenet_cfg
from seg.backbones._staged import AttentionFactory
from seg.backbones._weights import adapt_state_dict
from seg.backbones.pvt import FLattenPVT
from seg.layers import AgentAttention, SpatialReductionAttention

__all__ = ["AGENT_TABLES", "AgentPVT", "agent_pvt_factories", "checkpoint_filter_fn", "resize_agent_tables"]

AgentShape = int | tuple[int, int] | None
AGENT_TABLES = ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias")  # the bias tables' names


def _agent_factory(agent_num: int, agent_shape: AgentShape, qkv_bias: bool, attn_drop: float, drop: float,
                   dim: int, heads: int, grid: tuple[int, int], sr: int) -> nn.Module:
    return AgentAttention(dim, heads, grid, agent_num, agent_shape, qkv_bias=qkv_bias, attn_drop=attn_drop,
                          proj_drop=drop)


def _softmax_factory(qkv_bias: bool, attn_drop: float, drop: float, dim: int, heads: int, grid: tuple[int, int],
                     sr: int) -> nn.Module:
    return SpatialReductionAttention(dim, heads, qkv_bias=qkv_bias, sr_ratio=sr, attn_drop=attn_drop, proj_drop=drop)


def agent_pvt_factories(
    attn_type: str,
    agent_num: Sequence[int],
    agent_shapes: Sequence[AgentShape] | None = None,
    qkv_bias: bool = True,
    attn_drop: float = 0.0,
    drop: float = 0.0,
) -> list[AttentionFactory]:
    """One attention factory per stage of the PVT skeleton: ``A`` agent attention with the stage's agents and
    agent grid, ``B`` PVT's softmax spatial-reduction attention (reduced by the stage's ``sr_ratio``)."""
    unknown = set(attn_type) - {"A", "B"}
    if unknown:
        raise ValueError(f"attn_type {attn_type!r}: unknown letter(s) {', '.join(sorted(unknown))}; valid: A (agent), "
                         "B (softmax)")
    shapes = list(agent_shapes) if agent_shapes is not None else [None] * len(attn_type)
    if len(agent_num) != len(attn_type) or len(shapes) != len(attn_type):
        raise ValueError(f"agent_num {tuple(agent_num)} and agent_shapes {agent_shapes} need one entry per stage "
                         f"({len(attn_type)})")
    return [
        partial(_agent_factory, agent_num[i], shapes[i], qkv_bias, attn_drop, drop) if letter == "A"
        else partial(_softmax_factory, qkv_bias, attn_drop, drop)
        for i, letter in enumerate(attn_type)
    ]


class AgentPVT(FLattenPVT):
    """Agent-PVT: PVT v1 with agent attention.

    Args:
        img_size: training resolution; fixes the grid ``pos_embed`` and the row / column bias tables are stored at.
        in_chans: input channels.
        num_classes: classifier outputs (0: no classifier).
        embed_dims: channels per stage.
        num_heads: heads per stage.
        mlp_ratios: MLP expansion per stage.
        depths: blocks per stage.
        sr_ratios: spatial reduction of the softmax (``B``) stages.
        attn_type: one letter per stage, ``A`` agent attention or ``B`` PVT softmax attention.
        agent_num: stored agents per stage (square numbers; the bias tables' agent axis).
        agent_shapes: agent grid per stage (an int n for n x n, or (rows, columns)); None: sqrt(agent_num) square
            grids (classification). The published segmentation configs use (12, 16, 28, 28).
        attn_backend: ``auto`` / ``reference`` / ``cpu`` / ``triton`` fast paths (see :mod:`seg.kernels`).
        qkv_bias: bias in the q / kv projections.
        drop_rate: dropout after attention and MLP projections.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        global_pool: ``avg`` (mean of the stage-4 map) or ``''`` (no pooling).
        feature_norms: build the per-stage output norms ``norm1..4`` (``features_only=True`` sets it; the
            published segmentation backbone has none: ``feature_norms=False``).
        patch_floor: patch embeddings drop an incomplete last row / column of patches (the published segmentation
            backbone) instead of padding it.
    """

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        depths: Sequence[int] = (2, 2, 2, 2),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        attn_type: str = "AAAA",
        agent_num: Sequence[int] = (9, 16, 49, 49),
        agent_shapes: Sequence[AgentShape] | None = None,
        attn_backend: str = "auto",
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        feature_norms: bool = False,
        patch_floor: bool = False,
    ) -> None:
        if len(attn_type) != 4:
            raise ValueError(f"attn_type {attn_type!r} must be 4 letters of A (agent) / B (softmax)")
        factories = agent_pvt_factories(attn_type, agent_num, agent_shapes, qkv_bias, attn_drop_rate, drop_rate)
        super().__init__(img_size=img_size, in_chans=in_chans, num_classes=num_classes, embed_dims=embed_dims,
                         num_heads=num_heads, mlp_ratios=mlp_ratios, depths=depths, sr_ratios=sr_ratios,
                         attn_type=attn_type, attn_layers=factories, attn_backend=attn_backend, version=1,
                         qkv_bias=qkv_bias, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                         global_pool=global_pool, feature_norms=feature_norms, patch_floor=patch_floor)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """``pos_embed`` tables and the agent bias tables (full names)."""
        return super().no_weight_decay() | {name for name, _ in self.named_parameters() if name.endswith(AGENT_TABLES)}


def resize_agent_tables(name: str, value: Tensor, target: Tensor) -> Tensor | None:
    """Resize a row / column agent bias table stored for another training grid (bilinear along its map axis)."""
    if not name.endswith(AGENT_TABLES[2:]) or value.shape == target.shape or value.dim() != 5:
        return None
    agents_last = name.endswith(("ha_bias", "wa_bias"))  # (1, h, H0, 1, n) / (1, h, 1, W0, n)
    table = value[0].permute(0, 3, 1, 2) if agents_last else value[0]  # (h, n, H0 or 1, 1 or W0)
    size = tuple(target.shape[2:4] if agents_last else target.shape[3:5])
    heads_agents = (target.shape[1], target.shape[4] if agents_last else target.shape[2])
    if tuple(table.shape[:2]) != heads_agents:
        return None  # other heads or agents: reported as a shape mismatch
    table = F.interpolate(table.float(), size=size, mode="bilinear", align_corners=False)
    table = table.permute(0, 2, 3, 1) if agents_last else table
    return table[None].to(value.dtype)


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: AgentPVT) -> dict[str, Tensor]:
    """A published Agent-PVT checkpoint (names as released) -> this model's state dict; the output norms
    ``norm1..4`` keep their init, tables stored for another training size are resized."""
    return adapt_state_dict(
        state_dict,
        model,
        position_tables=lambda name: name.startswith("pos_embed"),
        converters=[resize_agent_tables],
        dropped={"norm.weight", "norm.bias"},
        fresh=lambda name: name.split(".")[0] in {"norm1", "norm2", "norm3", "norm4"},
    )


def _create(variant: str, pretrained: bool = False, **kwargs) -> AgentPVT:
    return build_encoder(AgentPVT, variant, pretrained, checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    name: imagenet_cfg("patch_embed1.proj")
    for name in ("agent_pvt_tiny", "agent_pvt_small", "agent_pvt_medium", "agent_pvt_large", "test_agent_pvt")
})

_PVT = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4))
_TEST = dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 1, 1))


@register_model
def agent_pvt_tiny(pretrained: bool = False, **kwargs) -> AgentPVT:
    return _create("agent_pvt_tiny", pretrained, **dict(dict(_PVT, depths=(2, 2, 2, 2)), **kwargs))


@register_model
def agent_pvt_small(pretrained: bool = False, **kwargs) -> AgentPVT:
    return _create("agent_pvt_small", pretrained, **dict(dict(_PVT, depths=(3, 4, 6, 3)), **kwargs))


@register_model
def agent_pvt_medium(pretrained: bool = False, **kwargs) -> AgentPVT:
    return _create("agent_pvt_medium", pretrained, **dict(dict(_PVT, depths=(3, 4, 18, 3)), **kwargs))


@register_model
def agent_pvt_large(pretrained: bool = False, **kwargs) -> AgentPVT:
    return _create("agent_pvt_large", pretrained, **dict(dict(_PVT, depths=(3, 8, 27, 3)), **kwargs))


@register_model
def test_agent_pvt(pretrained: bool = False, **kwargs) -> AgentPVT:
    """Tiny variant (depth 1 per stage, 16-64 channels) for CPU tests."""
    return _create("test_agent_pvt", pretrained, **dict(_TEST, **kwargs))
