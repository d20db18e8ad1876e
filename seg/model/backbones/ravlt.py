"""RAVLT encoders (Fan et al., "Breaking the Low-Rank Dilemma of Linear Attention", CVPR 2025, arXiv 2411.07635)
for timm.

A four-stage convolutional-transformer pyramid on NCHW maps: a conv stem (3x3 s2 to C/2, two 3x3 s1, 3x3 s2
to C; BN, exact GELU between), stages of blocks ``x + pos(x)``, ``x + gamma_1 * attn(LN x)``,
``x + gamma_2 * FFN(LN x)`` (3x3 depthwise positional conv, LayerNorm eps 1e-6 over channels, layer scale,
FFN 1x1 -> GELU -> + 3x3 depthwise -> 1x1 with ratio 3.5), and 3x3 stride-2 conv + BN merges between stages.
Stages 1-2 run rank-augmented linear attention and stages 3-4 RoPE softmax attention
(:mod:`seg.model.layers.rala`; ``attn_type='llvv'``, the published layout). The RoPE tables are computed for the
live map, and every conv pads, so any input of at least 32 x 32 works: stage i has
ceil(H / 2^(i+2)) x ceil(W / 2^(i+2)) tokens.

Features: ``features_only=True`` gives 4 NCHW maps at strides 4/8/16/32, each through a per-stage LayerNorm
``extra_norms.{i}.norm`` (the names of the published segmentation backbone; built for feature models only); they
are not in the ImageNet checkpoints and keep their initial values on load. The classifier is the published one: 1x1
conv ``proj`` to 1024 channels, BatchNorm ``norm``, Swish, average pool (``global_pool='avg'``), ``head`` (stored
as a 1x1 conv in the published files, a Linear here). As in timm's EfficientNets, the layers before the pool belong
to :meth:`RAVLT.forward_features`, which returns the projected map (B, 1024, H/32, W/32): ``num_features`` and
``head_hidden_size`` are the projection's channels, the pre-logits its mean. Parameter names equal the published
checkpoints'. Parameter counts with the 1000-class head: Tiny 14.90M, Small 25.59M, Base 48.24M, Large 95.24M
(published 15 / 26 / 48 / 95M).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import ClassVar

import torch
from timm.layers import DropPath, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from seg.model.backbones._registry import build_encoder, imagenet_cfg, init_transformer_weights
from seg.model.backbones._staged import AttentionFactory, StagedEncoder, stage_factories
from seg.model.backbones._weights import adapt_state_dict, unwrap_checkpoint
from seg.model.layers.rala import RALAttention, RoPESoftmaxAttention
from seg.model.layers.rope import RoPE

__all__ = ["LETTER_ALIASES", "RAVLT", "checkpoint_filter_fn", "ravlt_attention_letters"]

Rope = tuple[Tensor, Tensor]
LETTER_ALIASES = {"l": "L", "v": "S"}  # the published letters: l linear, v ("vanilla") softmax


def ravlt_attention_letters(linear: Callable[[int, int], nn.Module] = RALAttention) -> dict[str, AttentionFactory]:
    """The ``attn_type`` shorthand of the RAVLT skeleton: ``L`` the family's linear attention (``linear(dim,
    num_heads)``: RALA, or MALA's), ``S`` the skeleton's RoPE softmax attention."""
    return {
        "L": lambda dim, heads, grid, sr, shift: linear(dim, heads),
        "S": lambda dim, heads, grid, sr, shift: RoPESoftmaxAttention(dim, heads),
    }


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map; the inner ``norm`` keeps the published names."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


class ChannelNorm(nn.Module):
    """LayerNorm over the last axis of a channels-last (B, H, W, C) map; the inner ``norm`` keeps the published
    names of the output norms (``extra_norms.{i}.norm``)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


class FeedForward(nn.Module):
    """1x1 conv -> GELU -> u + 3x3 depthwise conv(u) -> 1x1 conv, on (B, C, H, W)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.fc1(x))
        return self.fc2(x + self.dwconv(x))


class Block(nn.Module):
    """Conv position encoding, then pre-norm attention and FFN residuals, each scaled per channel.

    Args:
        dim: channels C.
        attn_layer: builds the block's attention, a module taking ((B, C, H, W), RoPE tables).
        hidden: FFN hidden channels.
        drop_path: stochastic depth of both residual branches.
        layer_scale: initial value of ``gamma_1`` / ``gamma_2``.
    """

    def __init__(
        self,
        dim: int,
        attn_layer: Callable[[], nn.Module],
        hidden: int,
        drop_path: float = 0.0,
        layer_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.norm1 = LayerNorm2d(dim)
        self.attn = attn_layer()
        self.norm2 = LayerNorm2d(dim)
        self.ffn = FeedForward(dim, hidden)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.gamma_1 = nn.Parameter(torch.full((1, dim, 1, 1), layer_scale))
        self.gamma_2 = nn.Parameter(torch.full((1, dim, 1, 1), layer_scale))

    def forward(self, x: Tensor, rope: Rope) -> Tensor:
        """x: (B, C, H, W); rope: the (sin, cos) tables of the H x W grid."""
        x = x + self.pos(x)
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), rope))
        return x + self.drop_path(self.gamma_2 * self.ffn(self.norm2(x)))


class PatchMerging(nn.Module):
    """3x3 stride-2 conv (padding 1: ceil-halved maps) + BatchNorm."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.reduction(x))


