"""Linear layers whose float32 CPU products run through oneDNN's matmul.

On this project's reference CPU (AMD EPYC, AVX-512) MKL's sgemm, which ``F.linear`` calls, takes its
generic x86 path at about half the machine's peak, while oneDNN's matmul runs the same token-by-channel
products about 2x faster (``benchmarks/linear.py``). :func:`linear` uses oneDNN for float32 on CPU, in
inference and in training (forward and dL/dx; dL/dW is a reduction over tokens, where MKL is the faster);
autocast, ``torch.compile`` (whose CPU backend picks its own kernels), other devices and dtypes run
``F.linear`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

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


def _onednn_applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """float32 on CPU, outside autocast and the compiler, with oneDNN available and switched on."""
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
        and not torch.compiler.is_compiling()
    )


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None, attr: str = "none", algorithm: str = "") -> Tensor:
    if not (weight.is_contiguous() or weight.t().is_contiguous()):
        weight = weight.contiguous()  # other strides fall off oneDNN's fast kernels (100x slower)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b through oneDNN; backward: dL/dx through oneDNN too, dL/dW and dL/db as reductions."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad, weight.t(), None)  # (..., C_in)
        rows = grad.reshape(-1, grad.shape[-1])  # (tokens, C_out)
        if ctx.needs_input_grad[1]:
            grad_w = rows.t() @ x.reshape(-1, x.shape[-1])  # (C_out, C_in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(dim=0)
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., C_in), weight (C_out, C_in) -> (..., C_out)."""
    if not _onednn_applies(x, weight, bias):
        return F.linear(x, weight, bias)
    if _needs_grad(x, weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn(x, weight, bias)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None = None, approximate: str = "none") -> Tensor:
    """``F.gelu(F.linear(x, weight, bias), approximate=approximate)``; without autograd the GELU runs fused
    into oneDNN's matmul."""
    if approximate in ("none", "tanh") and _onednn_applies(x, weight, bias) and not _needs_grad(x, weight, bias):
        return _onednn(x, weight, bias, "gelu", approximate)
    return F.gelu(linear(x, weight, bias), approximate=approximate)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) whose forward is :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
