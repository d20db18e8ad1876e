"""PolaFormer encoders (Meng et al., "PolaFormer: Polarity-aware Linear Attention for Vision Transformers",
ICLR 2025, arXiv 2501.15061) for timm: the FLatten-PVT and FLatten-Swin skeletons with polarity-aware linear
attention (:class:`seg.model.layers.PolaLinearAttention`) in the stages marked ``L``.

- ``pola_pvt_*``: PVT v1 (:class:`~seg.model.backbones.pvt.FLattenPVT`), ``attn_type='LLLL'``, global keys in every
  stage (``la_sr_ratios`` 1, 1, 1, 1: the released models; the published builders default to 8, 4, 2, 1, which
  the released configuration overrides), power range ``alpha`` 4, DWC kernel 5. ``S`` stages are PVT's softmax
  spatial-reduction attention, ``G`` SOFT's.
- ``pola_swin_*``: Swin (:class:`~seg.model.backbones.swin.FLattenSwin`), ``attn_type='LLSS'``: ``L`` stages attend
  over the whole stage map (the published 56 x 56 "window" is the whole stage-1 map at 224), ``S`` stages are
  7 x 7 shifted-window softmax attention. The published Swin runs at 224 x 224 only; here, as for FLatten-Swin,
  the positional encodings are resized and the windows padded, so any input of at least 32 x 32 works.

Everything else is the skeleton's: the 224-grid tables resized bilinearly, the per-stage output norms of
``features_only`` models, the classifiers (PVT: mean of the stage-4 tokens, the published unused ``norm``
dropped on load; Swin: final ``norm``, mean, ``head``), the checkpoint filters. Parameter names equal the
published checkpoints'. Parameter counts with the 1000-class head: PVT Tiny 12.92M, Small 23.16M, Medium 39.97M,
Large 54.37M; Swin Tiny 29.29M, Small 50.60M, Base 89.14M.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from timm.models import generate_default_cfgs, register_model
from torch import nn

from seg.model.backbones import pvt, swin
from seg.model.backbones._registry import build_encoder, imagenet_cfg
from seg.model.backbones._staged import AttentionFactory, stage_factories
from seg.model.backbones.pvt import FLattenPVT, pvt_attention_letters
from seg.model.backbones.swin import FLattenSwin, swin_attention_letters
from seg.model.layers.pola import PolaLinearAttention

__all__ = ["PolaPVT", "PolaSwin"]


class PolaPVT(FLattenPVT):
    """PolaFormer-PVT: PVT v1 with polarity-aware linear attention in the ``L`` stages.

    Args:
        attn_type: one letter per stage, ``L`` polarity-aware linear, ``S`` softmax spatial reduction, ``G`` SOFT.
        la_sr_ratios: key / value reduction of the ``L`` stages (1 in the released models).
        alpha: range of the learned power, p in (1, 1 + alpha).
        kernel_size: kernel of the rank-restoring depthwise conv.
        qkv_bias: bias in the projections.
        drop_rate: dropout after the attention and MLP projections.
        attn_layers: one attention factory per stage (overrides ``attn_type``).
        **kwargs: the skeleton's other arguments (:class:`~seg.model.backbones.pvt.FLattenPVT`, ``version=1``).
    """

    def __init__(
        self,
        attn_type: str = "LLLL",
        la_sr_ratios: Sequence[int] = (1, 1, 1, 1),
        alpha: float = 4.0,
        kernel_size: int = 5,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_layers: Sequence[AttentionFactory] | None = None,
        **kwargs,
    ) -> None:
        letters = [dict(pvt_attention_letters(qkv_bias=qkv_bias, drop=drop_rate), L=partial(
            _pola_pvt_layer, qkv_bias=qkv_bias, la_sr_ratio=sr, alpha=alpha, kernel_size=kernel_size, drop=drop_rate))
            for sr in la_sr_ratios]
        attn_layers = stage_factories(attn_type, letters, attn_layers, num_stages=len(letters))
        super().__init__(attn_type=attn_type, la_sr_ratios=la_sr_ratios, kernel_size=kernel_size, qkv_bias=qkv_bias,
                         drop_rate=drop_rate, attn_layers=attn_layers, version=1, **kwargs)


def _pola_pvt_layer(
    dim: int, heads: int, grid: tuple[int, int], sr: int, shift: bool, *, qkv_bias: bool, la_sr_ratio: int,
    alpha: float, kernel_size: int, drop: float,
) -> nn.Module:
    """The ``L`` factory of the PVT skeleton; ``sr`` is the softmax stages' reduction, unused here."""
    return PolaLinearAttention(dim, heads, grid, qkv_bias=qkv_bias, sr_ratio=la_sr_ratio, alpha=alpha,
                               kernel_size=kernel_size, proj_drop=drop)


