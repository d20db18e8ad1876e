"""FLatten-Swin (Han et al., ICCV 2023) as timm encoders for any image size.

Swin Transformer (Liu et al., ICCV 2021) whose stages marked ``L`` in ``attn_type`` run focused linear
attention over the whole stage map (no windows, no shift, no mask; the published models' 56 x 56 "window"
is the whole stage-1 map at 224), while ``S`` stages keep Swin's 7 x 7 shifted-window softmax attention
with relative position bias. ``attn_type='SSSS'`` is the original Swin, the softmax baseline, and loads
Swin ImageNet checkpoints.

Any input of at least 32 x 32: the image is zero-padded to a multiple of the patch size, patch merging
pads odd maps, ``S`` stages pad to a multiple of the window (see :mod:`seg.layers.window` for the rule on
maps smaller than a window), and ``L`` stages resize their positional encoding (stored at the 224 x 224
stage grid). Stage i then has ceil(H / 2^(i+2)) x ceil(W / 2^(i+2)) tokens.

Features: ``features_only=True`` gives 4 NCHW maps at strides 4/8/16/32, each through a new output
LayerNorm ``norm0..norm3`` (the names of the Swin segmentation backbone); they are not in ImageNet
checkpoints and keep their initial values on load. The classifier is the published one: final ``norm``,
mean over the stage-4 tokens, ``head``. Parameter names equal the published checkpoints'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from seg.backbones._registry import ClassifierBackbone, build_encoder, imagenet_cfg, init_transformer_weights
from seg.backbones._weights import adapt_state_dict, unwrap_checkpoint
from seg.layers import FocusedLinearAttention
from seg.layers.linear import Linear
from seg.layers.mlp import Mlp
from seg.layers.window import WindowAttention, resize_bias_table

__all__ = ["FLattenSwin", "checkpoint_filter_fn"]

Size = tuple[int, int]


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
        x = F.pad(x.reshape(B, H, W, C), (0, 0, 0, W % 2, 0, H % 2))  # (B, H2, W2, C), H2 and W2 even
        # Swin's channel order: (even row, even col), (odd, even), (even, odd), (odd, odd)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        size = (x.shape[1], x.shape[2])
        x = x.reshape(B, -1, 4 * C)  # (B, N', 4C)
        return self.reduction(self.norm(x)), size


class SwinBlock(nn.Module):
    """Pre-norm block: global focused linear (``L``) or (shifted) window softmax attention (``S``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attn_type: str,
        grid_size: Size,
        window_size: int = 7,
        shift: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        focusing_factor: float = 3.0,
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn: nn.Module
        if attn_type == "L":
            self.attn = FocusedLinearAttention(
                dim, num_heads, grid_size, qkv_bias=qkv_bias, focusing_factor=focusing_factor,
                kernel_size=kernel_size, proj_drop=drop, fused_qkv=True,
            )
        elif attn_type == "S":
            self.attn = WindowAttention(dim, num_heads, window_size, shift=shift, qkv_bias=qkv_bias,
                                        attn_drop=attn_drop, proj_drop=drop)
        else:
            raise ValueError(f"attention type {attn_type!r} is not 'L' (focused linear) or 'S' (softmax)")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor, size: Size) -> Tensor:
        """(B, N, C) tokens of an H x W grid -> (B, N, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """The blocks of one stage (shifted windows in odd ``S`` blocks) and the patch merging after them."""

    def __init__(
        self, dim: int, depth: int, downsample: bool, drop_path: Sequence[float], **block_kwargs
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, shift=j % 2 == 1, drop_path=drop_path[j], **block_kwargs) for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None
        self.grad_checkpointing = False

    def forward(self, x: Tensor, size: Size) -> Tensor:
        """Run the blocks on (B, N, C) tokens of an H x W grid (patch merging is applied by the model)."""
        for block in self.blocks:
            if self.grad_checkpointing and x.requires_grad:
                x = checkpoint(block, x, size, use_reentrant=False)
            else:
                x = block(x, size)
        return x


class FLattenSwin(ClassifierBackbone):
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
        qkv_bias: bias in the qkv projections.
        drop_rate: dropout after the patch embedding, attention and MLP projections.
        attn_drop_rate: dropout on the softmax attention weights.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        focusing_factor: power p of the focusing function.
        kernel_size: kernel of the rank-restoring depthwise conv.
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
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        focusing_factor: float = 3.0,
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        if len(attn_type) != len(depths) or set(attn_type) - {"L", "S"}:
            raise ValueError(f"attn_type {attn_type!r} must be {len(depths)} letters of L (focused linear) / "
                             "S (softmax)")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self._num_stages = len(depths)
        dims = [embed_dim * 2**i for i in range(self._num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.pos_drop = nn.Dropout(drop_rate)
        n_blocks = sum(depths)  # python floats, so the model also builds on the meta device
        dpr = [drop_path_rate * j / max(n_blocks - 1, 1) for j in range(n_blocks)]
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i, depth in enumerate(depths):
            stride = patch_size * 2**i
            self.layers.append(SwinStage(
                dims[i], depth, downsample=i < self._num_stages - 1,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], num_heads=num_heads[i],
                attn_type=attn_type[i], grid_size=(img_size[0] // stride, img_size[1] // stride),
                window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                attn_drop=attn_drop_rate, focusing_factor=focusing_factor, kernel_size=kernel_size,
            ))
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))
            self.feature_info.append(dict(num_chs=dims[i], reduction=stride, module=f"norm{i}"))
        self.norm = nn.LayerNorm(self.num_features)
        self.reset_classifier(num_classes)
        self.apply(init_transformer_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full names of the position tables and temperatures (the recipe puts no weight decay on them)."""
        keys = ("relative_position_bias_table", "positional_encoding", "attn.scale")
        return {name for name, _ in self.named_parameters() if name.endswith(keys)}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def _stage(self, i: int, x: Tensor, size: Size) -> tuple[Tensor, Tensor, Size]:
        """Stage i on (B, N, C) tokens: (stage output, merged tokens for the next stage, their grid)."""
        stage = self.layers[i]
        out = stage(x, size)
        if stage.downsample is None:
            return out, out, size
        merged, next_size = stage.downsample(out, size)
        return out, merged, next_size

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Per-stage feature maps, each through its output LayerNorm ``norm{i}`` (timm's feature API)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be NCHW or NHWC, got {output_fmt}")
        take_indices, max_index = feature_take_indices(self._num_stages, indices)
        B = x.shape[0]
        x, size = self.patch_embed(x)  # (B, N, C)
        x = self.pos_drop(x)
        intermediates = []
        last = max_index if stop_early or intermediates_only else self._num_stages - 1
        for i in range(last + 1):
            out, x, next_size = self._stage(i, x, size)
            if i in take_indices:
                feature = getattr(self, f"norm{i}")(out).reshape(B, *size, -1)  # (B, H, W, C)
                intermediates.append(feature.permute(0, 3, 1, 2) if output_fmt == "NCHW" else feature)
            size = next_size
        if intermediates_only:
            return intermediates
        if last < self._num_stages - 1:  # stopped early: the merged tokens, no final norm
            return x.transpose(1, 2).reshape(B, -1, *size), intermediates
        return self._final_map(x, size), intermediates

    def _final_map(self, x: Tensor, size: Size) -> Tensor:
        """Last-stage tokens (B, N, C) -> final ``norm`` -> (B, C, H, W)."""
        return self.norm(x).transpose(1, 2).reshape(x.shape[0], -1, *size)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last requested feature, unused output norms, optionally norm / head."""
        take_indices, max_index = feature_take_indices(self._num_stages, indices)
        self.layers = self.layers[: max_index + 1]
        self.layers[-1].downsample = None  # its output would feed no stage
        for i in range(self._num_stages):
            if i not in take_indices and hasattr(self, f"norm{i}"):
                delattr(self, f"norm{i}")
        if prune_norm or max_index < self._num_stages - 1:  # the final norm only fits the last stage
            self.norm = nn.Identity()
        self._num_stages = max_index + 1
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """Final-norm stage-4 map (B, C, H/32, W/32)."""
        x, size = self.patch_embed(x)  # (B, N, C)
        x = self.pos_drop(x)
        for i in range(self._num_stages):
            _, x, size = self._stage(i, x, size)
        return self._final_map(x, size)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(2, 3))  # average pool over the stage-4 tokens
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


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


def _cfg(**kwargs) -> dict:
    return imagenet_cfg("patch_embed.proj", **kwargs)


default_cfgs = generate_default_cfgs({
    name: _cfg()
    for name in ("flatten_swin_tiny", "flatten_swin_small", "flatten_swin_base", "test_flatten_swin")
})

_TEST = dict(embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), mlp_ratio=2.0)


@register_model
def flatten_swin_tiny(pretrained: bool = False, **kwargs) -> FLattenSwin:
    arch = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create("flatten_swin_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def flatten_swin_small(pretrained: bool = False, **kwargs) -> FLattenSwin:
    arch = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create("flatten_swin_small", pretrained, **dict(arch, **kwargs))


@register_model
def flatten_swin_base(pretrained: bool = False, **kwargs) -> FLattenSwin:
    arch = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create("flatten_swin_base", pretrained, **dict(arch, **kwargs))


@register_model
def test_flatten_swin(pretrained: bool = False, **kwargs) -> FLattenSwin:
    """Tiny variant (16-128 channels, depths 1-1-2-2 so the S stages have a shifted block) for CPU tests."""
    return _create("test_flatten_swin", pretrained, **dict(_TEST, **kwargs))
