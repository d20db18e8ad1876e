"""Focused linear attention's fast paths: the dispatch, the CPU path and the Triton path (tensors in, tensors out).

:func:`select_mode` is the one place that decides which implementation a call runs; see
:mod:`seg.kernels.focused_linear.dispatch`.
"""

from seg.kernels.focused_linear.dispatch import (
    BACKENDS,
    AttnBackend,
    Mode,
    attention,
    check_backend,
    fused_inference,
    rank_restoration,
    select_mode,
    set_backend,
)

__all__ = [
    "BACKENDS",
    "AttnBackend",
    "Mode",
    "attention",
    "check_backend",
    "fused_inference",
    "rank_restoration",
    "select_mode",
    "set_backend",
]
