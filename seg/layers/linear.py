"""Linear layers whose float32 CPU inference runs through oneDNN's matmul.

On this project's reference CPU (AMD EPYC, AVX-512) MKL's sgemm, which ``F.linear`` calls, takes its
generic x86 path at about half the machine's peak, while oneDNN's matmul runs the same token-by-channel
products about 2x faster (``benchmarks/linear.py``). :func:`linear` uses oneDNN where it computes exactly
what ``F.linear`` would and nothing needs a gradient; training, autocast, ``torch.compile`` (whose CPU
backend picks its own kernels), other devices and dtypes run ``F.linear`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Linear", "linear", "linear_gelu", "onednn_linear_available", "set_onednn_linear"]

_enabled = True


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN and its pointwise-linear operator."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_AVAILABLE = onednn_linear_available()


def set_onednn_linear(enabled: bool) -> None:
    """Turn the oneDNN path of :func:`linear` on or off for this process (benchmarks compare both)."""
    global _enabled
    _enabled = bool(enabled)


def _use_onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (
        _enabled
        and _AVAILABLE
        and x.device.type == "cpu"
        and x.dim() >= 2
        and x.numel() > 0
        and weight.dim() == 2
        and all(t.dtype == torch.float32 for t in tensors)
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and not torch.compiler.is_compiling()
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., C_in), weight (C_out, C_in) -> (..., C_out)."""
    if _use_onednn(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None = None, approximate: str = "none") -> Tensor:
    """``F.gelu(F.linear(x, weight, bias), approximate=approximate)``, the GELU fused into oneDNN's matmul."""
    if _use_onednn(x, weight, bias) and approximate in ("none", "tanh"):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], approximate)
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) whose forward is :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
