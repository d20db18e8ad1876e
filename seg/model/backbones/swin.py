"""FLatten-Swin (Han et al., ICCV 2023) as timm encoders for any image size.

Swin Transformer (Liu et al., ICCV 2021) whose stages marked ``L`` in ``attn_type`` run focused linear
attention over the whole stage map (no windows, no shift, no mask; the published models' 56 x 56 "window"
is the whole stage-1 map at 224), while ``S`` stages keep Swin's 7 x 7 shifted-window softmax attention
with relative position bias. ``attn_type='SSSS'`` is the original Swin, the softmax baseline, and loads
Swin ImageNet checkpoints.

Any input of at least 32 x 32: the image is zero-padded to a multiple of the patch size, patch merging
pads odd maps, ``S`` stages pad to a multiple of the window (see :mod:`seg.model.layers.window` for the rule on
maps smaller than a window), and ``L`` stages resize their positional encoding (stored at the 224 x 224
stage grid). Stage i then has ceil(H / 2^(i+2)) x ceil(W / 2^(i+2)) tokens.

Features: ``features_only=True`` gives 4 NCHW maps at strides 4/8/16/32, each through a new output
LayerNorm ``norm0..norm3`` (the names of the Swin segmentation backbone), built for feature models only (the
classifier never uses them); they are not in ImageNet checkpoints and keep their initial values on load. The
classifier is the published one: final ``norm``, mean over the stage-4 tokens (``global_pool='avg'``),
``head``; :meth:`FLattenSwin.forward_features` returns the normalised stage-4 map (B, C, H/32, W/32).
Parameter names equal the published checkpoints'.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import Tensor, nn

from seg.kernels.onednn import Linear
from seg.model.backbones._blocks import Block
from seg.model.backbones._registry import build_encoder, imagenet_cfgs
from seg.model.backbones._staged import AttentionFactory, StagedEncoder, stage_factories
from seg.model.backbones._weights import adapt_state_dict, unwrap_checkpoint
from seg.model.layers import FocusedLinearAttention
from seg.model.layers.window import WindowAttention, resize_bias_table

__all__ = ["FLattenSwin", "checkpoint_filter_fn"]

Size = tuple[int, int]

SwinBlock = Block  # the name FSDP wrap policies use (configs/trainer/fsdp.yaml): the shared block class


class PatchEmbed(nn.Module):
    """Non-overlapping p x p conv embedding + LayerNorm; the image is zero-padded to a multiple of p."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Size]:
        """(B, C_in, H, W) -> tokens (B, N, C) of a ceil(H / p) x ceil(W / p) grid."""
        p = self.patch_size
        H, W = x.shape[2], x.shape[3]
        x = self.proj(F.pad(x, (0, -W % p, 0, -H % p)))  # (B, C, H', W')
        size = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), size  # (B, H'*W', C)