class PolaSwin(FLattenSwin):
    """PolaFormer-Swin: Swin with global polarity-aware linear attention in the ``L`` stages.

    Args:
        attn_type: one letter per stage, ``L`` global polarity-aware linear, ``S`` shifted-window softmax.
        depths: blocks per stage.
        alpha: range of the learned power, p in (1, 1 + alpha).
        kernel_size: kernel of the rank-restoring depthwise conv.
        qkv_bias: bias in the projections.
        window_size: window side of the ``S`` stages.
        drop_rate: dropout after the patch embedding, attention and MLP projections.
        attn_drop_rate: dropout on the softmax attention weights.
        attn_layers: one attention factory per stage (overrides ``attn_type``).
        **kwargs: the skeleton's other arguments (:class:`~seg.model.backbones.swin.FLattenSwin`).
    """

    def __init__(
        self,
        attn_type: str = "LLSS",
        depths: Sequence[int] = (2, 2, 6, 2),
        alpha: float = 4.0,
        kernel_size: int = 5,
        qkv_bias: bool = True,
        window_size: int = 7,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        attn_layers: Sequence[AttentionFactory] | None = None,
        **kwargs,
    ) -> None:
        letters = swin_attention_letters(qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                                         window_size=window_size)
        letters["L"] = lambda dim, heads, grid, sr, shift: PolaLinearAttention(
            dim, heads, grid, qkv_bias=qkv_bias, alpha=alpha, kernel_size=kernel_size, proj_drop=drop_rate,
            fused_qkv=True)
        attn_layers = stage_factories(attn_type, letters, attn_layers, num_stages=len(depths))
        super().__init__(attn_type=attn_type, depths=depths, kernel_size=kernel_size, window_size=window_size,
                         qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                         attn_layers=attn_layers, **kwargs)


def _create_pvt(variant: str, pretrained: bool, **kwargs) -> PolaPVT:
    return build_encoder(PolaPVT, variant, pretrained, pvt.checkpoint_filter_fn, **kwargs)


def _create_swin(variant: str, pretrained: bool, **kwargs) -> PolaSwin:
    return build_encoder(PolaSwin, variant, pretrained, swin.checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    **{name: imagenet_cfg("patch_embed1.proj") for name in (
        "pola_pvt_tiny", "pola_pvt_small", "pola_pvt_medium", "pola_pvt_large", "test_pola_pvt")},
    **{name: imagenet_cfg("patch_embed.proj") for name in (
        "pola_swin_tiny", "pola_swin_small", "pola_swin_base", "test_pola_swin")},
})

_PVT = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4))
_TEST_PVT = dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 1, 1))
_TEST_SWIN = dict(embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), mlp_ratio=2.0)


@register_model
def pola_pvt_tiny(pretrained: bool = False, **kwargs) -> PolaPVT:
    return _create_pvt("pola_pvt_tiny", pretrained, **dict(_PVT, depths=(2, 2, 2, 2), drop_path_rate=0.1, **kwargs))


@register_model
def pola_pvt_small(pretrained: bool = False, **kwargs) -> PolaPVT:
    return _create_pvt("pola_pvt_small", pretrained, **dict(_PVT, depths=(3, 4, 6, 3), drop_path_rate=0.1, **kwargs))


@register_model
def pola_pvt_medium(pretrained: bool = False, **kwargs) -> PolaPVT:
    arch = dict(_PVT, depths=(3, 4, 18, 3), drop_path_rate=0.3)
    return _create_pvt("pola_pvt_medium", pretrained, **dict(arch, **kwargs))


@register_model
def pola_pvt_large(pretrained: bool = False, **kwargs) -> PolaPVT:
    arch = dict(_PVT, depths=(3, 8, 27, 3), drop_path_rate=0.3)
    return _create_pvt("pola_pvt_large", pretrained, **dict(arch, **kwargs))


@register_model
def pola_swin_tiny(pretrained: bool = False, **kwargs) -> PolaSwin:
    arch = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2)
    return _create_swin("pola_swin_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def pola_swin_small(pretrained: bool = False, **kwargs) -> PolaSwin:
    arch = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3)
    return _create_swin("pola_swin_small", pretrained, **dict(arch, **kwargs))


@register_model
def pola_swin_base(pretrained: bool = False, **kwargs) -> PolaSwin:
    arch = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5)
    return _create_swin("pola_swin_base", pretrained, **dict(arch, **kwargs))


@register_model
def test_pola_pvt(pretrained: bool = False, **kwargs) -> PolaPVT:
    """Tiny variant (depth 1 per stage, 16-64 channels, head dim 16) for CPU tests."""
    return _create_pvt("test_pola_pvt", pretrained, **dict(_TEST_PVT, **kwargs))


@register_model
def test_pola_swin(pretrained: bool = False, **kwargs) -> PolaSwin:
    """Tiny variant (16-128 channels, depths 1-1-2-2 so the S stages have a shifted block) for CPU tests."""
    return _create_swin("test_pola_swin", pretrained, **dict(_TEST_SWIN, **kwargs))