class Stage(nn.Module):
    """One stage: the RoPE tables of its heads (``RoPE.angle``), its blocks and the merge to the next stage."""

    def __init__(self, blocks: list[Block], head_dim: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.RoPE = RoPE(head_dim)
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


def conv_stem(in_chans: int, dim: int) -> nn.Sequential:
    """3x3 s2 (to C/2) BN GELU, 2 x [3x3 BN GELU], 3x3 s2 (to C) BN: (B, 3, H, W) -> (B, C, H/4, W/4), ceil."""
    half = dim // 2
    layers: list[nn.Module] = []
    for c_in, c_out, stride in ((in_chans, half, 2), (half, half, 1), (half, half, 1), (half, dim, 2)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.GELU()]
    return nn.Sequential(*layers[:-1])  # no activation after the last BN


class PatchEmbed(nn.Module):
    """The conv stem under the published name ``patch_embed.proj``."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = conv_stem(in_chans, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class RAVLT(StagedEncoder):
    """RAVLT backbone with the published convolutional classifier; subclasses swap the linear attention through
    :attr:`linear_attention` (MALA, :mod:`seg.model.backbones.mala`).

    Args:
        in_chans: input channels.
        num_classes: classifier outputs (0: no classifier).
        embed_dims: channels per stage.
        depths: blocks per stage.
        num_heads: heads per stage (every head dim a multiple of 4).
        mlp_ratio: FFN expansion.
        attn_type: one letter per stage, ``L`` rank-augmented linear attention, ``S`` RoPE softmax attention (the
            published ``l`` / ``v`` are aliases: ``llvv`` is ``LLSS``).
        attn_layers: one attention factory per stage (:data:`~seg.model.backbones._staged.AttentionFactory`, called
            with the stage grid at ``img_size``, sr_ratio 1, no shift) of modules taking ((B, C, H, W), RoPE
            tables); overrides ``attn_type``.
        img_size: training resolution; only gives ``attn_layers`` their stage grid.
        layer_scales: initial layer-scale value per stage.
        projection: channels of the classifier's 1x1 conv.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        attn_backend: ``auto`` / ``reference`` / ``cpu`` / ``triton`` fast paths (see :mod:`seg.kernels`).
        global_pool: ``avg`` (mean of the projected stage-4 map) or ``''`` (no pooling).
        feature_norms: build the per-stage output norms ``extra_norms`` (``features_only=True`` sets it).
    """

    linear_attention: ClassVar[Callable[[int, int], nn.Module]] = RALAttention
    _final_modules = ("proj", "norm", "act")  # the classifier's conv, BatchNorm and Swish fit stage 4 only

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        mlp_ratio: float = 3.5,
        attn_type: str = "llvv",
        attn_layers: Sequence[AttentionFactory] | None = None,
        img_size: int = 224,
        layer_scales: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        projection: int = 1024,
        drop_path_rate: float = 0.1,
        attn_backend: str = "auto",
        global_pool: str = "avg",
        feature_norms: bool = False,
    ) -> None:
        super().__init__(feature_norms)
        for name, value in (("embed_dims", embed_dims), ("depths", depths), ("num_heads", num_heads),
                            ("layer_scales", layer_scales)):
            if len(value) != 4:
                raise ValueError(f"{name} needs one entry per stage (4), got {len(value)}")
        factories = stage_factories(attn_type, ravlt_attention_letters(type(self).linear_attention), attn_layers,
                                    aliases=LETTER_ALIASES)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = projection
        total = sum(depths)
        dpr = [drop_path_rate * j / max(total - 1, 1) for j in range(total)]  # python floats: meta-safe
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.layers = nn.ModuleList()
        if feature_norms:
            self.extra_norms = nn.ModuleDict()  # stage index -> its output norm
        for i in range(4):
            drops = dpr[sum(depths[:i]):sum(depths[:i + 1])]
            hidden = int(mlp_ratio * embed_dims[i])
            grid = (img_size // (4 * 2**i),) * 2
            attn_layer = partial(factories[i], embed_dims[i], num_heads[i], grid, 1, False)
            make = partial(Block, embed_dims[i], attn_layer, hidden, layer_scale=layer_scales[i])
            downsample = PatchMerging(embed_dims[i], embed_dims[i + 1]) if i < 3 else None
            self.layers.append(Stage([make(drop_path=p) for p in drops], embed_dims[i] // num_heads[i], downsample))
            self._add_stage(i, embed_dims[i], 4 * 2**i, f"layers.{i}", norm=(f"extra_norms.{i}",
                            ChannelNorm(embed_dims[i])), norm_leaf=".norm")  # the LayerNorm itself, or the stage
        self.proj = nn.Conv2d(embed_dims[-1], projection, 1)
        self.norm = nn.BatchNorm2d(projection)
        self.act = nn.SiLU()  # Swish
        self._num_stages = 4
        self._finish(num_classes, global_pool, attn_backend, _init_weights)

    def _begin(self, x: Tensor) -> Tensor:
        return self.patch_embed(x)  # (B, C, H/4, W/4)

    def _stage(self, i: int, state: Tensor, feature: bool) -> tuple[Tensor, Tensor | None]:
        """Stage i on a (B, C, H, W) map: (the merged map for the next stage, feature map: the stage's output)."""
        stage = self.layers[i]
        rope = stage.RoPE((state.shape[2], state.shape[3]))
        x = self.run_blocks(stage.blocks, state, rope)
        return (x if stage.downsample is None else stage.downsample(x)), x if feature else None

    def _end(self, state: Tensor, complete: bool) -> Tensor:
        """The classifier's projection of the stage-4 map, Swish(BN(conv 1x1)): (B, projection, H, W); when
        stopped early, the last merged map."""
        return self.act(self.norm(self.proj(state))) if complete else state

    def _feature(self, i: int, x: Tensor, final_norm: bool) -> Tensor:
        """Stage maps through their output norms only: the BatchNorm ``norm`` belongs to the 1x1 projection, so
        ``forward_intermediates(norm=True)`` has no final norm to apply to a stage map."""
        return super()._feature(i, x, final_norm=False)


def _init_weights(m: nn.Module) -> None:
    """The shared Linear / LayerNorm init, and convs like the Linears: truncated normal (std 0.02), zero bias."""
    init_transformer_weights(m)
    if isinstance(m, nn.Conv2d):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _head_as_linear(name: str, value: Tensor, target: Tensor) -> Tensor | None:
    """The published 1x1 conv head (classes, C, 1, 1) as a Linear weight (classes, C)."""
    if name == "head.weight" and value.dim() == 4 and value.shape[2:] == (1, 1):
        return value.flatten(1)
    return None


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: RAVLT) -> dict[str, Tensor]:
    """A published RAVLT ImageNet checkpoint (names as released) -> this model's state dict.

    timm's file loader hands over ``model_ema`` when the file holds one, else ``model`` (the published
    segmentation code loads ``model``: save ``{'model': ckpt['model']}`` to use those). Called on a whole
    checkpoint dict, this takes ``model``, else ``model_ema``. Files that pickle the training ``args`` are
    refused by ``weights_only=True``: re-save the state dict alone. The output norms ``extra_norms`` keep
    their initial values; the 1x1-conv ``head`` becomes the Linear head.
    """
    if "model" not in state_dict and isinstance(state_dict.get("model_ema"), dict):
        state_dict = state_dict["model_ema"]
    return adapt_state_dict(
        unwrap_checkpoint(state_dict),
        model,
        position_tables=lambda name: False,
        fresh=lambda name: name.startswith("extra_norms."),
        converters=(_head_as_linear,),
    )


def _create(variant: str, pretrained: bool = False, **kwargs) -> RAVLT:
    return build_encoder(RAVLT, variant, pretrained, checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    name: imagenet_cfg("patch_embed.proj.0")
    for name in ("ravlt_tiny", "ravlt_small", "ravlt_base", "ravlt_large", "test_ravlt")
})

