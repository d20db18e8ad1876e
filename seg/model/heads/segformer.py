"""SegFormer's all-MLP decode head (Xie et al., NeurIPS 2021), computed level by level.

The head as published (and as smp's ``SegformerDecoder`` computes it): a linear layer per encoder level to
``channels``, each level resized bilinearly to the stride-4 grid, the four maps concatenated, a 1x1 fuse conv
(no bias) + BatchNorm + ReLU, then the 1x1 classifier. Resizing is linear and acts on each channel alone, so it
commutes with any 1x1 conv; the fuse conv is a sum over the four concatenated blocks. Here each level's linear
layer and its block of the fuse conv are one (C_i -> channels) product, run at the level's own resolution, and
only the resized products are summed: the pre-BatchNorm activations are the same sums (equal up to float
rounding, in training and eval), without the (B, 4 x channels, H/4, W/4) concatenation or the three resized
``channels``-wide maps it holds. In eval the BatchNorm is folded into the products as well.

Parameter names equal the ``segformer`` decoder of earlier versions (smp's decoder inside
:class:`seg.model.segmentor.SmpDecodeHead`): ``decoder.mlp_stage.<i>.linear`` (i = 0 for the stride-32 level),
``decoder.fuse_stage.0`` (conv) / ``.1`` (BatchNorm) and ``classifier``, so saved models load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base.initialization import initialize_decoder
from torch import Tensor, nn

from seg.kernels.onednn import linear
from seg.kernels.tracing import exporting

__all__ = ["SegFormerHead"]


class _LevelLinear(nn.Module):
    """One level's linear layer (holds ``linear`` for the saved names)."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, channels)


class _AllMLP(nn.Module):
    """The head's parameters: per-level linear layers (deepest first) and the fuse conv + BatchNorm + ReLU."""

    def __init__(self, in_channels: Sequence[int], channels: int) -> None:
        super().__init__()
        self.mlp_stage = nn.ModuleList(_LevelLinear(c, channels) for c in reversed(list(in_channels)))
        self.fuse_stage = nn.Sequential(
            nn.Conv2d(len(in_channels) * channels, channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP head on the 4 encoder levels (strides 4, 8, 16, 32) -> logits at stride 4.

    Args:
        in_channels: channels of the 4 levels, stride 4 first.
        num_classes: output classes.
        channels: the head's width (256 in SegFormer-B0 and smp).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 256) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"the SegFormer head takes 4 levels, got channels {list(in_channels)}")
        self.decoder = _AllMLP(in_channels, channels)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        initialize_decoder(self.decoder)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def level_products(self) -> tuple[list[Tensor], Tensor]:
        """Per level (stride 4 first) the (channels, C_i) product of its linear layer and its fuse-conv block,
        and the summed bias (channels,); in eval with the BatchNorm folded in (then the products and bias give
        the BatchNorm's output)."""
        mlps = self.decoder.mlp_stage
        conv, bn = self.decoder.fuse_stage[0], self.decoder.fuse_stage[1]
        blocks = conv.weight.flatten(1).chunk(len(mlps), dim=1)  # (channels, channels) per level, deepest first
        weights = [w @ m.linear.weight for w, m in zip(blocks, mlps, strict=True)]  # (channels, C_i)
        bias = sum(w @ m.linear.bias for w, m in zip(blocks, mlps, strict=True))  # (channels,)
        if not self.training and bn.running_mean is not None:
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (channels,)
            weights = [w * scale[:, None] for w in weights]
            bias = (bias - bn.running_mean) * scale + bn.bias
        return weights[::-1], bias

    def forward(self, features: list[Tensor]) -> Tensor:
        """smp's feature list ``[image, s2, s4, s8, s16, s32]`` -> logits (B, num_classes, H // 4, W // 4)."""
        image, levels = features[0], features[-4:]
        target = (image.shape[2] // 4, image.shape[3] // 4)  # the grid smp's decoder resizes to
        weights, bias = self.level_products()
        if exporting():
            fused = _sum_levels_as_maps(levels, weights, bias, target)
        else:
            fused = None
            for x, w in zip(levels, weights, strict=True):
                y = linear(x.permute(0, 2, 3, 1), w)  # (B, h, w, C_i) -> (B, h, w, channels)
                y = y.permute(0, 3, 1, 2)  # (B, channels, h, w), channels-last memory
                if tuple(y.shape[2:]) != target:
                    y = F.interpolate(y, size=target, mode="bilinear", align_corners=False)
                fused = y if fused is None else fused.add_(y)
            fused = fused + bias.view(1, -1, 1, 1)  # (B, channels, H/4, W/4)
        bn = self.decoder.fuse_stage[1]
        if self.training or bn.running_mean is None:
            fused = bn(fused)
        return self.classifier(F.relu(fused))


def _sum_levels_as_maps(levels: list[Tensor], weights: list[Tensor], bias: Tensor, target: tuple[int, int]) -> Tensor:
    """The head's sum for an exported graph: each level's product as a 1x1 conv on its (B, C_i, h, w) map, the
    resized levels first (deepest first) and a level already on the target grid last, carrying the bias
    (it passes through no resize).

    The same sums as ``forward``'s token products. In the graph the only layout change left is each level's
    C_i-channel input map (32-256 channels, where the products' outputs have ``channels``); ONNX Runtime keeps
    the convs, resizes, adds and the classifier in its blocked layout with no reorder between them, and adds
    the running sum inside the last conv (no full-size ``Add`` for the bias, none for the last level)."""
    order = sorted(range(len(levels)), key=lambda i: (tuple(levels[i].shape[2:]) == target, -i))
    carrier = order[-1] if tuple(levels[order[-1]].shape[2:]) == target else None
    fused = None
    for i in order:
        y = F.conv2d(levels[i], weights[i][:, :, None, None], bias if i == carrier else None)  # (B, channels, h, w)
        if i != carrier and tuple(y.shape[2:]) != target:
            y = F.interpolate(y, size=target, mode="bilinear", align_corners=False)
        fused = y if fused is None else fused + y
    return fused if carrier is not None else fused + bias.view(1, -1, 1, 1)  # (B, channels, H/4, W/4)
