"""Linear layers whose float32 CPU products run through oneDNN's matmul.

On the project's reference CPU (AMD EPYC, AVX-512) MKL's sgemm, which ``F.linear`` calls, takes its generic
x86 path at about half the machine's peak, while oneDNN's matmul runs the encoders' token-by-channel
products about 2x faster (``benchmarks/linear.py``); on an AVX2-only EPYC the two are on par (0.9-1.4x on
the encoders' shapes). oneDNN's pointwise linear is a private PyTorch
operator, so it is used only after a one-time probe call has run it and matched ``F.linear``; a missing
operator, an error, a wrong result or ``torch.backends.mkldnn.enabled = False`` falls back to ``F.linear``
with one warning. Autocast, ``torch.compile``, other devices and dtypes always take ``F.linear``.
"""

from __future__ import annotations

import warnings
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["Linear", "linear", "linear_gelu", "onednn_linear_available", "set_onednn_linear"]

_switched_on = True
_warned = False


@cache
def _probe() -> str | None:
    """Run the private operator once on a small problem; None when it works, else the reason it does not."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return "torch.ops.mkldnn._linear_pointwise is missing in this torch build"
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=gen) for s in ((3, 5, 8), (6, 8), (6,)))
        got = op(x, w, b, "none", [], "")
        if not torch.allclose(got, F.linear(x, w, b), rtol=1e-4, atol=1e-5):
            return "oneDNN's pointwise linear disagrees with F.linear"
    except Exception as err:  # any failure of a private operator means: do not use it
        return f"oneDNN's pointwise linear failed: {err}"
    return None


def onednn_linear_available() -> bool:
    """Whether the oneDNN path can run now: the probe passed and ``torch.backends.mkldnn.enabled`` is on."""
    global _warned
    reason = _probe()
    if reason is None and not torch.backends.mkldnn.enabled:
        reason = "torch.backends.mkldnn.enabled is False"
    if reason is not None and not _warned:
        _warned = True
        warnings.warn(f"cpu backend: linear layers fall back to F.linear ({reason})", stacklevel=3)
    return reason is None


def set_onednn_linear(enabled: bool) -> None:
    """Turn the oneDNN path on or off for this process (benchmarks compare both)."""
    global _switched_on
    _switched_on = bool(enabled)


def _applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """float32 on CPU, outside autocast and the compiler, with oneDNN probed and switched on."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (
        _switched_on
        and x.device.type == "cpu"
        and x.dim() >= 2
        and x.numel() > 0
        and weight.dim() == 2
        and all(t.dtype == torch.float32 for t in tensors)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and onednn_linear_available()
    )


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None, attr: str = "none", algorithm: str = "") -> Tensor:
    if not (weight.is_contiguous() or weight.t().is_contiguous()):
        weight = weight.contiguous()  # other strides fall off oneDNN's fast kernels (100x slower)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()  # the operator reads the bias as dense: a strided one gives wrong sums
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)


class _OneDNNLinearFn(torch.autograd.Function):
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
    if not _applies(x, weight, bias):
        return F.linear(x, weight, bias)
    if _needs_grad(x, weight, bias):
        return _OneDNNLinearFn.apply(x, weight, bias)
    return _onednn(x, weight, bias)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None = None, approximate: str = "none") -> Tensor:
    """``F.gelu(F.linear(x, weight, bias), approximate=approximate)``; without autograd the GELU runs fused
    into oneDNN's matmul."""
    if approximate in ("none", "tanh") and not _needs_grad(x, weight, bias) and _applies(x, weight, bias):
        return _onednn(x, weight, bias, "gelu", approximate)
    return F.gelu(linear(x, weight, bias), approximate=approximate)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, initialisation and state-dict names) whose forward is :func:`linear`:
    oneDNN for float32 CPU tensors where it is probed and switched on, ``F.linear`` everywhere else."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