_TINY = dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.1)
_SMALL = dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 9, 3), num_heads=(1, 2, 5, 8), drop_path_rate=0.15)
_BASE = dict(embed_dims=(96, 192, 384, 512), depths=(4, 6, 12, 6), num_heads=(1, 2, 6, 8), drop_path_rate=0.4,
             layer_scales=(1.0, 1.0, 1e-6, 1e-6))
_LARGE = dict(embed_dims=(96, 192, 448, 640), depths=(4, 7, 19, 8), num_heads=(1, 2, 7, 10), drop_path_rate=0.55,
              layer_scales=(1e-6,) * 4)
_TEST = dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4), mlp_ratio=2.0,
             projection=64, drop_path_rate=0.0)


@register_model
def ravlt_tiny(pretrained: bool = False, **kwargs) -> RAVLT:
    return _create("ravlt_tiny", pretrained, **dict(_TINY, **kwargs))


@register_model
def ravlt_small(pretrained: bool = False, **kwargs) -> RAVLT:
    return _create("ravlt_small", pretrained, **dict(_SMALL, **kwargs))


@register_model
def ravlt_base(pretrained: bool = False, **kwargs) -> RAVLT:
    return _create("ravlt_base", pretrained, **dict(_BASE, **kwargs))


@register_model
def ravlt_large(pretrained: bool = False, **kwargs) -> RAVLT:
    return _create("ravlt_large", pretrained, **dict(_LARGE, **kwargs))


@register_model
def test_ravlt(pretrained: bool = False, **kwargs) -> RAVLT:
    """Tiny variant (depth 1 per stage, 16-64 channels, head dim 16) for CPU tests."""
    return _create("test_ravlt", pretrained, **dict(_TEST, **kwargs))
