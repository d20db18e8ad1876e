"""Focused linear attention through Triton kernels (the ``triton`` mode), checked before they are trusted.

- :mod:`~seg.kernels.focused_linear.triton.checked`: what the dispatch calls: the registered operator, the
  verdict per configuration and the fallback to the reference with one warning;
- :mod:`~seg.kernels.focused_linear.triton.probe`: the self-check a configuration passes before its kernels run;
- :mod:`~seg.kernels.focused_linear.triton.registration`: the ``torch.library`` operator (opaque to
  ``torch.compile``) with its fake and backward;
- :mod:`~seg.kernels.focused_linear.triton.reference_grads`: the reference's output and gradients in closed form
  (the probe's ground truth and the fallback inside the operator);
- :mod:`~seg.kernels.focused_linear.triton.launch`: the launch plan and the raw forward / backward (no checks);
- :mod:`~seg.kernels.focused_linear.triton.kernels`: the ``triton.jit`` kernels;
- :mod:`~seg.kernels.focused_linear.triton.tiles`: the tile configurations the plan chooses from.

Importing this package needs no Triton: without it the kernels are never launched and every call runs the
reference.
"""

from seg.kernels.focused_linear.triton.checked import (
    configuration,
    focused_linear_attention,
    interpreted,
    unavailable,
    verdict,
)

__all__ = ["configuration", "focused_linear_attention", "interpreted", "unavailable", "verdict"]
