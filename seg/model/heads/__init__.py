"""Decode heads as mmsegmentation 0.x computes them, parameter for parameter, so the published segmenters load:
UperNet (``UPerHead``), Semantic FPN (``FPN`` neck + scale heads) and the auxiliary FCN head; and SegFormer's
all-MLP head (``SegFormerHead``), computed level by level with smp's ``SegformerDecoder`` logits and names."""

from seg.model.heads._blocks import ConvModule, DecodeHead
from seg.model.heads.fcn import AuxFCNHead
from seg.model.heads.segformer import SegFormerHead
from seg.model.heads.semantic_fpn import FPN, SemanticFPNHead
from seg.model.heads.uper import PPM, UPerHead

__all__ = ["PPM", "AuxFCNHead", "ConvModule", "DecodeHead", "FPN", "SegFormerHead", "SemanticFPNHead", "UPerHead"]
