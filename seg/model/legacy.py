"""Weights saved before the heads became mmsegmentation's (saved-model version 3): what loads, what is refused.

Version 3 made ``upernet`` and ``semantic_fpn`` the heads of the published recipes, parameter for parameter, and
named every classifier ``conv_seg``. For weights written earlier:

- ``upernet`` of a version 1 / 2 folder was smp's UPerNet decoder: it loads as ``smp_upernet`` (the same module).
- the auxiliary FCN head computes what it computed; only its names changed (``conv.0`` / ``conv.1`` /
  ``classifier`` -> ``convs.0.conv`` / ``convs.0.bn`` / ``conv_seg``): renamed on load.
- the earlier ``semantic_fpn`` resized each level to the finer level's size where mmseg upsamples by exactly 2
  (different logits on sizes that are not multiples of 32): refused, with what changed.

A Lightning checkpoint carries no version; its state-dict names tell the earlier heads apart.

The ``segformer`` head, smp's ``SegformerDecoder`` in earlier versions, is now :class:`seg.model.heads.SegFormerHead`
with the same parameter names and logits: its weights of any version load as they are, with no rename here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["HEADS_VERSION", "OutdatedHeadError", "upgrade_arguments", "upgrade_state"]

HEADS_VERSION = 3  # the saved-model version that introduced the mmseg heads

_AUX_RENAMES = {"conv.0.": "convs.0.conv.", "conv.1.": "convs.0.bn.", "classifier.": "conv_seg."}


class OutdatedHeadError(ValueError):
    """Weights of a head that this version computes differently."""


def upgrade_arguments(arguments: Mapping[str, Any], version: int) -> dict[str, Any]:
    """The Segmentor arguments of a folder saved with ``version``, as this version names the same model."""
    out = dict(arguments)
    if version < HEADS_VERSION and out.get("decoder") == "upernet":
        out["decoder"] = "smp_upernet"
    return out


def upgrade_state(state: Mapping[str, Tensor], decoder: str, source: str, prefix: str = "") -> dict[str, Tensor]:
    """``state`` (segmentor names after ``prefix``) with the earlier auxiliary head's names renamed.

    Raises:
        OutdatedHeadError: ``state`` holds an earlier ``upernet`` (smp's decoder) or ``semantic_fpn`` while the
            model has this version's head; the message names ``source`` and what to do.
    """
    names = [k[len(prefix):] for k in state if k.startswith(prefix)]
    if decoder == "upernet" and any(n.startswith("decode_head.decoder.") for n in names):
        raise OutdatedHeadError(
            f"{source} holds smp's UPerNet decoder, the `upernet` head before saved-model version {HEADS_VERSION}; "
            "`upernet` is now mmsegmentation's UPerHead (no LayerNorm, other names). Build the model with "
            "`decoder: smp_upernet` to load these weights.")
    if decoder == "semantic_fpn" and any(n.startswith("decode_head.scale_heads.0.blocks.") for n in names):
        raise OutdatedHeadError(
            f"{source} holds the `semantic_fpn` head of saved-model versions before {HEADS_VERSION}, which resized "
            "each level to the finer level's size; the head is now mmsegmentation's (upsampling by exactly 2, "
            "other names) and computes other logits on sizes that are not multiples of 32. Retrain with this "
            "version, or use the earlier release to run these weights.")
    aux = prefix + "aux_head."
    out = {}
    for key, value in state.items():
        if key.startswith(aux):
            rest = key[len(aux):]
            old = next((o for o in _AUX_RENAMES if rest.startswith(o)), None)
            if old is not None:
                key = aux + _AUX_RENAMES[old] + rest[len(old):]
        out[key] = value
    return out
