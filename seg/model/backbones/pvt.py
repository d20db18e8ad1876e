"""FLatten-PVT and FLatten-PVTv2 (Han et al., ICCV 2023) as timm encoders for any image size.

Pyramid Vision Transformer v1 (Wang et al., ICCV 2021) and v2 (Wang et al., CVMJ 2022) with focused
linear attention in the stages marked ``L`` of ``attn_type``; ``S`` stages use PVT's own softmax
spatial-reduction attention, so ``attn_type='SSSS'`` is the original softmax backbone; ``G`` stages use
SOFT-Norm Gaussian-kernel attention (:class:`seg.model.layers.SoftAttention`, bottleneck reduction = the stage's
``sr_ratio``), so all three attentions can be compared inside one skeleton.

Every table sized by the 224 x 224 training resolution (PVT v1 ``pos_embed``, the attention's
``positional_encoding``) is stored at that grid and resized bilinearly to the current one, so the
models take any input of at least 32 x 32. Parameter names equal the published checkpoints'.

Features: ``features_only=True`` gives 4 NCHW maps at strides 4/8/16/32, each through a per-stage
LayerNorm: v2's published ``norm1..4`` (inside the trunk, as published), and for v1 new output norms
``norm1..4`` applied to the returned maps only (built for feature models only: the classifier never uses
them). The classifier is the published one: mean of the stage-4 tokens (``global_pool='avg'``), then
``head`` (v1 published checkpoints hold a final ``norm`` their forward never uses; it is dropped on load).
Original PVT v1 checkpoints (class token in stage 4) load into ``attn_type='SSSS'``: the class token and its
position entry are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import register_model
from torch import Tensor, nn

from seg.model.backbones._blocks import Block
from seg.model.backbones._registry import build_encoder, imagenet_cfgs, init_transformer_weights
from seg.model.backbones._staged import AttentionFactory, StagedEncoder, stage_factories
from seg.model.backbones._weights import adapt_state_dict
from seg.model.layers import FocusedLinearAttention, SoftAttention, SpatialReductionAttention, resize_token_grid

__all__ = ["Block", "FLattenPVT", "checkpoint_filter_fn", "pvt_attention_letters"]

LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)


class PatchEmbed(nn.Module):
    """Strided conv embedding + LayerNorm; v1 patches do not overlap (kernel = stride), v2's do."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int, floor: bool = False) -> None:
        super().__init__()
        padding = patch_size // 2 if patch_size > stride else 0
        self.pad_to_stride = patch_size == stride and not floor
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, C_in, H, W) -> tokens (B, N, C) and their grid (H', W'): ceil(H / stride) x ceil(W / stride), or
        floor(H / stride) x floor(W / stride) for ``floor`` (the last incomplete row / column of patches dropped)."""
        if self.pad_to_stride:  # non-overlapping patches: complete the last row / column of patches with zeros
            stride = self.proj.stride[0]
            x = F.pad(x, (0, -x.shape[3] % stride, 0, -x.shape[2] % stride))
        x = self.proj(x.contiguous(memory_format=torch.channels_last))  # channels-last in and out
        size = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), size  # (B, H'*W', C), a view of the channels-last map


def pvt_attention_letters(
    la_sr_ratio: int = 1,
    *,
    focusing_factor: float = 3.0,
    kernel_size: int = 5,
    qkv_bias: bool = True,
    drop: float = 0.0,
    attn_drop: float = 0.0,
) -> dict[str, AttentionFactory]:
    """The ``attn_type`` shorthand of the PVT skeleton: ``L`` focused linear attention (keys reduced by
    ``la_sr_ratio``), ``S`` PVT's own softmax spatial-reduction attention (reduced by the stage's ``sr_ratio``),
    ``G`` SOFT-Norm (bottleneck reduction and DWConv kernel 9 / 5 / 3 for sr 8 / 4 / 2, as SOFT's stages)."""
    return {
        "L": lambda dim, heads, grid, sr, shift: FocusedLinearAttention(
            dim, heads, grid, qkv_bias=qkv_bias, sr_ratio=la_sr_ratio, focusing_factor=focusing_factor,
            kernel_size=kernel_size, proj_drop=drop),
        "S": lambda dim, heads, grid, sr, shift: SpatialReductionAttention(
            dim, heads, qkv_bias=qkv_bias, sr_ratio=sr, attn_drop=attn_drop, proj_drop=drop),
        "G": lambda dim, heads, grid, sr, shift: SoftAttention(
            dim, heads, sr_ratio=sr, qkv_bias=qkv_bias, normalize=True, proj_drop=drop),
    }


class FLattenPVT(StagedEncoder):
    """FLatten-PVT (``version=1``) and FLatten-PVTv2 (``version=2``).

    Stage i is the published numbered attributes ``patch_embed{i+1}``, ``pos_embed{i+1}`` (v1), ``block{i+1}``
    and ``norm{i+1}``; there is no final norm.

    Args:
        img_size: training resolution; fixes the grid the position tables are stored at.
        in_chans: input channels.
        num_classes: classifier outputs (0: no classifier).
        embed_dims: channels per stage.
        num_heads: heads per stage.
        mlp_ratios: MLP expansion per stage.
        depths: blocks per stage.
        sr_ratios: spatial reduction of the softmax (``S``) stages; bottleneck reduction of the SOFT (``G``) ones.
        attn_type: one letter per stage, ``L`` focused linear, ``S`` softmax or ``G`` SOFT (Gaussian kernel).
        attn_layers: one attention factory per stage (:data:`~seg.model.backbones._staged.AttentionFactory`, called
            with the stage's ``sr_ratio``, no shift); overrides ``attn_type`` (which is the shorthand that builds
            them).
        attn_backend: ``auto`` / ``reference`` / ``cpu`` / ``triton`` fast paths (see :mod:`seg.kernels`).
        version: 1 (non-overlapping patches, absolute position tables) or 2 (overlapping patches, conv MLP).
        qkv_bias: bias in the q / kv projections.
        drop_rate: dropout after attention and MLP projections.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        la_sr_ratios: spatial reduction of the focused linear (``L``) stages (1 in every published model).
        focusing_factor: power p of the focusing function.
        kernel_size: kernel of the rank-restoring depthwise conv.
        global_pool: ``avg`` (mean of the stage-4 map) or ``''`` (no pooling).
        feature_norms: build v1's per-stage output norms (``features_only=True`` sets it).
        patch_floor: non-overlapping patch embeddings drop an incomplete last row / column of patches instead of
            completing it with zeros (the published Agent-PVT segmentation backbone's sizes: 85 columns at
            stride 4 for a width of 342, where padding gives 86).
    """

    _stage_parts = ("patch_embed", "pos_embed", "block", "norm")
    _final_modules = ()  # no final norm: v1's published one is unused (dropped on load), v2 has none

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
        attn_type: str = "LLLL",
        attn_layers: Sequence[AttentionFactory] | None = None,
        attn_backend: str = "auto",
        version: int = 1,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        la_sr_ratios: Sequence[int] = (1, 1, 1, 1),
        focusing_factor: float = 3.0,
        kernel_size: int = 5,
        global_pool: str = "avg",
        feature_norms: bool = False,
        patch_floor: bool = False,
    ) -> None:
        super().__init__(feature_norms)
        if version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {version}")
        self.version = version
        self.num_classes = num_classes
        self.embed_dims = list(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        total = sum(depths)
        dpr = [drop_path_rate * j / max(total - 1, 1) for j in range(total)]  # linear decay rule
        letters = [pvt_attention_letters(sr, qkv_bias=qkv_bias, drop=drop_rate, focusing_factor=focusing_factor,
                                         kernel_size=kernel_size) for sr in la_sr_ratios]
        factories = stage_factories(attn_type, letters, attn_layers)
        for i in range(4):
            stride = 4 * 2**i
            grid = (img_size // stride, img_size // stride)
            patch, step = (4, 4) if i == 0 else (2, 2)
            if version == 2:
                patch, step = (7, 4) if i == 0 else (3, 2)
            c_in = in_chans if i == 0 else embed_dims[i - 1]
            self.add_module(f"patch_embed{i + 1}", PatchEmbed(c_in, embed_dims[i], patch, step, patch_floor))
            if version == 1:
                self.register_parameter(f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, grid[0] * grid[1],
                                                                                       embed_dims[i])))
            attn_layer = partial(factories[i], embed_dims[i], num_heads[i], grid, sr_ratios[i], False)
            blocks = [
                Block(embed_dims[i], mlp_ratios[i], attn_layer, conv_mlp=version == 2, drop=drop_rate,
                      drop_path=dpr[sum(depths[:i]) + j], norm_layer=LayerNorm6)
                for j in range(depths[i])
            ]
            self.add_module(f"block{i + 1}", nn.ModuleList(blocks))
            if version == 2:  # inside the trunk
                self.add_module(f"norm{i + 1}", LayerNorm6(embed_dims[i]))
                self._add_stage(i, embed_dims[i], stride, f"norm{i + 1}")
            else:
                self._add_stage(i, embed_dims[i], stride, f"block{i + 1}", norm=(f"norm{i + 1}",
                                                                                LayerNorm6(embed_dims[i])))
        self.pos_drop = nn.Dropout(drop_rate)
        self._num_stages = 4
        self._finish(num_classes, global_pool, attn_backend, _init_weights)
        if version == 1:
            for i in range(4):
                trunc_normal_(self._part(i, "pos_embed"), std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"pos_embed{i + 1}" for i in range(4)}

    def _begin(self, x: Tensor) -> Tensor:
        """The image: every stage starts with its own patch embedding."""
        return x

    def _stage(self, i: int, x: Tensor, feature: bool) -> tuple[Tensor, Tensor | None]:
        """Stage i on an NCHW map: (trunk map for the next stage, feature map: the same map)."""
        B = x.shape[0]
        x, size = self._part(i, "patch_embed")(x)  # (B, N, C)
        if self.version == 1:
            x = self.pos_drop(x + resize_token_grid(self._part(i, "pos_embed"), size))
        x = self.run_blocks(self._part(i, "block"), x, size)
        if self.version == 2:
            x = self._part(i, "norm")(x)  # v2 normalises inside the trunk
        x = x.view(B, *size, -1).permute(0, 3, 1, 2)  # (B, N, C) -> (B, C, H, W), channels-last
        return x, x if feature else None

    def _end(self, state: Tensor, complete: bool) -> Tensor:
        """The trunk map of the last stage run (B, C, H/32, W/32 when complete)."""
        return state


