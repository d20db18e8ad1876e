"""Agent-Swin (Han et al., ECCV 2024, arXiv 2312.08874) as timm encoders for any image size.

The Swin skeleton of :mod:`seg.backbones.swin` with one stage type per stage, written as the published
``attn_type`` strings: ``A`` agent attention (:class:`seg.layers.AgentAttention`) over the whole stage map (the
published "window" of 56 is the whole stage-1 map at 224: no windows, no shift), ``B`` Swin's 7 x 7
shifted-window softmax attention, ``M`` a mixed stage whose first k blocks are ``A`` and the rest ``B``, k being
the digits after the four letters (Agent-Swin-B: ``AAMB2``).

Any input of at least 32 x 32 (see :mod:`seg.backbones.swin` for padding and merging). Agents per stage:
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
from functools import partial

import torch
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from seg.backbones._registry import build_encoder, imagenet_cfg, init_transformer_weights
from seg.backbones._weights import adapt_state_dict, unwrap_checkpoint
from seg.backbones.agent_pvt import AGENT_TABLES, AgentShape, resize_agent_tables
from seg.backbones.swin import FLattenSwin, _resize_bias_tables, swin_attention_letters
from seg.layers import AgentAttention

__all__ = ["AgentSwin", "checkpoint_filter_fn", "stage_types"]

Size = tuple[int, int]


def stage_types(attn_type: str, num_stages: int = 4) -> list[str]:
    """The published ``attn_type`` string -> one stage type per stage: ``'AAMB2'`` -> ``['A', 'A', 'M2', 'B']``."""
    letters, digits = attn_type[:num_stages], attn_type[num_stages:]
    if len(letters) != num_stages or set(letters) - {"A", "B", "M"} or not re.fullmatch(r"\d*", digits):
        raise ValueError(f"attn_type {attn_type!r} must be {num_stages} letters of A (agent) / B (window softmax) / "
                         "M (mixed), then the number of agent blocks of the M stages (e.g. 'AAMB2')")
    if ("M" in letters) != bool(digits):
        raise ValueError(f"attn_type {attn_type!r}: an M stage needs its number of agent blocks after the letters, "
                         "and only an M stage has one")
    return [letter + digits if letter == "M" else letter for letter in letters]


def _agent_factory(agent_num: int, agent_shape: AgentShape, qkv_bias: bool, attn_drop: float, drop: float,
                   dim: int, heads: int, grid: Size, shift: bool) -> nn.Module:
    return AgentAttention(dim, heads, grid, agent_num, agent_shape, qkv_bias=qkv_bias, attn_drop=attn_drop,
                          proj_drop=drop, fused_qkv=True)


class AgentSwin(FLattenSwin):
    """Agent-Swin: Swin with agent attention in the ``A`` stages and the first blocks of ``M`` stages.

    Args:
        img_size: training resolution; fixes the grid the row / column bias tables are stored at.
        patch_size: side of the stem's patches.
        in_chans: input channels.
        num_classes: classifier outputs (0: no classifier).
        embed_dim: channels of stage 1 (doubled per stage).
        depths: blocks per stage.
        num_heads: heads per stage.
        window_size: window side of the ``B`` blocks.
        mlp_ratio: MLP expansion.
        attn_type: the published stage string: 4 letters of ``A`` / ``B`` / ``M``, then the agent blocks of ``M``.
        agent_num: stored agents per stage (square numbers; the bias tables' agent axis).
        agent_shapes: agent grid per stage (an int n for n x n, or (rows, columns)); None: sqrt(agent_num) square
            grids (classification). The published segmentation configs use (9, 12, 14, 7) for T / B, (9, 12, 7, 7)
            for S.
        attn_backend: ``auto`` / ``reference`` / ``cpu`` / ``triton`` fast paths (see :mod:`seg.kernels`).
        qkv_bias: bias in the qkv projections.
        drop_rate: dropout after the patch embedding, attention and MLP projections.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        global_pool: ``avg`` (mean of the stage-4 map) or ``''`` (no pooling).
        feature_norms: build the per-stage output norms ``norm0..3`` (``features_only=True`` sets it).
    """

    def __init__(
        self,
        img_size: int | Size = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        attn_type: str = "AAAB",
        agent_num: Sequence[int] = (9, 16, 49, 49),
        agent_shapes: Sequence[AgentShape] | None = None,
        attn_backend: str = "auto",
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        feature_norms: bool = False,
    ) -> None:
        kinds = stage_types(attn_type, len(depths))
        shapes = list(agent_shapes) if agent_shapes is not None else [None] * len(depths)
        if len(agent_num) != len(depths) or len(shapes) != len(depths):
            raise ValueError(f"agent_num {tuple(agent_num)} and agent_shapes {agent_shapes} need one entry per stage "
                             f"({len(depths)})")
        window = swin_attention_letters(window_size, qkv_bias, drop_rate, attn_drop_rate)["S"]
        agents = [partial(_agent_factory, agent_num[i], shapes[i], qkv_bias, attn_drop_rate, drop_rate)
                  for i in range(len(depths))]
        factories = [agents[i] if kind == "A" else window for i, kind in enumerate(kinds)]
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
                         mlp_ratio=mlp_ratio, attn_type="".join(kind[0] for kind in kinds), attn_layers=factories,
                         attn_backend=attn_backend, qkv_bias=qkv_bias, drop_rate=drop_rate,
                         attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, global_pool=global_pool,
                         feature_norms=feature_norms)
        self.attn_type = attn_type
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        for i, kind in enumerate(kinds):  # M stages: the first k blocks built as B become agent blocks
            if not kind.startswith("M"):
                continue
            stride = patch_size * 2**i
            grid = (img_size[0] // stride, img_size[1] // stride)
            for block in self.layers[i].blocks[: int(kind[1:])]:
                block.attn = agents[i](embed_dim * 2**i, num_heads[i], grid, False)
                block.attn.apply(init_transformer_weights)
        self.set_attn_backend(attn_backend)

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