class PatchMerging(nn.Module):
    """2 x 2 neighbours -> 4C LayerNorm -> 2C linear; odd maps are zero-padded at the bottom / right."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, size: Size) -> tuple[Tensor, Size]:
        """(B, N, C) of an H x W grid -> (B, N', 2C) of a ceil(H / 2) x ceil(W / 2) grid."""
        B, N, C = x.shape
        H, W = size
        # pad by 2 * ceil(n / 2) - n (= n % 2), a form symbolic shapes can see is even
        x = F.pad(x.reshape(B, H, W, C), (0, 0, 0, (W + 1) // 2 * 2 - W, 0, (H + 1) // 2 * 2 - H))  # (B, H2, W2, C)
        # Swin's channel order: (even row, even col), (odd, even), (even, odd), (odd, odd)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        size = (x.shape[1], x.shape[2])
        x = x.reshape(B, -1, 4 * C)  # (B, N', 4C)
        return self.reduction(self.norm(x)), size


def swin_attention_letters(
    *,
    drop: float = 0.0,
    attn_drop: float = 0.0,
    focusing_factor: float = 3.0,
    kernel_size: int = 5,
    window_size: int = 7,
    qkv_bias: bool = True,
) -> dict[str, AttentionFactory]:
    """The ``attn_type`` shorthand of the Swin skeleton: ``L`` global focused linear attention over the stage
    map, ``S`` Swin's own (shifted) window softmax attention."""
    return {
        "L": lambda dim, heads, grid, sr, shift: FocusedLinearAttention(
            dim, heads, grid, qkv_bias=qkv_bias, focusing_factor=focusing_factor, kernel_size=kernel_size,
            proj_drop=drop, fused_qkv=True),
        "S": lambda dim, heads, grid, sr, shift: WindowAttention(
            dim, heads, window_size, shift=shift, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop),
    }


class SwinStage(nn.Module):
    """The blocks of one stage (the odd ones with shifted windows) and the patch merging after them."""

    def __init__(
        self,
        dim: int,
        depth: int,
        downsample: bool,
        drop_path: Sequence[float],
        attn_layer: Callable[[bool], nn.Module],
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, mlp_ratio, partial(attn_layer, j % 2 == 1), drop=drop, drop_path=drop_path[j])
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None


class FLattenSwin(StagedEncoder):
    """FLatten-Swin and, with ``attn_type='SSSS'``, the original Swin Transformer.

    Args:
        img_size: training resolution; fixes the grid the ``L`` positional encodings are stored at.
        patch_size: side of the stem's patches.
        in_chans: input channels.
        num_classes: classifier outputs (0: no classifier).
        embed_dim: channels of stage 1 (doubled per stage).
        depths: blocks per stage.
        num_heads: heads per stage.
        window_size: window side of the ``S`` stages.
        mlp_ratio: MLP expansion.
        attn_type: one letter per stage, ``L`` global focused linear or ``S`` shifted-window softmax.
        attn_layers: one attention factory per stage (:data:`~seg.model.backbones._staged.AttentionFactory`, called
            with sr_ratio 1 and the block's shift); overrides ``attn_type`` (which is the shorthand that builds them).
        attn_backend: ``auto`` / ``reference`` / ``cpu`` / ``triton`` fast paths (see :mod:`seg.kernels`).
        qkv_bias: bias in the qkv projections.
        drop_rate: dropout after the patch embedding, attention and MLP projections.
        attn_drop_rate: dropout on the softmax attention weights.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        focusing_factor: power p of the focusing function.
        kernel_size: kernel of the rank-restoring depthwise conv.
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
        attn_type: str = "LLSS",
        attn_layers: Sequence[AttentionFactory] | None = None,
        attn_backend: str = "auto",
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        focusing_factor: float = 3.0,
        kernel_size: int = 5,
        global_pool: str = "avg",
        feature_norms: bool = False,
    ) -> None:
        super().__init__(feature_norms)
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self._num_stages = len(depths)
        dims = [embed_dim * 2**i for i in range(self._num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.pos_drop = nn.Dropout(drop_rate)
        n_blocks = sum(depths)  # python floats, so the model also builds on the meta device
        dpr = [drop_path_rate * j / max(n_blocks - 1, 1) for j in range(n_blocks)]
        letters = swin_attention_letters(qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                                         focusing_factor=focusing_factor, kernel_size=kernel_size,
                                         window_size=window_size)
        factories = stage_factories(attn_type, letters, attn_layers, num_stages=self._num_stages)
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            stride = patch_size * 2**i
            grid = (img_size[0] // stride, img_size[1] // stride)
            self.layers.append(SwinStage(
                dims[i], depth, downsample=i < self._num_stages - 1,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                attn_layer=partial(factories[i], dims[i], num_heads[i], grid, 1), mlp_ratio=mlp_ratio, drop=drop_rate,
            ))
            self._add_stage(i, dims[i], stride, f"layers.{i}", norm=(f"norm{i}", nn.LayerNorm(dims[i])))
        self.norm = nn.LayerNorm(self.num_features)
        self._finish(num_classes, global_pool, attn_backend)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full names of the position tables and temperatures (the recipe puts no weight decay on them)."""
        keys = ("relative_position_bias_table", "positional_encoding", "attn.scale")
        return {name for name, _ in self.named_parameters() if name.endswith(keys)}


def _resize_bias_tables(name: str, value: Tensor, target: Tensor) -> Tensor | None:
    """Bicubic resize of a relative position bias table trained with another window size."""
    if not name.endswith("relative_position_bias_table") or value.shape == target.shape:
        return None
    if value.shape[1] != target.shape[1]:
        return None  # another head count: reported as a shape mismatch
    return resize_bias_table(value, math.isqrt(target.shape[0]))


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: FLattenSwin) -> dict[str, Tensor]:
    """A published FLatten-Swin or Swin checkpoint (names as released) -> this model's state dict.

    The ``attn_mask`` and ``relative_position_index`` buffers of the released files are rebuilt for the
    current size, never loaded; ``positional_encoding`` and ``relative_position_bias_table`` are resized
    when the model's training grid or window differs; the output norms ``norm0..3`` keep their init.
    """
    state_dict = unwrap_checkpoint(state_dict)
    buffers = {name for name in state_dict if name.endswith(("attn_mask", "relative_position_index"))}
    return adapt_state_dict(
        state_dict,
        model,
        position_tables=lambda name: name.endswith("positional_encoding"),
        dropped=buffers,
        fresh=lambda name: name.split(".")[0] in {f"norm{i}" for i in range(4)},
        converters=(_resize_bias_tables,),
    )


def _create(variant: str, pretrained: bool = False, **kwargs) -> FLattenSwin:
    return build_encoder(FLattenSwin, variant, pretrained, checkpoint_filter_fn, **kwargs)


default_cfgs = imagenet_cfgs("patch_embed.proj", (
    "flatten_swin_tiny", "flatten_swin_small", "flatten_swin_base", "test_flatten_swin",
))

_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_TEST = dict(embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), mlp_ratio=2.0)


@register_model
def flatten_swin_tiny(pretrained: bool = False, **kwargs) -> FLattenSwin:
    return _create("flatten_swin_tiny", pretrained, **dict(_TINY, **kwargs))


@register_model
def flatten_swin_small(pretrained: bool = False, **kwargs) -> FLattenSwin:
    return _create("flatten_swin_small", pretrained, **dict(_SMALL, **kwargs))


@register_model
def flatten_swin_base(pretrained: bool = False, **kwargs) -> FLattenSwin:
    return _create("flatten_swin_base", pretrained, **dict(_BASE, **kwargs))


@register_model
def test_flatten_swin(pretrained: bool = False, **kwargs) -> FLattenSwin:
    """Tiny variant (16-128 channels, depths 1-1-2-2 so the S stages have a shifted block) for CPU tests."""
    return _create("test_flatten_swin", pretrained, **dict(_TEST, **kwargs))