def _init_weights(m: nn.Module) -> None:
    """The shared Linear / LayerNorm init, plus PVT's fan-out normal init of convolutions."""
    init_transformer_weights(m)
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: FLattenPVT) -> dict[str, Tensor]:
    """A published FLatten-PVT / PVTv2 checkpoint (names as released) -> this model's state dict."""
    v1 = model.version == 1
    return adapt_state_dict(
        state_dict,
        model,
        position_tables=lambda name: name.startswith("pos_embed") or name.endswith("positional_encoding"),
        converters=[_drop_class_token],
        dropped={"norm.weight", "norm.bias", "cls_token"} if v1 else (),
        fresh=(lambda name: name.split(".")[0] in {"norm1", "norm2", "norm3", "norm4"}) if v1 else
        (lambda name: False),
    )


def _drop_class_token(name: str, value: Tensor, target: Tensor) -> Tensor | None:
    """Original PVT v1 checkpoints prepend a class-token entry to ``pos_embed4`` (50 = 1 + 7 x 7)."""
    n = value.shape[1] if value.dim() == 3 else 0
    if name == "pos_embed4" and math.isqrt(n - 1) ** 2 == n - 1 and math.isqrt(n) ** 2 != n:
        return value[:, 1:]
    return None


def _create(variant: str, pretrained: bool = False, **kwargs) -> FLattenPVT:
    return build_encoder(FLattenPVT, variant, pretrained, checkpoint_filter_fn, **kwargs)


