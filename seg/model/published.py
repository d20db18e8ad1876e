"""The published ADE20K segmenters the recipes in ``configs/`` reproduce: where they come from, what they report.

Keyed by config file stem. Figures are the authors' (single-scale ADE20K val mIoU / mAcc, parameter counts with
the auxiliary head where the recipe has one), quoted as published; ``python -m seg.model.convert`` names them in the
model card of a converted checkpoint, and the README lists them per config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["PUBLISHED", "PublishedSegmenter", "published_for"]

_AGENT = "LeapLabTHU/Agent-Attention, downstream/segmentation/README.md"
_RAVLT = "qhfan/RALA, README.md (Semantic Segmentation)"
_MLLA = "LeapLabTHU/MLLA, downstream/segmentation/README.md"


@dataclass(frozen=True)
class PublishedSegmenter:
    """A published segmentation result: mIoU (and mAcc where given) in percent, parameters in millions."""

    miou: float
    source: str
    macc: float | None = None
    params_m: float | None = None


PUBLISHED: dict[str, PublishedSegmenter] = {
    "agent_pvt_tiny_fpn_ade20k_40k": PublishedSegmenter(40.18, _AGENT, 51.76, 15.32),
    "agent_pvt_small_fpn_ade20k_40k": PublishedSegmenter(44.18, _AGENT, 56.17),
    "agent_pvt_medium_fpn_ade20k_40k": PublishedSegmenter(44.30, _AGENT, 56.42),
    "agent_pvt_large_fpn_ade20k_40k": PublishedSegmenter(46.52, _AGENT, 58.50),
    "agent_swin_tiny_upernet_ade20k_160k": PublishedSegmenter(46.68, _AGENT, 58.53, 60.56),
    "agent_swin_small_upernet_ade20k_160k": PublishedSegmenter(48.08, _AGENT, 59.78),
    "agent_swin_base_upernet_ade20k_160k": PublishedSegmenter(48.73, _AGENT, 60.01),
    "mlla_base_upernet_ade20k_160k": PublishedSegmenter(51.9, _MLLA, None, 127.64),
    "ravlt_tiny_fpn_ade20k_80k": PublishedSegmenter(47.9, _RAVLT),
    "ravlt_small_fpn_ade20k_80k": PublishedSegmenter(49.5, _RAVLT, None, 28.31),
    "ravlt_base_fpn_ade20k_80k": PublishedSegmenter(51.9, _RAVLT),
    "ravlt_large_fpn_ade20k_80k": PublishedSegmenter(52.6, _RAVLT),
    "ravlt_small_upernet_ade20k_160k": PublishedSegmenter(50.7, _RAVLT, None, 54.53),
    "ravlt_base_upernet_ade20k_160k": PublishedSegmenter(52.5, _RAVLT),
    "ravlt_large_upernet_ade20k_160k": PublishedSegmenter(53.2, _RAVLT),
}


def published_for(config: str | Path) -> PublishedSegmenter | None:
    """The published result of a recipe config (by file stem), or None for the project's own recipes."""
    return PUBLISHED.get(Path(config).stem)
