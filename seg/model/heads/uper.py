"""UperNet decode head (Xiao et al., "Unified Perceptual Parsing", ECCV 2018) as mmsegmentation 0.x computes it:
the head of the Swin, Agent-Swin, MLLA and RAVLT ADE20K recipes, parameter for parameter (``UPerHead``).

A pyramid pooling module on the stride-32 map (average pools to 1, 2, 3, 6 cells, a 1x1 ConvModule each, bilinear
back, concatenated with the map, a 3x3 ``bottleneck``), 1x1 ``lateral_convs`` on the three finer maps, a top-down
pathway (bilinear resize of the coarser level to the finer one's exact size, add), 3x3 ``fpn_convs`` on the three
finer levels, every level resized to stride 4, concatenated, a 3x3 ``fpn_bottleneck``, dropout, ``conv_seg``.
Every resize is bilinear with ``align_corners=False`` to an exact size, so any input size works. Unlike smp's
UPerNet decoder there is no LayerNorm anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg.model.heads._blocks import ConvModule, DecodeHead

__all__ = ["PPM", "UPerHead"]


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PPM(nn.ModuleList):
    """Pyramid pooling: per scale s, ``[AdaptiveAvgPool2d(s), ConvModule 1x1]`` (names ``<j>.1.conv`` / ``<j>.1.bn``),
    each output resized back to the input's size."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int) -> None:
        super().__init__(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1))
                         for s in pool_scales)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, C, h, w) -> one (B, channels, h, w) map per pool scale."""
        return [_resize(branch(x), x.shape[2:]) for branch in self]


class UPerHead(DecodeHead):
    """UperNet head.

    Args:
        in_channels: channels of the 4 encoder maps at strides 4, 8, 16, 32 (finest first).
        num_classes: number of output classes.
        channels: width of every level and of the fused map (recipes: 512).
        pool_scales: output sizes of the pyramid pooling (recipes: 1, 2, 3, 6).
        dropout: channel dropout before ``conv_seg`` (recipes: 0.1).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__(channels, num_classes, dropout)
        self.in_channels = list(in_channels)
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)
        self.output_stride = 4

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Encoder maps (finest first; the last 4 are used, so smp's feature list works as is) -> logits
        (B, num_classes, H_0, W_0) at the size of the stride-4 map."""
        inputs = list(features[-len(self.in_channels):])
        top = inputs[-1]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs[:-1], strict=True)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # coarse to fine
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [_resize(x, size) for x in outs[1:]]
        return self.classify(self.fpn_bottleneck(torch.cat(outs, dim=1)))  # (B, K, H_0, W_0)
