"""Agent-Swin (Han et al., ECCV 2024, arXiv 2312.08874) as timm encoders for any image size.

The Swin skeleton of :mod:`seg.model.backbones.swin` with one stage type per stage, written as the published
``attn_type`` strings: ``A`` agent attention (:class:`seg.model.layers.AgentAttention`) over the whole stage map (the
published "window" of 56 is the whole stage-1 map at 224: no windows, no shift), ``S`` Swin's 7 x 7
shifted-window softmax attention (published as ``B``, an alias), ``M`` a mixed stage whose first k blocks are
``A`` and the rest ``S``, k being the digits after the four letters (Agent-Swin-B: ``AAMB2``).

Any input of at least 32 x 32 (see :mod:`seg.model.backbones.swin` for padding and merging). Agents per stage:
``agent_num`` (9, 16, 49, 49) on a p x p grid, or the grids ``agent_shapes`` of the published segmentation
configs (T and B 9, 12, 14, 7; S 9, 12, 7, 7); the bias tables keep their published 224 shapes and are
resized to every map and agent grid. ``B`` blocks follow this project's window rule: an axis of at most 7 tokens
is one window without shift, as the published classifier does at 224 (its segmentation backbone still shifts such
maps; both agree whenever the ``B`` stages' maps exceed 7 x 7, e.g. for every input of 225 x 225 or more).

Features: 4 NCHW maps at strides 4/8/16/32 through the output norms ``norm0..3`` (new, as in the published
segmentation backbone; built for feature models only); published ImageNet checkpoints load with
``pretrained_cfg_overlay=dict(file=...)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from seg.model.backbones._registry import build_encoder, imagenet_cfg
from seg.model.backbones._staged import AttentionFactory, stage_factories
from seg.model.backbones._weights import adapt_state_dict, unwrap_checkpoint
from seg.model.backbones.agent_pvt import AGENT_TABLES, AgentShape, agent_letters, per_stage, resize_agent_tables
from seg.model.backbones.swin import FLattenSwin, _resize_bias_tables, swin_attention_letters

__all__ = ["AgentSwin", "checkpoint_filter_fn", "stage_types"]

Size = tuple[int, int]


def stage_types(attn_type: str, num_stages: int = 4) -> list[str]:
    """The published ``attn_type`` string -> one stage type per stage: ``'AAMB2'`` -> ``['A', 'A', 'M2', 'B']``
    (the letters themselves are checked by :func:`~seg.model.backbones._staged.stage_factories`)."""
    letters, digits = attn_type[:num_stages], attn_type[num_stages:]
    if len(letters) != num_stages or not letters.isalpha() or not re.fullmatch(r"\d*", digits):
        raise ValueError(f"attn_type {attn_type!r} must be {num_stages} letters of A (agent) / S or B (window "
                         "softmax) / M (mixed) / L, then the number of agent blocks of the M stages (e.g. 'AAMB2')")
    if ("M" in letters) != bool(digits):
        raise ValueError(f"attn_type {attn_type!r}: an M stage needs its number of agent blocks after the letters, "
                         "and only an M stage has one")
    return [letter + digits if letter == "M" else letter for letter in letters]


class _MixedStage:
    """The factory of an ``M`` stage: its first ``agent_blocks`` blocks agent attention, the rest windows (the
    stage builds its blocks in order, one call each)."""

    def __init__(self, agent: AttentionFactory, window: AttentionFactory, agent_blocks: int) -> None:
        self.agent, self.window, self.agent_blocks, self.built = agent, window, agent_blocks, 0

    def __call__(self, dim: int, num_heads: int, grid: Size, sr_ratio: int, shift: bool) -> nn.Module:
        self.built += 1
        factory = self.agent if self.built <= self.agent_blocks else self.window
        return factory(dim, num_heads, grid, sr_ratio, shift)


class AgentSwin(FLattenSwin):
    """Agent-Swin: Swin with agent attention in the ``A`` stages and the first blocks of ``M`` stages.

    Args:
        attn_type: the published stage string: 4 letters of ``A`` (agent), ``S`` (Swin's shifted-window softmax;
            the published ``B`` is an alias), ``M`` (mixed) or the skeleton's ``L``, then the agent blocks of ``M``.
        agent_num: stored agents per stage (square numbers; the bias tables' agent axis).
        agent_shapes: agent grid per stage (an int n for n x n, or (rows, columns)); None: sqrt(agent_num) square
            grids (classification). The published segmentation configs use (9, 12, 14, 7) for T / B, (9, 12, 7, 7)
            for S.
        attn_layers: one attention factory per stage (overrides ``attn_type``).
        qkv_bias: bias in the qkv projections.
        drop_rate: dropout after the patch embedding, attention and MLP projections.
        attn_drop_rate: dropout on the attention weights.
        window_size: window side of the ``S`` blocks.
        feature_norms: build the per-stage output norms ``norm0..3`` (``features_only=True`` sets it).
        **kwargs: the skeleton's other arguments (:class:`~seg.model.backbones.swin.FLattenSwin`).
    """

    def __init__(
        self,
        attn_type: str = "AAAB",
        agent_num: Sequence[int] = (9, 16, 49, 49),
        agent_shapes: Sequence[AgentShape] | None = None,
        attn_layers: Sequence[AttentionFactory] | None = None,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        window_size: int = 7,
        feature_norms: bool = False,
        **kwargs,
    ) -> None:
        kinds = stage_types(attn_type, len(agent_num))
        shapes = per_stage(agent_num, agent_shapes)
        letters = []
        for i, kind in enumerate(kinds):
            stage = dict(swin_attention_letters(qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                                                window_size=window_size),
                         **agent_letters(agent_num[i], shapes[i], qkv_bias, attn_drop_rate, drop_rate, fused_qkv=True))
            stage["M"] = _MixedStage(stage["A"], stage["S"], int(kind[1:] or 0))
            letters.append(stage)
        factories = stage_factories("".join(kind[0] for kind in kinds), letters, attn_layers, num_stages=len(kinds),
                                    aliases={"B": "S"})
        super().__init__(attn_type=attn_type, attn_layers=factories, window_size=window_size, qkv_bias=qkv_bias,
                         drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, feature_norms=feature_norms, **kwargs)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position tables and temperatures of the Swin skeleton plus the agent bias tables (full names)."""
        return super().no_weight_decay() | {name for name, _ in self.named_parameters() if name.endswith(AGENT_TABLES)}


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: AgentSwin) -> dict[str, Tensor]:
    """A published Agent-Swin checkpoint (names as released) -> this model's state dict.

    ``attn_mask`` and ``relative_position_index`` buffers are rebuilt, never loaded; bias tables stored for
    another window or training grid are resized; the output norms ``norm0..3`` keep their init.
    """
    state_dict = unwrap_checkpoint(state_dict)
    buffers = {name for name in state_dict if name.endswith(("attn_mask", "relative_position_index"))}
    return adapt_state_dict(
        state_dict,
        model,
        position_tables=lambda name: False,
        dropped=buffers,
        fresh=lambda name: name.split(".")[0] in {f"norm{i}" for i in range(4)},
        converters=(_resize_bias_tables, resize_agent_tables),
    )


