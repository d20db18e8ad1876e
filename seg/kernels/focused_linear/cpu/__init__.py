"""Focused linear attention on CPU tensors (the ``cpu`` and ``cpu_inference`` modes).

- :mod:`~seg.kernels.focused_linear.cpu.attention`: what the dispatch calls: attention, the DWC term and the
  folded inference of a layer with global keys;
- :mod:`~seg.kernels.focused_linear.cpu.closed_form`: the kernel power and the attention with hand-derived
  backward passes (autograd functions), plus the channels-last depthwise convolution.
"""

from seg.kernels.focused_linear.cpu.attention import focused_linear_attention, fused_inference, rank_restoration

__all__ = ["focused_linear_attention", "fused_inference", "rank_restoration"]
