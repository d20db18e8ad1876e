"""The two pieces every mmsegmentation 0.x head is made of, under mmseg's parameter names.

``ConvModule``: conv -> BatchNorm -> ReLU, the weights at ``<m>.conv.weight`` and ``<m>.bn.*``; the conv has a bias
only where no norm follows (mmcv's ``bias='auto'``). ``DecodeHead``: the classifier every head ends with, channel
dropout then a 1x1 ``conv_seg`` (initialised normal std 0.01, zero bias, as mmseg does).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ConvModule", "DecodeHead"]


class ConvModule(nn.Module):
    """Conv2d (+ BatchNorm, eps 1e-5) (+ ReLU), mmcv's layout.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel; padding keeps the size (``kernel_size // 2``).
        norm: follow the conv with BatchNorm (then the conv has no bias).
        act: end with ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: bool = True,
                 act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.act = nn.ReLU(inplace=True) if act else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x) if self.act is not None else x


class DecodeHead(nn.Module):
    """Base of the heads: ``dropout`` + ``conv_seg`` (1x1, ``channels`` -> ``num_classes``).

    Args:
        channels: width of the map the classifier reads.
        num_classes: number of output classes.
        dropout: channel dropout probability before the classifier (every recipe: 0.1).
    """

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.channels = channels
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh ``conv_seg`` for ``num_classes`` classes (normal std 0.01, zero bias) on the old one's device
        and dtype."""
        old = getattr(self, "conv_seg", None)
        conv = nn.Conv2d(self.channels, num_classes, kernel_size=1)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        if old is not None:
            conv.to(device=old.weight.device, dtype=old.weight.dtype)
        self.conv_seg = conv

    def classify(self, x: Tensor) -> Tensor:
        """(B, channels, h, w) -> logits (B, num_classes, h, w)."""
        return self.conv_seg(self.dropout(x))