default_cfgs = imagenet_cfgs("patch_embed1.proj", (
    "flatten_pvt_tiny", "flatten_pvt_small", "flatten_pvt_medium", "flatten_pvt_large",
    "flatten_pvt_v2_b0", "flatten_pvt_v2_b1", "flatten_pvt_v2_b2", "flatten_pvt_v2_b3",
    "flatten_pvt_v2_b4", "flatten_pvt_v2_b5", "test_flatten_pvt", "test_flatten_pvt_v2",
))

_PVT = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4))
_TEST = dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 1, 1))


def _variant(name: str, version: int, arch: dict, pretrained: bool, kwargs: dict) -> FLattenPVT:
    return _create(name, pretrained, **dict(arch, version=version, **kwargs))


@register_model
def flatten_pvt_tiny(pretrained: bool = False, **kwargs) -> FLattenPVT:
    return _variant("flatten_pvt_tiny", 1, dict(_PVT, depths=(2, 2, 2, 2)), pretrained, kwargs)


@register_model
def flatten_pvt_small(pretrained: bool = False, **kwargs) -> FLattenPVT:
    return _variant("flatten_pvt_small", 1, dict(_PVT, depths=(3, 4, 6, 3)), pretrained, kwargs)


@register_model
def flatten_pvt_medium(pretrained: bool = False, **kwargs) -> FLattenPVT:
    return _variant("flatten_pvt_medium", 1, dict(_PVT, depths=(3, 4, 18, 3)), pretrained, kwargs)


