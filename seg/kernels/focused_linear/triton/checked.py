"""Focused linear attention through the Triton kernels, checked before they are trusted (the ``triton`` mode).

:func:`focused_linear_attention` is what the dispatch calls. It runs one registered operator
(``torch.ops.seg.focused_linear_attention``, with a fake implementation and its backward registered beside it:
:mod:`~seg.kernels.focused_linear.triton.registration`), so ``torch.compile`` keeps the call as one opaque node
instead of tracing into Triton. Inside the operator, the first call of each configuration (device, dtype, padded
head dim, n == N or n < N, focusing factor) runs the self-check of :mod:`~seg.kernels.focused_linear.triton.probe`;
the kernels run only for configurations that pass it. A missing Triton, an unsupported dtype (float64) or head dim
(> 128), a compile or launch error, or a disagreement: the reference runs instead, forward and backward, with one
warning that says why. The kernels and their launches live in :mod:`~seg.kernels.focused_linear.triton.launch`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from seg.kernels.focused_linear.reference import focused_linear_attention_tokens as reference_tokens
from seg.kernels.focused_linear.triton import launch
from seg.kernels.focused_linear.triton.probe import Config, describe, inverse_temperature, probe, scale_grad
from seg.kernels.focused_linear.triton.reference_grads import reference_with_grads
from seg.kernels.focused_linear.triton.registration import register

__all__ = ["configuration", "focused_linear_attention", "interpreted", "unavailable", "verdict"]

_verdicts: dict[Config, str | None] = {}  # None: the kernels passed the probe for this configuration
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=2)


def interpreted() -> bool:
    """Whether the kernels were defined for Triton's interpreter, which runs them on CPU tensors
    (``TRITON_INTERPRET=1`` before the kernels were imported; for tests)."""
    return launch._INTERPRETED


def unavailable(x: Tensor) -> str | None:
    """Why the kernels cannot run on tensors like ``x`` at all (no Triton, or a device they do not take),
    else None. Never raises."""
    if launch.triton is None:
        return "the triton package is not installed (CPU-only torch wheels ship without it)"
    if x.device.type == "cpu" and not interpreted():
        return "the kernels take CUDA tensors, got cpu ones (TRITON_INTERPRET=1 before importing seg runs them " \
               "through Triton's CPU interpreter)"
    if x.device.type not in ("cpu", "cuda"):
        return f"the kernels take CUDA tensors, got {x.device.type} ones"
    if not launch.triton_available():
        return "triton is installed but finds no CUDA device"
    return None


def configuration(q: Tensor, k: Tensor, num_heads: int, p: float) -> Config:
    """What a verdict is kept for: (device, dtype, padded head dim, whether n == N, focusing factor)."""
    d_pad = launch.pad_head_dim(q.shape[2] // num_heads)
    return Config(str(q.device), q.dtype, d_pad, k.shape[1] == q.shape[1], float(p))


def _unsupported(q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, p: float) -> str | None:
    """Why the kernels cannot take this call at all, or None."""
    reason = unavailable(q)
    if reason is not None:
        return reason
    try:
        launch.check_inputs(q, k, v, scale, num_heads, p)
    except (TypeError, ValueError) as err:
        return f"the kernels do not take this call ({err})"
    return None


def verdict(q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, p: float) -> str | None:
    """None when the kernels run this call, else why the reference runs (probing a new configuration first).
    The probe runs outside no_grad, inference mode and autocast, whatever the caller's modes."""
    reason = _unsupported(q, k, v, scale, num_heads, p)
    if reason is not None:
        return reason
    config = configuration(q, k, num_heads, p)
    if config not in _verdicts:
        with torch.inference_mode(False), torch.autocast(q.device.type, enabled=False):
            _verdicts[config] = probe(config, q.shape[2] // num_heads)
    return _verdicts[config]


def _distrust(q: Tensor, k: Tensor, num_heads: int, p: float, err: Exception) -> str:
    """Record a failure of the kernels on a real call; later calls of its configuration use the reference."""
    config = configuration(q, k, num_heads, p)
    _verdicts[config] = f"the Triton kernels failed for {describe(config)}: {type(err).__name__}: {err}"
    return _verdicts[config]


def _saved_shapes(q: Tensor, k: Tensor, num_heads: int) -> list[tuple[int, ...]]:
    """Shapes of what the forward keeps for the backward: 1 / |y| and s of q and k, KV, k_mean."""
    (B, N, C), n = q.shape, k.shape[1]
    bh, D = B * num_heads, launch.pad_head_dim(C // num_heads)
    return [(B * N,), (B * N,), (B * n,), (B * n,), (bh, D, D), (bh, D)]


def _forward_impl(q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, p: float) -> list[Tensor]:
    """Output (B, N, C) and the backward's saved tensors, by the kernels where trusted, else by the reference
    (then the saved tensors are zeros, and the backward runs the reference too)."""
    reason = verdict(q, k, v, scale, num_heads, p)
    if reason is None:
        try:
            qc, kc, vc = (launch.channels_last_stride(t) for t in (q, k, v))
            return list(launch.forward(qc, kc, vc, inverse_temperature(scale), num_heads, p))
        except Exception as err:  # a launch that fails at a new shape
            reason = _distrust(q, k, num_heads, p, err)
    _warn_once(f"attn_backend 'triton': {reason}; using the reference")
    out = reference_tokens(q, k, v, scale, num_heads, p)
    return [out] + [q.new_zeros(shape, dtype=torch.float32) for shape in _saved_shapes(q, k, num_heads)]


def _backward_impl(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: Tensor, saved: list[Tensor],
                   num_heads: int, p: float) -> list[Tensor]:
    """dL/dq, dL/dk, dL/dv, dL/dscale by the kernels where trusted, else by the reference."""
    if verdict(q, k, v, scale, num_heads, p) is None:
        try:
            qc, kc, vc = (launch.channels_last_stride(t) for t in (q, k, v))
            grads = launch.backward(grad_out, qc, kc, vc, inverse_temperature(scale), tuple(saved), num_heads, p)
            return [*grads[:3], scale_grad(grads[3], scale)]
        except Exception as err:
            _warn_once(f"attn_backend 'triton': {_distrust(q, k, num_heads, p, err)}; using the reference")
    return list(reference_with_grads(grad_out, q, k, v, scale, num_heads, p)[1:])


_operator = register(_forward_impl, _backward_impl, _saved_shapes)


def focused_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, focusing_factor: float
) -> Tensor:
    """Focused linear attention without the DWC term through the Triton kernels, or the reference (with one
    warning) where they cannot be trusted. q (B, N, C), k and v (B, n, C), scale (1, 1, C) -> (B, N, C) in v's
    dtype. One opaque operator call under ``torch.compile``."""
    return _operator(q, k, v, scale, num_heads, float(focusing_factor))
