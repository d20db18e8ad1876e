"""Semantic segmentation with focused linear attention (FLatten) encoders, beside the attention families they
are compared with (SOFT, Agent attention, MLLA, RAVLT, MALA, PolaFormer and the softmax baselines).

Importing ``seg`` registers the project's encoders with timm (``flatten_pvt_*``, ``flatten_pvt_v2_*``,
``flatten_swin_*``, ``soft_*``, ``agent_pvt_*``, ``agent_swin_*``, ``mlla_*``, ``ravlt_*``, ``mala_*``,
``pola_pvt_*``, ``pola_swin_*`` and their ``test_*`` variants), so ``timm.create_model`` and smp's ``tu-<name>``
encoders find them.
"""

from seg import _moved
from seg.model import backbones  # noqa: F401  (registers the encoders with timm)

_moved.install()  # old import paths (seg.task, seg.models, ...) still load, with a message naming the new one

__version__ = "0.1.0"
