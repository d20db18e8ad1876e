"""Semantic FPN decode head of the PVT segmentation recipe (Kirillov et al., "Panoptic FPN", CVPR 2019).

An FPN neck (1x1 lateral convs, top-down nearest upsampling + add, one 3x3 output conv per level) followed by
per-level scale heads that bring every level to stride 4 with [3x3 conv + BN + ReLU, x2 bilinear upsampling]
blocks; the levels are summed, dropped out and classified by a 1x1 conv. smp's ``FPN`` differs (no 3x3 output
convs, GroupNorm, ``align_corners=True``), so this head is written here.

Every resize takes the exact size of the map it is merged with, so inputs of any size (odd ones too) work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SemanticFPNHead", "FPNNeck", "ScaleHead"]


class FPNNeck(nn.Module):
    """Feature pyramid: lateral 1x1 convs, top-down nearest upsampling + add, a 3x3 conv per level.

    Args:
        in_channels: channels of the encoder maps, finest (stride 4) first.
        out_channels: width of every pyramid level.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, kernel_size=1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1) for _ in in_channels
        )

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Map encoder features (B, C_i, H_i, W_i) to pyramid levels (B, out_channels, H_i, W_i)."""
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):  # coarsest to finest
            top_down = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + top_down
        return [conv(lat) for conv, lat in zip(self.fpn_convs, laterals, strict=True)]


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv (no bias) + BatchNorm + ReLU, size preserving."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ScaleHead(nn.Module):
    """Brings one pyramid level to stride 4: ``num_blocks`` conv blocks, each (bar stride-4 levels) followed
    by a x2 bilinear upsampling to the size of the next finer level.

    Args:
        in_channels: width of the pyramid level.
        channels: width of the blocks.
        num_blocks: number of conv blocks (``max(1, level)``).
        upsample: whether each block is followed by an upsampling (False for the stride-4 level).
    """

    def __init__(self, in_channels: int, channels: int, num_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            _conv_bn_relu(in_channels if i == 0 else channels, channels) for i in range(num_blocks)
        )
        self.upsample = upsample

    def forward(self, x: Tensor, sizes: Sequence[tuple[int, int]]) -> Tensor:
        """Run the blocks; after block j resize to ``sizes[j]`` (the finer levels' sizes, coarse to fine)."""
        for j, block in enumerate(self.blocks):
            x = block(x)
            if self.upsample:
                x = F.interpolate(x, size=sizes[j], mode="bilinear", align_corners=False)
        return x


class SemanticFPNHead(nn.Module):
    """Semantic FPN: FPN neck + scale heads summed at stride 4 + dropout + 1x1 classifier.

    Args:
        in_channels: channels of the 4 encoder maps at strides 4, 8, 16, 32 (finest first).
        num_classes: number of output classes.
        fpn_channels: width of the FPN levels (recipe: 256).
        head_channels: width of the scale heads (recipe: 128).
        dropout: channel dropout probability before the classifier (recipe: 0.1).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        fpn_channels: int = 256,
        head_channels: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.neck = FPNNeck(in_channels, fpn_channels)
        self.scale_heads = nn.ModuleList(
            ScaleHead(fpn_channels, head_channels, num_blocks=max(1, i), upsample=i > 0)
            for i in range(len(in_channels))
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(head_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        self.out_channels = head_channels
        self.output_stride = 4

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Map encoder features to logits (B, num_classes, H_0, W_0) at the size of the stride-4 map.

        Args:
            features: encoder maps, finest first; the last ``len(in_channels)`` are used, so smp's feature
                list ``[x, s2, s4, s8, s16, s32]`` can be passed as is.
        """
        levels = self.neck(features[-len(self.scale_heads) :])
        sizes = [tuple(p.shape[-2:]) for p in levels]
        out = self.scale_heads[0](levels[0], [])
        for i in range(1, len(levels)):
            # Level i is upsampled through levels i-1, ..., 0: one block and one resize per step.
            out = out + self.scale_heads[i](levels[i], sizes[i - 1 :: -1])
        return self.classifier(self.dropout(out))
