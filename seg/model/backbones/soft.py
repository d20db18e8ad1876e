"""SOFT encoders (Lu et al., NeurIPS 2021, arXiv 2110.11945; SOFT-Norm: IJCV, arXiv 2207.03341) for timm.

A four-stage pyramid: a conv stem (3x3 s2 -> 3x3 s1 -> 3x3 s2, each BN + ReLU, 32 channels inside) then
3x3 s2 conv + BN + ReLU embeddings between stages; learned absolute position tables per stage; stages 1-3
run post-norm blocks with softmax-free attention (:class:`seg.model.layers.SoftAttention`, head dim 32, bottleneck
reduction 8 / 4 / 2, DWConv kernels 9 / 5 / 3, MLP ratio 4 with tanh-GELU), stage 4 runs pre-norm softmax
attention blocks (PVT's, MLP ratio 4) over a class token plus the stage tokens. The ``*_norm`` variants use
SOFT-Norm (D^-1/2 pinv(B) D^-1/2), the published choice for dense prediction.

Differences from the published definition: stochastic depth (``DropPath``) in the post-norm blocks where the
published code applies element dropout at the drop-path rate; any input size (the conv embeds give
ceil(H / 2^k) x ceil(W / 2^k) maps; the bottleneck rule is in :mod:`seg.model.layers.soft`).

Every position table is stored at the 224 x 224 training grid (``pos_embed4`` with the class-token entry
first) and resized bilinearly to the current grid, so the models take any input of at least 32 x 32.

Features: ``features_only=True`` gives 4 NCHW maps at strides 4/8/16/32, each through a new per-stage
LayerNorm ``norm1..norm4`` (built for feature models only, not in the ImageNet checkpoints; they keep their
initial values on load); the stage-4 map leaves out the class token. The classifier is the published one:
final ``norm``, class token (``global_pool='token'``), ``head``; like timm's ViTs, :meth:`SOFT.forward_features`
returns tokens (``output_fmt='NLC'``): the class token, then the 7 x 7 stage-4 grid at 224 x 224. Parameter
counts with the 1000-class head: Tiny 13.07M, Small 38.86M, Medium 45.81M (the published README lists
SOFT-Small as 24M, but its model definition builds 38.86M; this follows the definition).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from typing import Literal

import torch
from timm.layers import trunc_normal_
from timm.models import register_model
from torch import Tensor, nn

from seg.model.backbones._blocks import Block
from seg.model.backbones._registry import build_encoder, imagenet_cfgs, init_transformer_weights
from seg.model.backbones._staged import AttentionFactory, StagedEncoder, stage_factories
from seg.model.backbones._weights import adapt_state_dict, unwrap_checkpoint
from seg.model.layers import SpatialReductionAttention, resize_token_grid
from seg.model.layers.soft import NEWTON_ITERS, SoftAttention

__all__ = ["SOFT", "checkpoint_filter_fn"]

Size = tuple[int, int]
LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)
STEM_WIDTH = 32

SoftBlock = Block  # the name FSDP wrap policies use (configs/trainer/fsdp.yaml): the shared block class


class ConvEmbed(nn.Module):
    """3x3 stride-2 conv + BN + ReLU (``stem=True``: preceded by 3x3 s2 and 3x3 s1 convs of 32 channels)."""

    def __init__(self, in_chans: int, embed_dim: int, stem: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if stem:
            for c_in, stride in ((in_chans, 2), (STEM_WIDTH, 1)):
                layers += [nn.Conv2d(c_in, STEM_WIDTH, 3, stride, 1), nn.BatchNorm2d(STEM_WIDTH), nn.ReLU()]
            in_chans = STEM_WIDTH
        layers += [nn.Conv2d(in_chans, embed_dim, 3, 2, 1), nn.BatchNorm2d(embed_dim), nn.ReLU()]
        self.proj = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Size]:
        """(B, C_in, H, W) -> tokens (B, N, C) and their grid (H', W'), each side ceil-halved per stride 2."""
        x = self.proj(x)
        size = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), size  # (B, H'*W', C)


class SOFT(StagedEncoder):
    """SOFT / SOFT-Norm backbone with a class-token classifier.

    Args:
        img_size: training resolution; fixes the grids the position tables are stored at.
        in_chans: input channels.
        num_classes: classifier outputs (0: no classifier).
        normalize: SOFT-Norm in stages 1-3.
        embed_dims: channels per stage.
        num_heads: heads per stage (head dim 32 in the published models).
        depths: blocks per stage.
        sr_ratios: bottleneck reduction of the SOFT stages 1-3.
        kernel_sizes: DWConv kernels of the SOFT stages 1-3.
        mlp_ratio: MLP expansion of every block.
        landmarks: bottleneck tokens by ``'conv'`` (published) or ``'pool'`` (average pooling).
        newton_iters: Newton-Raphson iterations of the inverse.
        drop_rate: dropout after the position tables and the attention / MLP projections.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        attn_layers: one attention factory per stage (:data:`~seg.model.backbones._staged.AttentionFactory`, called
            with the stage's reduction, no shift), replacing SOFT (stages 1-3) and softmax (stage 4) attention.
        attn_backend: ``auto`` / ``reference`` / ``cpu`` / ``triton`` fast paths (see :mod:`seg.kernels`).
        global_pool: ``token`` (class token), ``avg`` (mean of the stage-4 grid tokens) or ``''`` (no pooling).
        feature_norms: build the per-stage output norms ``norm1..4`` (``features_only=True`` sets it).
    """

    output_fmt = "NLC"
    num_prefix_tokens = 1
    _stage_parts = ("patch_embed", "pos_embed", "block")  # as published; the output norms are the base's

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        normalize: bool = False,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (2, 4, 10, 16),
        depths: Sequence[int] = (1, 2, 3, 2),
        sr_ratios: Sequence[int] = (8, 4, 2),
        kernel_sizes: Sequence[int] = (9, 5, 3),
        mlp_ratio: float = 4.0,
        landmarks: Literal["conv", "pool"] = "conv",
        newton_iters: int = NEWTON_ITERS,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_layers: Sequence[AttentionFactory] | None = None,
        attn_backend: str = "auto",
        global_pool: str = "token",
        feature_norms: bool = False,
    ) -> None:
        super().__init__(feature_norms)
        if attn_layers is not None:
            attn_layers = stage_factories("", {}, attn_layers)
        if len(embed_dims) != 4 or len(num_heads) != 4 or len(depths) != 4:
            raise ValueError("embed_dims, num_heads and depths need one entry per stage (4)")
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = embed_dims[-1]
        total = sum(depths)
        dpr = [drop_path_rate * j / max(total - 1, 1) for j in range(total)]  # python floats: meta-safe
        self.pos_drop = nn.Dropout(drop_rate)
        for i in range(4):
            stride = 4 * 2**i
            c_in = in_chans if i == 0 else embed_dims[i - 1]
            self.add_module(f"patch_embed{i + 1}", ConvEmbed(c_in, embed_dims[i], stem=i == 0))
            n_pos = (img_size // stride) ** 2 + (1 if i == 3 else 0)  # stage 4: class-token entry first
            self.register_parameter(f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, n_pos, embed_dims[i])))
            drops = dpr[sum(depths[:i]):sum(depths[:i + 1])]
            grid = (img_size // stride, img_size // stride)
            sr = sr_ratios[i] if i < 3 else 1
            if attn_layers is not None:
                attn_layer = partial(attn_layers[i], embed_dims[i], num_heads[i], grid, sr, False)
            elif i < 3:
                attn_layer = partial(SoftAttention, embed_dims[i], num_heads[i], sr, kernel_sizes[i], qkv_bias=True,
                                     landmarks=landmarks, normalize=normalize, newton_iters=newton_iters,
                                     proj_drop=drop_rate)
            else:
                attn_layer = partial(SpatialReductionAttention, embed_dims[i], num_heads[i], qkv_bias=True,
                                     proj_drop=drop_rate)
            soft = dict(norm_layer=nn.LayerNorm, act_layer=partial(nn.GELU, approximate="tanh"), post_norm=True)
            blocks = [Block(embed_dims[i], mlp_ratio, attn_layer, drop=drop_rate, drop_path=p,
                            **(soft if i < 3 else dict(norm_layer=LayerNorm6))) for p in drops]
            self.add_module(f"block{i + 1}", nn.ModuleList(blocks))
            self._add_stage(i, embed_dims[i], stride, f"block{i + 1}", norm=(f"norm{i + 1}", LayerNorm6(embed_dims[i])))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[3]))
        self.norm = LayerNorm6(embed_dims[3])
        self.reset_classifier(num_classes, global_pool)
        self._num_stages = 4
        for i in range(4):
            trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_transformer_weights)
        self.set_attn_backend(attn_backend)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"pos_embed{i + 1}" for i in range(self._num_stages)} | {"cls_token"}

    def _stage(
        self, i: int, state: tuple[Tensor, Tensor | None], feature: bool
    ) -> tuple[tuple[Tensor, Tensor], Tensor | None]:
        """Stage i on (NCHW map, _): ((trunk map for the next stage, the stage's tokens, class token first in
        stage 4), feature map: the trunk map)."""
        x = state[0]
        B = x.shape[0]
        x, size = self._part(i, "patch_embed")(x)  # (B, N, C)
        pos = self._part(i, "pos_embed")
        if i == 3:
            cls = (self.cls_token + pos[:, :1]).expand(B, -1, -1)  # (B, 1, C)
            x = torch.cat([cls, x + resize_token_grid(pos[:, 1:], size)], dim=1)  # (B, 1 + N, C)
        else:
            x = x + resize_token_grid(pos, size)
        tokens = self.run_blocks(self._part(i, "block"), self.pos_drop(x), size)
        grid_tokens = tokens[:, 1:] if i == 3 else tokens
        trunk_map = grid_tokens.transpose(1, 2).reshape(B, -1, *size)  # (B, N, C) -> (B, C, H, W)
        return (trunk_map, tokens), trunk_map if feature else None

    def _begin(self, x: Tensor) -> tuple[Tensor, None]:
        """The image as the first stage's input map (no tokens yet)."""
        return x, None

    def _end(self, state: tuple[Tensor, Tensor], complete: bool) -> Tensor:
        """Stage-4 tokens after the final norm (B, 1 + N, C), class token first; when stopped early, the map."""
        trunk_map, tokens = state
        return self.norm(tokens) if complete else trunk_map

    def _prune(self, max_index: int, take_indices: list[int], prune_norm: bool) -> None:
        """The base's pruning; the class token goes with stage 4."""
        super()._prune(max_index, take_indices, prune_norm)
        if max_index < 3:
            del self.cls_token


# published name pattern -> this model's (block{i}.{j}.att.mha.* and friends of the released files)
_RENAMES = [
    (r"\.att\.mha\.W_q\.", ".attn.q."),
    (r"\.att\.mha\.W_v\.", ".attn.v."),
    (r"\.att\.mha\.attn\.Qlandmark_op\.", ".attn.landmark."),
    (r"\.att\.mha\.attn\.Qnorm_act\.0\.", ".attn.landmark_norm."),
    (r"\.att\.mha\.attn\.conv\.", ".attn.dwc."),
    (r"\.att\.mha\.ff\.", ".attn.proj."),
    (r"\.att\.ff1\.", ".mlp.fc1."),
    (r"\.att\.ff2\.", ".mlp.fc2."),
    (r"\.att\.norm([12])\.", r".norm\1."),
]


def _resize_pos_embed4(name: str, value: Tensor, target: Tensor) -> Tensor | None:
    """Resize the stage-4 table (class-token entry first) to the model's training grid."""
    if name != "pos_embed4" or value.shape == target.shape or value.shape[-1] != target.shape[-1]:
        return None
    side = round((target.shape[1] - 1) ** 0.5)
    return torch.cat([value[:, :1], resize_token_grid(value[:, 1:], (side, side))], dim=1)


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: SOFT) -> dict[str, Tensor]:
    """A published SOFT / SOFT-Norm ImageNet checkpoint (names as released) -> this model's state dict.

    The released files are timm training checkpoints; timm's loader picks ``state_dict_ema`` when present.
    If ``torch.load(..., weights_only=True)`` refuses one (timm checkpoints may pickle the training ``args``),
    re-save its ``state_dict_ema`` alone: ``torch.save({'model': ckpt['state_dict_ema']}, path)``.
    """
    renamed = {}
    for name, value in unwrap_checkpoint(state_dict).items():
        for pattern, repl in _RENAMES:
            name = re.sub(pattern, repl, name)
        renamed[name] = value
    return adapt_state_dict(
        renamed,
        model,
        position_tables=lambda name: name in {"pos_embed1", "pos_embed2", "pos_embed3"},
        converters=(_resize_pos_embed4,),
        fresh=lambda name: name.split(".")[0] in {"norm1", "norm2", "norm3", "norm4"},
    )


