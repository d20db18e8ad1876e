"""Auxiliary FCN head of the UperNet recipe: a deep-supervision branch on the stride-16 encoder map.

One 3x3 conv (no bias) + BatchNorm + ReLU, channel dropout, 1x1 classifier. It is used only in training
(loss weight 0.4 in the recipe) and adds no cost at inference.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["AuxFCNHead"]


class AuxFCNHead(nn.Module):
    """FCN head with one conv block.

    Args:
        in_channels: channels of the input map (the encoder's stage-3 width).
        num_classes: number of output classes.
        channels: width of the conv block (recipe: 256).
        dropout: channel dropout probability before the classifier (recipe: 0.1).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, in_channels, H, W) to logits (B, num_classes, H, W)."""
        return self.classifier(self.dropout(self.conv(x)))
