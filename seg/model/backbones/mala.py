"""MALA encoders (Fan et al., "Rectifying Magnitude Neglect in Linear Attention", ICCV 2025, arXiv 2507.00698,
where the network is called MAViT) for timm.

RAVLT's skeleton (:mod:`seg.model.backbones.ravlt`: conv stem, RoPE blocks with layer scale, 3x3 conv merges) with
magnitude-aware linear attention (:mod:`seg.model.layers.mala`) in stages 1-2 (``attn_type='llvv'``, the published
layout, = ``LLSS``; ``S`` / ``v`` is RAVLT's RoPE softmax attention) and a wider classifier projection: 1x1
conv to 2048 channels (Tiny / Small / Base) or 2560 (Large) against RAVLT's 1024. Any input of at least
32 x 32; features, output norms ``extra_norms.{i}.norm`` and the classifier as in RAVLT, and so are the
parameter names: MALA and RAVLT checkpoints share every backbone key, and the projection width tells them apart
(a RAVLT file is refused here).
Parameter counts with the 1000-class head: Tiny 16.45M, Small 27.14M, Base 49.79M, Large 97.77M.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from timm.models import generate_default_cfgs, register_model
from torch import nn

from seg.model.backbones._registry import build_encoder, imagenet_cfg
from seg.model.backbones.ravlt import RAVLT, checkpoint_filter_fn
from seg.model.layers.mala import MALAttention

__all__ = ["MALA"]


class MALA(RAVLT):
    """MALA backbone with the published convolutional classifier.

    Args:
        projection: channels of the classifier's 1x1 conv (2048; 2560 for Large).
        attn_type: one letter per stage, ``L`` magnitude-aware linear attention, ``S`` RoPE softmax attention
            (the published ``l`` / ``v`` are aliases).
        **kwargs: the skeleton's other arguments (:class:`~seg.model.backbones.ravlt.RAVLT`).
    """

    linear_attention: ClassVar[Callable[[int, int], nn.Module]] = MALAttention

    def __init__(self, projection: int = 2048, attn_type: str = "llvv", **kwargs) -> None:
        super().__init__(projection=projection, attn_type=attn_type, **kwargs)


def _create(variant: str, pretrained: bool = False, **kwargs) -> MALA:
    return build_encoder(MALA, variant, pretrained, checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    name: imagenet_cfg("patch_embed.proj.0")
    for name in ("mala_tiny", "mala_small", "mala_base", "mala_large", "test_mala")
})


def _arch(
    embed_dims: Sequence[int], depths: Sequence[int], num_heads: Sequence[int], drop_path_rate: float, **extra
) -> dict:
    return dict(embed_dims=embed_dims, depths=depths, num_heads=num_heads, drop_path_rate=drop_path_rate, **extra)


_TINY = _arch((64, 128, 256, 512), (2, 2, 6, 2), (1, 2, 4, 8), 0.1)
_SMALL = _arch((64, 128, 320, 512), (3, 5, 9, 3), (1, 2, 5, 8), 0.15)
_BASE = _arch((96, 192, 384, 512), (4, 6, 12, 6), (1, 2, 6, 8), 0.4, layer_scales=(1.0, 1.0, 1e-6, 1e-6))
_LARGE = _arch((96, 192, 448, 640), (4, 7, 19, 8), (1, 2, 7, 10), 0.55, layer_scales=(1e-6,) * 4, projection=2560)
_TEST = _arch((16, 32, 48, 64), (1, 1, 1, 1), (1, 2, 3, 4), 0.0, mlp_ratio=2.0, projection=64)


@register_model
def mala_tiny(pretrained: bool = False, **kwargs) -> MALA:
    return _create("mala_tiny", pretrained, **dict(_TINY, **kwargs))


@register_model
def mala_small(pretrained: bool = False, **kwargs) -> MALA:
    return _create("mala_small", pretrained, **dict(_SMALL, **kwargs))


@register_model
def mala_base(pretrained: bool = False, **kwargs) -> MALA:
    return _create("mala_base", pretrained, **dict(_BASE, **kwargs))


@register_model
def mala_large(pretrained: bool = False, **kwargs) -> MALA:
    return _create("mala_large", pretrained, **dict(_LARGE, **kwargs))


@register_model
def test_mala(pretrained: bool = False, **kwargs) -> MALA:
    """Tiny variant (depth 1 per stage, 16-64 channels, head dim 16) for CPU tests."""
    return _create("test_mala", pretrained, **dict(_TEST, **kwargs))
