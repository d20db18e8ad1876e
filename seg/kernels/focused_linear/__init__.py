"""Focused linear attention's fast paths: the dispatch, the CPU path and the Triton path (tensors in, tensors out).

:func:`select_mode` is the one place that decides which implementation a call runs; see
:mod:`seg.kernels.focused_linear.dispatch`.
"""

from seg.kernels.focused_linear import dispatch
from seg.kernels.focused_linear.dispatch import *  # noqa: F403  (the names of dispatch.__all__)

__all__ = dispatch.__all__  # the package exports the dispatch's public names
