"""Auxiliary FCN head of the UperNet recipes as mmsegmentation 0.x computes it (``FCNHead`` with one conv, no
concatenation of the input): a deep-supervision branch on the stride-16 encoder map, loss weight 0.4 in training,
unused at inference. Names as mmseg's: ``convs.0.conv``, ``convs.0.bn``, ``conv_seg``.
"""

from __future__ import annotations

from torch import Tensor, nn

from seg.model.heads._blocks import ConvModule, DecodeHead

__all__ = ["AuxFCNHead"]


class AuxFCNHead(DecodeHead):
    """FCN head: a 3x3 ConvModule, dropout, ``conv_seg``.

    Args:
        in_channels: channels of the input map (the encoder's stage-3 width).
        num_classes: number of output classes.
        channels: width of the conv block (recipes: 256).
        dropout: channel dropout before ``conv_seg`` (recipes: 0.1).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__(channels, num_classes, dropout)
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3))

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, h, w) -> logits (B, num_classes, h, w)."""
        return self.classify(self.convs(x))
