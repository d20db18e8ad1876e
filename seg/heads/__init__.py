"""Decode heads as mmsegmentation 0.x computes them, parameter for parameter, so the published segmenters load:
UperNet (``UPerHead``), Semantic FPN (``FPN`` neck + scale heads) and the auxiliary FCN head."""

from seg.heads._blocks import ConvModule, DecodeHead
from seg.heads.fcn import AuxFCNHead
from seg.heads.semantic_fpn import FPN, SemanticFPNHead
from seg.heads.uper import PPM, UPerHead

__all__ = ["PPM", "AuxFCNHead", "ConvModule", "DecodeHead", "FPN", "SemanticFPNHead", "UPerHead"]
