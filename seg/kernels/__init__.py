"""Fast paths beside the readable maths of :mod:`seg.model.layers`, one folder per operation (tensors in, tensors out).

- :mod:`seg.kernels.focused_linear`: focused linear attention's dispatch (``attn_backend`` ``auto`` /
  ``reference`` / ``cpu`` / ``triton``), its CPU path (closed-form backward, folded inference) and its Triton
  kernels (CUDA; checked against the reference before they are trusted).
- :mod:`seg.kernels.onednn`: float32 CPU linear layers through oneDNN's matmul (the private operator behind a
  probe, ``F.linear`` otherwise); the encoders build their linear layers from :class:`~seg.kernels.onednn.Linear`.

Every fast path computes what the reference computes (tests compare them).
"""

from seg.kernels.focused_linear import BACKENDS, AttnBackend, set_backend
from seg.kernels.onednn import Linear, linear, linear_gelu

__all__ = ["BACKENDS", "AttnBackend", "Linear", "linear", "linear_gelu", "set_backend"]