def _create(variant: str, pretrained: bool = False, **kwargs) -> SOFT:
    return build_encoder(SOFT, variant, pretrained, checkpoint_filter_fn, **kwargs)


default_cfgs = imagenet_cfgs("patch_embed1.proj.0", (
    "soft_tiny", "soft_small", "soft_medium", "soft_tiny_norm", "soft_small_norm", "soft_medium_norm", "test_soft",
))

_TINY = dict(embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16), depths=(1, 2, 3, 2))
_SMALL = dict(_TINY, depths=(1, 3, 20, 4))
_MEDIUM = dict(embed_dims=(64, 128, 288, 512), num_heads=(2, 4, 9, 16), depths=(1, 3, 29, 5))
_TEST = dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1), mlp_ratio=2.0)


@register_model
def soft_tiny(pretrained: bool = False, **kwargs) -> SOFT:
    return _create("soft_tiny", pretrained, **dict(_TINY, **kwargs))


@register_model
def soft_small(pretrained: bool = False, **kwargs) -> SOFT:
    return _create("soft_small", pretrained, **dict(_SMALL, **kwargs))


@register_model
def soft_medium(pretrained: bool = False, **kwargs) -> SOFT:
    return _create("soft_medium", pretrained, **dict(_MEDIUM, **kwargs))


@register_model
def soft_tiny_norm(pretrained: bool = False, **kwargs) -> SOFT:
    return _create("soft_tiny_norm", pretrained, **dict(_TINY, normalize=True, **kwargs))


@register_model
def soft_small_norm(pretrained: bool = False, **kwargs) -> SOFT:
    return _create("soft_small_norm", pretrained, **dict(_SMALL, normalize=True, **kwargs))


@register_model
def soft_medium_norm(pretrained: bool = False, **kwargs) -> SOFT:
    return _create("soft_medium_norm", pretrained, **dict(_MEDIUM, normalize=True, **kwargs))


@register_model
def test_soft(pretrained: bool = False, **kwargs) -> SOFT:
    """Tiny SOFT-Norm variant (depth 1 per stage, 16-64 channels, head dim 16) for CPU tests."""
    return _create("test_soft", pretrained, **dict(_TEST, normalize=True, **kwargs))