def _create(variant: str, pretrained: bool = False, **kwargs) -> AgentSwin:
    return build_encoder(AgentSwin, variant, pretrained, checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    name: imagenet_cfg("patch_embed.proj")
    for name in ("agent_swin_tiny", "agent_swin_small", "agent_swin_base", "test_agent_swin")
})

_TEST = dict(embed_dim=16, depths=(1, 1, 4, 2), num_heads=(1, 2, 2, 4), mlp_ratio=2.0, attn_type="AAMB2")


@register_model
def agent_swin_tiny(pretrained: bool = False, **kwargs) -> AgentSwin:
    arch = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), attn_type="AAAB")
    return _create("agent_swin_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def agent_swin_small(pretrained: bool = False, **kwargs) -> AgentSwin:
    arch = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), attn_type="AABB")
    return _create("agent_swin_small", pretrained, **dict(arch, **kwargs))


@register_model
def agent_swin_base(pretrained: bool = False, **kwargs) -> AgentSwin:
    arch = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), attn_type="AAMB2")
    return _create("agent_swin_base", pretrained, **dict(arch, **kwargs))


@register_model
def test_agent_swin(pretrained: bool = False, **kwargs) -> AgentSwin:
    """Tiny variant (16-128 channels, an M2 stage of 4 blocks: 2 agent, then plain and shifted windows) for CPU
    tests."""
    return _create("test_agent_swin", pretrained, **dict(_TEST, **kwargs))
