"""Which implementation of focused linear attention one call runs: the one dispatch of the operation.

:class:`~seg.model.layers.focused_linear.FocusedLinearAttention` asks :func:`select_mode` in its ``forward``
and runs the answer:

- ``reference``: the readable maths of :mod:`seg.kernels.focused_linear.reference` (autograd, any device, what exporters
  and the compiler trace on CPU);
- ``cpu``: the closed-form backward of :mod:`seg.kernels.focused_linear.cpu` (float32 / float64 CPU tensors);
- ``cpu_inference``: the same without autograd, with the projections and the kernel folded into one pass
  (global keys, no autocast);
- ``triton``: the fused kernels of :mod:`seg.kernels.focused_linear.triton` (CUDA tensors), which check
  themselves on first use per configuration and otherwise run the reference with one warning.

``attn_backend`` (an encoder argument, also in YAML ``encoder_kwargs``) limits the choice: ``reference``,
``cpu``, ``triton``, or ``auto`` (the default: ``cpu`` on CPU tensors, ``triton`` on CUDA tensors). A backend
asked for where it cannot run (``triton`` without Triton or on CPU tensors, ``cpu`` on CUDA tensors) runs the
reference with one warning that says why.
"""

from __future__ import annotations

import warnings
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from seg.kernels.focused_linear import cpu, triton
from seg.kernels.focused_linear.cpu import fused_inference
from seg.kernels.focused_linear.reference import focused_linear_attention_tokens
from seg.kernels.focused_linear.reference import rank_restoration as reference_rank_restoration
from seg.kernels.tracing import exporting

__all__ = [
    "AttnBackend",
    "BACKENDS",
    "Mode",
    "attention",
    "check_backend",
    "fused_inference",
    "rank_restoration",
    "select_mode",
    "set_backend",
]

AttnBackend = Literal["auto", "reference", "cpu", "triton"]
BACKENDS: tuple[str, ...] = get_args(AttnBackend)
Mode = Literal["reference", "cpu", "cpu_inference", "triton"]

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def check_backend(backend: str) -> str:
    """``backend`` itself, or a ValueError naming the valid ones."""
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend {backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


def select_mode(backend: str, x: Tensor, global_keys: bool) -> Mode:
    """The implementation a call on tokens ``x`` runs under ``attn_backend`` ``backend``.

    Args:
        backend: ``auto``, ``reference``, ``cpu`` or ``triton``.
        x: the layer's input tokens (B, N, C): their device, dtype and whether autograd records them decide.
        global_keys: keys and values come from all N tokens (no spatial reduction), so the folded CPU
            inference applies.
    """
    if backend == "reference":
        return "reference"
    if x.device.type == "cpu" and backend in ("auto", "cpu"):
        if x.dtype not in (torch.float32, torch.float64) or torch.compiler.is_compiling():
            return "reference"
        if global_keys and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"):
            return "cpu_inference"
        return "cpu"
    if backend == "cpu":
        _warn_once(f"attn_backend 'cpu' asked for on {x.device.type} tensors: the CPU path takes CPU tensors only; "
                   "using the reference")
        return "reference"
    reason = triton.unavailable(x)
    if reason is None:
        return "triton"
    if backend == "triton":
        _warn_once(f"triton requested but unavailable: {reason}; using the reference")
    elif x.is_cuda:
        _warn_once(f"attn_backend 'auto' on CUDA tensors: the Triton kernels are unavailable ({reason}); "
                   "using the reference")
    return "reference"


def attention(
    q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, focusing_factor: float, mode: Mode
) -> Tensor:
    """Focused linear attention without the DWC term on token-layout tensors, through ``mode``.

    q (B, N, C), k with the positional encoding and v (B, n, C), heads as contiguous channel blocks;
    scale (1, 1, C). Returns (B, N, C) in v's dtype.
    """
    if mode == "triton":
        return triton.focused_linear_attention(q, k, v, scale, num_heads, focusing_factor)
    if mode in ("cpu", "cpu_inference"):
        return cpu.focused_linear_attention(q, k, v, scale, num_heads, focusing_factor)
    return focused_linear_attention_tokens(q, k, v, scale, num_heads, focusing_factor)


def rank_restoration(
    v: Tensor, kv_size: tuple[int, int], size: tuple[int, int], weight: Tensor, bias: Tensor | None,
    num_heads: int, mode: Mode,
) -> Tensor:
    """The DWC term through ``mode``: v (B, n, C) on the (H', W') key grid -> (B, N, C) on the (H, W) grid.

    An exported graph takes the CPU form whatever the mode (the same values: the d filters repeated per head,
    one depthwise conv over all C channels of the token map): the reference's (B * h, d, H, W) maps cost a
    transpose before and after the conv, and ONNX Runtime reorders to and from its blocked layout around it,
    where the C-channel map is a channels-last view of the tokens that its reorders read directly."""
    if mode in ("cpu", "cpu_inference") or exporting():
        return cpu.rank_restoration(v, kv_size, size, weight, bias, num_heads)
    return reference_rank_restoration(v, kv_size, size, weight, bias, num_heads)


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set ``attn_backend`` on every module of ``model`` that has one (encoders and attention layers);
    parameters and state-dict names are untouched. Returns ``model``."""
    check_backend(backend)
    for module in model.modules():
        if hasattr(module, "attn_backend"):
            module.attn_backend = backend
    return model
