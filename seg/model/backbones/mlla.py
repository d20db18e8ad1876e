"""MLLA encoders (Han et al., "Demystify Mamba in Vision: A Linear Attention Perspective", NeurIPS 2024,
arXiv 2405.16605) for timm.

A four-stage pyramid: a conv stem (3x3 s2 -> residual pair of 3x3 convs -> 3x3 s2 to 4C -> 1x1 to C, BatchNorm,
no biases) to stride 4, MLLA blocks (:class:`seg.model.layers.mlla.MllaBlock`: linear attention with RoPE inside a
Mamba-like gated block, head dim 32), and conv patch merging between stages (1x1 to 8C + ReLU, depthwise 3x3 s2
+ ReLU, 1x1 to 2C + BatchNorm, biased).

Any input of at least 32 x 32, with the published segmentation backbone's padding: the image is zero-padded on
the right / bottom to a multiple of 4, and an odd map is zero-padded at its end before patch merging's first
(biased) 1x1 conv, so the padded pixels enter the depthwise conv as ReLU(bias). RoPE is computed from the live
grid, so stage i has ceil(H / 2^(i+2)) x ceil(W / 2^(i+2)) tokens and nothing is tied to 224 x 224.

Features: ``features_only=True`` gives 4 NCHW maps at strides 4/8/16/32, each through a per-stage LayerNorm
``norm0..norm3`` (the names of the published segmentation backbone; not in the ImageNet checkpoints, they keep
their initial values on load). The classifier is the published one: final ``norm``, token mean, ``head``.
Parameter names equal the published checkpoints' (whose ``rope.rotations`` buffers are ignored on load).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import register_model
from torch import Tensor, nn

from seg.kernels.onednn import Linear
from seg.model.backbones._registry import build_encoder, imagenet_cfgs
from seg.model.backbones._staged import AttentionFactory, StagedEncoder, stage_factories
from seg.model.backbones._weights import adapt_state_dict, unwrap_checkpoint
from seg.model.layers.mlla import MllaAttention, conv_tokens
from seg.model.layers.mlp import Mlp

__all__ = ["MLLA", "checkpoint_filter_fn"]

Size = tuple[int, int]
PATCH = 4


class ConvLayer(nn.Module):
    """Conv -> optional BatchNorm -> optional ReLU (the published ``ConvLayer``'s names ``conv``, ``norm``)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
        norm: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(c_out) if norm else None
        self.act = nn.ReLU() if act else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.act(x) if self.act is not None else x


class Stem(nn.Module):
    """Image -> stride-4 tokens: 3x3 s2 (C/2), residual [3x3, 3x3], 3x3 s2 (4C), 1x1 (C); BN, no biases."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        half = embed_dim // 2
        self.conv1 = ConvLayer(in_chans, half, 3, stride=2, bias=False)
        self.conv2 = nn.Sequential(ConvLayer(half, half, 3, bias=False),
                                   ConvLayer(half, half, 3, bias=False, act=False))
        self.conv3 = nn.Sequential(ConvLayer(half, embed_dim * 4, 3, stride=2, bias=False),
                                   ConvLayer(embed_dim * 4, embed_dim, 1, bias=False, act=False))

    def forward(self, x: Tensor) -> tuple[Tensor, Size]:
        """(B, C_in, H, W) -> tokens (B, N, C) of a ceil(H / 4) x ceil(W / 4) grid (image zero-padded to /4)."""
        H, W = x.shape[2], x.shape[3]
        x = self.conv1(F.pad(x, (0, -W % PATCH, 0, -H % PATCH)))
        x = self.conv3(self.conv2(x) + x)  # (B, C, H/4, W/4)
        size = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), size  # (B, N, C)


class PatchMerging(nn.Module):
    """(B, N, C) of an H x W grid -> (B, N', 2C) of ceil(H / 2) x ceil(W / 2): 1x1 to 8C + ReLU, depthwise 3x3 s2
    + ReLU, 1x1 to 2C + BN (all biased); an odd map is zero-padded at its end first."""

    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(2 * dim * ratio)
        self.conv = nn.Sequential(
            ConvLayer(dim, hidden, 1, norm=False),
            ConvLayer(hidden, hidden, 3, stride=2, groups=hidden, norm=False),
            ConvLayer(hidden, 2 * dim, 1, act=False),
        )

    def forward(self, x: Tensor, size: Size) -> tuple[Tensor, Size]:
        B, N, C = x.shape
        H, W = size
        # pad by 2 * ceil(n / 2) - n (= n % 2), a form symbolic shapes can see is even
        x = F.pad(x.reshape(B, H, W, C), (0, 0, 0, (W + 1) // 2 * 2 - W, 0, (H + 1) // 2 * 2 - H))  # (B, H2, W2, C)
        x = self.conv(x.permute(0, 3, 1, 2))  # (B, 2C, H2/2, W2/2)
        size = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), size  # (B, N', 2C)


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
        attn_layer: builds the attention, a module taking ((B, N, C), (H, W)); None:
            :class:`~seg.model.layers.mlla.MllaAttention`.
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
        self.in_proj = Linear(dim, dim)
        self.act_proj = Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.act = nn.SiLU()
        self.attn = attn_layer() if attn_layer is not None else MllaAttention(dim, num_heads, qkv_bias)
        self.out_proj = Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor, size: Size) -> Tensor:
        """(B, N, C) tokens of an H x W grid -> (B, N, C)."""
        x = x + conv_tokens(self.cpe1, x, size)
        u = self.norm1(x)
        gate = self.act(self.act_proj(u))
        t = self.act(conv_tokens(self.dwc, self.in_proj(u), size))
        x = x + self.drop_path(self.out_proj(self.attn(t, size) * gate))
        x = x + conv_tokens(self.cpe2, x, size)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MllaStage(nn.Module):
    """The blocks of one stage and the patch merging after them."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        downsample: bool,
        drop_path: Sequence[float],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_layer: Callable[[], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            MllaBlock(dim, num_heads, mlp_ratio, qkv_bias, drop, drop_path[j], attn_layer) for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None


class MLLA(StagedEncoder):
    """MLLA backbone with the published classifier.

    Args:
        in_chans: input channels.
        num_classes: classifier outputs (0: no classifier).
        embed_dim: channels of stage 1 (doubled per stage).
        depths: blocks per stage.
        num_heads: heads per stage (head dim 32 in the published models).
        mlp_ratio: MLP expansion.
        qkv_bias: bias in the attention's ``qk`` projection.
        drop_rate: dropout after the stem and in the MLPs.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        img_size: training resolution; only gives replacement attentions (``attn_layers``) their stage grid.
        attn_layers: one attention factory per stage (:data:`~seg.model.backbones._staged.AttentionFactory`, called
            with sr_ratio 1, no shift) of modules taking ((B, N, C), (H, W)); replaces MLLA's linear attention
            inside the same blocks (None: MLLA attention everywhere).
        attn_backend: ``auto`` / ``reference`` / ``cpu`` / ``triton`` fast paths (see :mod:`seg.kernels`).
        global_pool: ``avg`` (mean of the stage-4 map) or ``''`` (no pooling).
        feature_norms: build the per-stage output norms ``norm0..3`` (``features_only=True`` sets it).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 64,
        depths: Sequence[int] = (2, 4, 8, 4),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        img_size: int = 224,
        attn_layers: Sequence[AttentionFactory] | None = None,
        attn_backend: str = "auto",
        global_pool: str = "avg",
        feature_norms: bool = False,
    ) -> None:
        super().__init__(feature_norms)
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} need one entry per stage")
        if attn_layers is not None:
            attn_layers = stage_factories("", {}, attn_layers, num_stages=len(depths))
        self.num_classes = num_classes
        self._num_stages = len(depths)
        dims = [embed_dim * 2**i for i in range(self._num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.patch_embed = Stem(in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        n_blocks = sum(depths)  # python floats, so the model also builds on the meta device
        dpr = [drop_path_rate * j / max(n_blocks - 1, 1) for j in range(n_blocks)]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.layers.append(MllaStage(
                dims[i], depth, num_heads[i], downsample=i < self._num_stages - 1,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                drop=drop_rate, attn_layer=None if attn_layers is None else partial(
                    attn_layers[i], dims[i], num_heads[i], (img_size // (PATCH * 2**i),) * 2, 1, False),
            ))
            self._add_stage(i, dims[i], PATCH * 2**i, f"layers.{i}", norm=(f"norm{i}", nn.LayerNorm(dims[i])))
        self.norm = nn.LayerNorm(self.num_features)
        self._finish(num_classes, global_pool, attn_backend)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """MLLA has no position tables (RoPE is computed, not learned)."""
        return set()


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: MLLA) -> dict[str, Tensor]:
    """A published MLLA checkpoint (classification, names as released) -> this model's state dict.

    Ignored: the ``attn.rope.rotations`` buffers (angles of the 224 x 224 grid; RoPE is recomputed for the
    live grid). The output norms ``norm0..3`` of a feature model load when the file has them (a segmentation
    backbone's; a classifier, which has none, ignores them) and keep their init otherwise. Anything else
    missing, unexpected or mis-shaped raises, listing the names.
    """
    state_dict = unwrap_checkpoint(state_dict)
    norms, target = {f"norm{i}" for i in range(4)}, model.state_dict()
    unused = {name for name in state_dict if name.split(".")[0] in norms and name not in target}  # classifier
    return adapt_state_dict(
        state_dict,
        model,
        position_tables=lambda name: False,
        dropped={name for name in state_dict if name.endswith("attn.rope.rotations")} | unused,
        fresh=lambda name: name.split(".")[0] in norms,
    )


def _create(variant: str, pretrained: bool = False, **kwargs) -> MLLA:
    return build_encoder(MLLA, variant, pretrained, checkpoint_filter_fn, **kwargs)


default_cfgs = imagenet_cfgs("patch_embed.conv1.conv", ("mlla_tiny", "mlla_small", "mlla_base", "test_mlla"))

_ARCHS = {
    "mlla_tiny": dict(embed_dim=64, depths=(2, 4, 8, 4), num_heads=(2, 4, 8, 16)),
    "mlla_small": dict(embed_dim=64, depths=(3, 6, 21, 6), num_heads=(2, 4, 8, 16)),
    "mlla_base": dict(embed_dim=96, depths=(3, 6, 21, 6), num_heads=(3, 6, 12, 24)),
    "test_mlla": dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), mlp_ratio=2.0),
}


@register_model
def mlla_tiny(pretrained: bool = False, **kwargs) -> MLLA:
    return _create("mlla_tiny", pretrained, **dict(_ARCHS["mlla_tiny"], **kwargs))


@register_model
def mlla_small(pretrained: bool = False, **kwargs) -> MLLA:
    return _create("mlla_small", pretrained, **dict(_ARCHS["mlla_small"], **kwargs))


@register_model
def mlla_base(pretrained: bool = False, **kwargs) -> MLLA:
    return _create("mlla_base", pretrained, **dict(_ARCHS["mlla_base"], **kwargs))


@register_model
def test_mlla(pretrained: bool = False, **kwargs) -> MLLA:
    """Tiny variant (16-128 channels, depths 1-1-2-1, head dims 16 and 32) for CPU tests."""
    return _create("test_mlla", pretrained, **dict(_ARCHS["test_mlla"], **kwargs))
