"""Focused linear attention through the Triton kernels, checked before they are trusted (the ``triton`` mode).

:func:`focused_linear_attention` is what the dispatch calls for CUDA tensors. It runs one registered operator
(``torch.ops.seg.focused_linear_attention``, with a fake implementation and its backward registered beside it),
so ``torch.compile`` keeps the call as one opaque node instead of tracing into Triton. Inside the operator, the
first call of each configuration (device, dtype, padded head dim, n == N or n < N) runs the kernels' forward and
backward on a small problem in that dtype and compares them with the float64 reference; the kernels run only
for configurations that agree. A missing Triton, an unsupported dtype (float64) or head dim (> 128), a compile
or launch error, or a disagreement: the reference runs instead, forward and backward, with one warning that
says why. The kernels and their launches live in :mod:`seg.kernels.focused_linear.triton_ops`.

``torch.library.custom_op`` came with torch 2.4; where it is missing, the same implementation runs through an
autograd function (eager only: a compiled model then traces the reference).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from seg.kernels.focused_linear import triton_ops
from seg.kernels.focused_linear.reference import focused_linear_attention_tokens as reference_tokens
from seg.kernels.focused_linear.triton_fallback import reference_with_grads

__all__ = ["configuration", "focused_linear_attention", "interpreted", "verdict"]

Config = tuple[str, torch.dtype, int, bool]
# relative error (largest absolute error over the largest reference magnitude) the probe accepts, per dtype
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

_verdicts: dict[Config, str | None] = {}  # None: the kernels agreed with the reference for this configuration
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=2)


def interpreted() -> bool:
    """Triton's interpreter runs kernels on CPU tensors (``TRITON_INTERPRET=1``, for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def configuration(q: Tensor, k: Tensor, num_heads: int) -> Config:
    """What the probe is keyed on: (device, dtype, padded head dim, whether n == N)."""
    return str(q.device), q.dtype, triton_ops.pad_head_dim(q.shape[2] // num_heads), k.shape[1] == q.shape[1]


def _unsupported(q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, p: float) -> str | None:
    """Why the kernels cannot take this call at all, or None."""
    if not triton_ops.triton_available():
        return "Triton is missing or cannot run here"
    try:
        triton_ops.check_inputs(q, k, v, scale, num_heads, p)
    except (TypeError, ValueError) as err:
        return f"the kernels do not take this call ({err})"
    return None


def _relative_error(got: Tensor, want: Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _probe(config: Config, p: float) -> str | None:
    """Kernels' forward and backward against the float64 reference on a small problem of ``config``;
    None when every result agrees within the dtype's tolerance, else the reason not to use them."""
    device, dtype, d_pad, same_length = config
    gen = torch.Generator().manual_seed(0)
    h, d, N = 2, d_pad - 3, 37
    n = N if same_length else 12
    q, k, v = (torch.randn(1, t, h * d, generator=gen, dtype=torch.float64).to(device) for t in (N, n, n))
    scale = (torch.randn(1, 1, h * d, generator=gen, dtype=torch.float64) * 0.5).to(device)
    grad_out = torch.randn(1, N, h * d, generator=gen, dtype=torch.float64).to(device)
    q, k, v, grad_out = (t.to(dtype) for t in (q, k, v, grad_out))  # the reference sees the rounded inputs
    try:
        out, *saved = triton_ops.forward(q, k, v, _inverse_temperature(scale), h, p)
        grads = triton_ops.backward(grad_out, q, k, v, _inverse_temperature(scale), tuple(saved), h, p)
        got = (out, *grads[:3], _scale_grad(grads[3], scale))
    except Exception as err:  # a kernel that fails to compile or launch
        return f"the Triton kernels failed for {_describe(config)}: {type(err).__name__}: {err}"
    want = reference_with_grads(grad_out.double(), q.double(), k.double(), v.double(), scale, h, p)
    for name, a, b in zip(("output", "dq", "dk", "dv", "dscale"), got, want, strict=True):
        err = _relative_error(a, b)
        if not err <= TOLERANCE[dtype]:
            return f"the Triton kernels disagree with the float64 reference for {_describe(config)} ({name}: " \
                   f"relative error {err:.1e} > {TOLERANCE[dtype]:.0e})"
    return None


def _describe(config: Config) -> str:
    device, dtype, d_pad, same_length = config
    return f"{device}, {str(dtype).removeprefix('torch.')}, head dim <= {d_pad}, {'n == N' if same_length else 'n < N'}"


def verdict(q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, p: float) -> str | None:
    """None when the kernels run this call, else why the reference runs (probing a new configuration first).
    The probe runs outside no_grad, inference mode and autocast, whatever the caller's modes."""
    reason = _unsupported(q, k, v, scale, num_heads, p)
    if reason is not None:
        return reason
    config = configuration(q, k, num_heads)
    if config not in _verdicts:
        with torch.inference_mode(False), torch.autocast(q.device.type, enabled=False):
            _verdicts[config] = _probe(config, p)
    return _verdicts[config]


def _distrust(q: Tensor, k: Tensor, num_heads: int, err: Exception) -> str:
    """Record a failure of the kernels on a real call; later calls of its configuration use the reference."""
    config = configuration(q, k, num_heads)
    _verdicts[config] = f"the Triton kernels failed for {_describe(config)}: {type(err).__name__}: {err}"
    return _verdicts[config]


def _inverse_temperature(scale: Tensor) -> Tensor:
    return triton_ops.inverse_temperature(scale, scale.numel(), scale.device)


def _scale_grad(grad_inv_temp: Tensor, scale: Tensor) -> Tensor:
    """dL/dscale from dL/d(1 / T): d(1 / softplus(s)) / ds = -sigmoid(s) / softplus(s)^2."""
    s = scale.reshape(-1).to(torch.float32)
    return (-grad_inv_temp * torch.sigmoid(s) / F.softplus(s).square()).reshape(scale.shape).to(scale.dtype)


def _saved_shapes(q: Tensor, k: Tensor, num_heads: int) -> list[tuple[int, ...]]:
    """Shapes of what the forward keeps for the backward: 1 / |y| and s of q and k, KV, k_mean."""
    (B, N, C), n = q.shape, k.shape[1]
    bh, D = B * num_heads, triton_ops.pad_head_dim(C // num_heads)
    return [(B * N,), (B * N,), (B * n,), (B * n,), (bh, D, D), (bh, D)]


def _forward_impl(q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, p: float) -> list[Tensor]:
    """Output (B, N, C) and the backward's saved tensors, by the kernels where trusted, else by the reference
    (then the saved tensors are zeros, and the backward runs the reference too)."""
    reason = verdict(q, k, v, scale, num_heads, p)
    if reason is None:
        try:
            qc, kc, vc = (triton_ops.channels_last_stride(t) for t in (q, k, v))
            return list(triton_ops.forward(qc, kc, vc, _inverse_temperature(scale), num_heads, p))
        except Exception as err:  # a launch that fails at a new shape
            reason = _distrust(q, k, num_heads, err)
    _warn_once(f"attn_backend 'triton': {reason}; using the reference")
    out = reference_tokens(q, k, v, scale, num_heads, p)
    return [out] + [q.new_zeros(shape, dtype=torch.float32) for shape in _saved_shapes(q, k, num_heads)]


def _backward_impl(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: Tensor, saved: list[Tensor],
                   num_heads: int, p: float) -> list[Tensor]:
    """dL/dq, dL/dk, dL/dv, dL/dscale by the kernels where trusted, else by the reference."""
    if verdict(q, k, v, scale, num_heads, p) is None:
        try:
            qc, kc, vc = (triton_ops.channels_last_stride(t) for t in (q, k, v))
            grads = triton_ops.backward(grad_out, qc, kc, vc, _inverse_temperature(scale), tuple(saved),
                                        num_heads, p)
            return [*grads[:3], _scale_grad(grads[3], scale)]
        except Exception as err:
            _warn_once(f"attn_backend 'triton': {_distrust(q, k, num_heads, err)}; using the reference")
    return list(reference_with_grads(grad_out, q, k, v, scale, num_heads, p)[1:])


from seg.kernels.focused_linear.triton_op import register  # noqa: E402  (needs the implementations above)

_operator = register(_forward_impl, _backward_impl, _saved_shapes)


def focused_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, focusing_factor: float
) -> Tensor:
    """Focused linear attention without the DWC term through the Triton kernels, or the reference (with one
    warning) where they cannot be trusted. q (B, N, C), k and v (B, n, C), scale (1, 1, C) -> (B, N, C) in v's
    dtype. One opaque operator call under ``torch.compile``."""
    return _operator(q, k, v, scale, num_heads, float(focusing_factor))
