"""Agent-PVT (Han et al., ECCV 2024, arXiv 2312.08874) as timm encoders for any image size.

The PVT v1 skeleton of :mod:`seg.model.backbones.pvt` (patch embeddings, ``pos_embed`` tables resized to every map,
pre-norm blocks, mean-pooled classifier without a final norm) with agent attention
(:class:`seg.model.layers.AgentAttention`) in the stages marked ``A`` of ``attn_type``; ``S`` stages keep PVT's own
softmax spatial-reduction attention (the published letter ``B``, accepted as an alias). Stage i pools its
queries to ``agent_num[i]`` agents (9, 16, 49, 49: 3 x 3 ... 7 x 7) for classification, or to the grid
``agent_shapes[i]`` (the published segmentation models use 12, 16, 28, 28; at 512 x 512 stage 4's 16 x 16 map is
pooled *up* to 28 x 28); the bias tables keep their published shapes and are resized to the map and the agent
grid on the fly.

Features: as FLatten-PVT, 4 NCHW maps at strides 4/8/16/32 through new output norms ``norm1..4`` (built for feature
models only); published checkpoints load unchanged (names and shapes equal) with
``pretrained_cfg_overlay=dict(file=...)``. The published *segmentation* backbone differs in two ways, both options
here (``feature_norms=False, patch_floor=True``, as the Agent-PVT ADE20K configs set): it returns the trunk maps
unnormalised, and its patch embeddings floor odd sizes where this model pads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import Tensor

from seg.model.backbones._registry import build_encoder, imagenet_cfg
from seg.model.backbones._staged import AttentionFactory, stage_factories
from seg.model.backbones._weights import adapt_state_dict
from seg.model.backbones.pvt import FLattenPVT, pvt_attention_letters
from seg.model.layers import AgentAttention

__all__ = ["AGENT_TABLES", "AgentPVT", "agent_letters", "checkpoint_filter_fn", "resize_agent_tables"]

AgentShape = int | tuple[int, int] | None
AGENT_TABLES = ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias")  # the bias tables' names


def agent_letters(
    agent_num: int, agent_shape: AgentShape = None, qkv_bias: bool = True, attn_drop: float = 0.0, drop: float = 0.0,
    fused_qkv: bool = False,
) -> dict[str, AttentionFactory]:
    """The letter ``A``: agent attention with ``agent_num`` stored agents on the grid ``agent_shape`` (PVT naming;
    Swin's ``qkv`` with ``fused_qkv``)."""
    return {"A": lambda dim, heads, grid, sr, shift: AgentAttention(
        dim, heads, grid, agent_num, agent_shape, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
        fused_qkv=fused_qkv)}


def per_stage(agent_num: Sequence[int], agent_shapes: Sequence[AgentShape] | None) -> list[AgentShape]:
    """The agent grid of every stage (None: square grids of ``agent_num``), checked against ``agent_num``."""
    shapes = list(agent_shapes) if agent_shapes is not None else [None] * len(agent_num)
    if len(shapes) != len(agent_num):
        raise ValueError(f"agent_num {tuple(agent_num)} and agent_shapes {agent_shapes} need one entry per stage")
    return shapes


class AgentPVT(FLattenPVT):
    """Agent-PVT: PVT v1 with agent attention.

    Args:
        attn_type: one letter per stage, ``A`` agent attention, ``S`` PVT's softmax spatial-reduction attention
            (reduced by the stage's ``sr_ratio``; the published ``B`` is an alias), or the skeleton's ``L`` / ``G``.
        agent_num: stored agents per stage (square numbers; the bias tables' agent axis).
        agent_shapes: agent grid per stage (an int n for n x n, or (rows, columns)); None: sqrt(agent_num) square
            grids (classification). The published segmentation configs use (12, 16, 28, 28).
        qkv_bias: bias in the q / kv projections.
        drop_rate: dropout after attention and MLP projections.
        attn_drop_rate: dropout on the attention weights.
        attn_layers: one attention factory per stage (overrides ``attn_type``).
        feature_norms: build the per-stage output norms ``norm1..4`` (``features_only=True`` sets it; the
            published segmentation backbone has none: ``feature_norms=False``).
        **kwargs: the skeleton's other arguments (:class:`~seg.model.backbones.pvt.FLattenPVT`, ``version=1``); the
            published segmentation backbone sets ``patch_floor=True``.
    """

    def __init__(
        self,
        attn_type: str = "AAAA",
        agent_num: Sequence[int] = (9, 16, 49, 49),
        agent_shapes: Sequence[AgentShape] | None = None,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        attn_layers: Sequence[AttentionFactory] | None = None,
        feature_norms: bool = False,
        **kwargs,
    ) -> None:
        shapes = per_stage(agent_num, agent_shapes)
        letters = [dict(pvt_attention_letters(qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate),
                        **agent_letters(agent_num[i], shapes[i], qkv_bias, attn_drop_rate, drop_rate))
                   for i in range(len(shapes))]
        factories = stage_factories(attn_type, letters, attn_layers, num_stages=len(shapes), aliases={"B": "S"})
        super().__init__(attn_type=attn_type, attn_layers=factories, version=1, qkv_bias=qkv_bias,
                         drop_rate=drop_rate, feature_norms=feature_norms, **kwargs)

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
