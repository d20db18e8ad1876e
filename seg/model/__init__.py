"""The model artifact: encoders (``backbones/``), decoders (``heads/``) and attention layers (``layers/``), the
:class:`Segmentor` that pairs them, and what reads and writes it (saved folders, checkpoints, converters, the
inference modes a saved model carries)."""

from seg.model.segmentor import DECODERS, Segmentor

__all__ = ["DECODERS", "Segmentor"]
