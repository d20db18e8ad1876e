"""Semantic FPN (Kirillov et al., "Panoptic FPN", CVPR 2019) as mmsegmentation 0.x computes it: the head of the
PVT, Agent-PVT and RAVLT ADE20K recipes, parameter for parameter (mmseg's ``FPN`` neck + ``FPNHead``).

Neck: 1x1 ``lateral_convs`` and 3x3 ``fpn_convs``, plain convolutions with bias; top-down, each coarser level is
resized (nearest) to the exact size of the finer one and added. Head: ``scale_heads.i`` brings level i to stride 4
with i blocks of [3x3 ConvModule, bilinear upsampling by exactly 2] (one ConvModule for the stride-4 level); the
first level's output is the base, every other is resized (bilinear) to the base's size and added; dropout,
``conv_seg``. Upsampling by exactly 2 and then resizing differs from resizing each step to the finer level's size
where a map has odd sides; this is the published computation. ``align_corners=False`` throughout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from seg.model.heads._blocks import ConvModule, DecodeHead

__all__ = ["FPN", "SemanticFPNHead", "Upsample2x"]


class FPN(nn.Module):
    """Feature pyramid neck (names ``lateral_convs.i.conv``, ``fpn_convs.i.conv``).

    Args:
        in_channels: channels of the encoder maps, finest first.
        out_channels: width of every pyramid level (recipes: 256).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1, norm=False, act=False) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, norm=False, act=False)
                                       for _ in in_channels)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Encoder maps (B, C_i, H_i, W_i) -> pyramid levels (B, out_channels, H_i, W_i)."""
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):  # coarse to fine
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=True)]


class Upsample2x(nn.Module):
    """Bilinear upsampling by exactly 2 (output floor(2 h) x floor(2 w)), ``align_corners=False``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def _scale_head(level: int, in_channels: int, channels: int) -> nn.Sequential:
    """Level ``level`` (stride 4 * 2^level) to stride 4: [ConvModule, Upsample2x] x level, or one ConvModule for
    level 0; mmseg's indices (``scale_heads.i.0``, ``.2``, ``.4`` are the ConvModules)."""
    layers: list[nn.Module] = []
    for k in range(max(1, level)):
        layers.append(ConvModule(in_channels if k == 0 else channels, channels, 3))
        if level > 0:
            layers.append(Upsample2x())
    return nn.Sequential(*layers)


class SemanticFPNHead(DecodeHead):
    """FPN neck + FPN head.

    Args:
        in_channels: channels of the 4 encoder maps at strides 4, 8, 16, 32 (finest first).
        num_classes: number of output classes.
        fpn_channels: width of the pyramid levels (recipes: 256).
        head_channels: width of the scale heads (recipes: 128).
        dropout: channel dropout before ``conv_seg`` (recipes: 0.1).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, fpn_channels: int = 256,
                 head_channels: int = 128, dropout: float = 0.1) -> None:
        super().__init__(head_channels, num_classes, dropout)
        self.in_channels = list(in_channels)
        self.neck = FPN(in_channels, fpn_channels)
        self.scale_heads = nn.ModuleList(_scale_head(i, fpn_channels, head_channels) for i in range(len(in_channels)))
        self.out_channels = head_channels
        self.output_stride = 4

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Encoder maps (finest first; the last 4 are used, so smp's feature list works as is) -> logits
        (B, num_classes, H_0, W_0) at the size of the stride-4 map."""
        levels = self.neck(features[-len(self.in_channels):])
        out = self.scale_heads[0](levels[0])
        for head, level in zip(self.scale_heads[1:], levels[1:], strict=True):
            # always resized (an identity at equal sizes), so an exported graph resizes at every input size
            out = out + F.interpolate(head(level), size=out.shape[2:], mode="bilinear", align_corners=False)
        return self.classify(out)
