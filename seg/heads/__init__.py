"""Decode heads that smp lacks: the recipe's Semantic FPN and the auxiliary FCN head."""

from seg.heads.fcn import AuxFCNHead
from seg.heads.semantic_fpn import SemanticFPNHead

__all__ = ["AuxFCNHead", "SemanticFPNHead"]