@register_model
def flatten_pvt_large(pretrained: bool = False, **kwargs) -> FLattenPVT:
    return _variant("flatten_pvt_large", 1, dict(_PVT, depths=(3, 8, 27, 3)), pretrained, kwargs)


@register_model
def flatten_pvt_v2_b0(pretrained: bool = False, **kwargs) -> FLattenPVT:
    arch = dict(_PVT, embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2))
    return _variant("flatten_pvt_v2_b0", 2, arch, pretrained, kwargs)


@register_model
def flatten_pvt_v2_b1(pretrained: bool = False, **kwargs) -> FLattenPVT:
    return _variant("flatten_pvt_v2_b1", 2, dict(_PVT, depths=(2, 2, 2, 2)), pretrained, kwargs)


@register_model
def flatten_pvt_v2_b2(pretrained: bool = False, **kwargs) -> FLattenPVT:
    return _variant("flatten_pvt_v2_b2", 2, dict(_PVT, depths=(3, 4, 6, 3)), pretrained, kwargs)


@register_model
def flatten_pvt_v2_b3(pretrained: bool = False, **kwargs) -> FLattenPVT:
    return _variant("flatten_pvt_v2_b3", 2, dict(_PVT, depths=(3, 4, 18, 3)), pretrained, kwargs)


@register_model
def flatten_pvt_v2_b4(pretrained: bool = False, **kwargs) -> FLattenPVT:
    return _variant("flatten_pvt_v2_b4", 2, dict(_PVT, depths=(3, 8, 27, 3)), pretrained, kwargs)


@register_model
def flatten_pvt_v2_b5(pretrained: bool = False, **kwargs) -> FLattenPVT:
    arch = dict(_PVT, depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4))
    return _variant("flatten_pvt_v2_b5", 2, arch, pretrained, kwargs)


@register_model
def test_flatten_pvt(pretrained: bool = False, **kwargs) -> FLattenPVT:
    """Tiny v1 variant (depth 1 per stage, 16-64 channels) for CPU tests."""
    return _variant("test_flatten_pvt", 1, _TEST, pretrained, kwargs)


@register_model
def test_flatten_pvt_v2(pretrained: bool = False, **kwargs) -> FLattenPVT:
    """Tiny v2 variant (depth 1 per stage, 16-64 channels) for CPU tests."""
    return _variant("test_flatten_pvt_v2", 2, _TEST, pretrained, kwargs)
