"""Focused linear attention through the Triton kernels, checked before they are trusted (the ``triton`` mode).

:func:`focused_linear_attention` is what the dispatch calls for CUDA tensors. The first call on a device runs
the kernels on a small problem and compares forward and backward with the reference; when Triton is missing,
fails or disagrees, the reference runs instead, with one warning. The kernels and their launches live in
:mod:`seg.kernels.focused_linear.triton_ops` and :mod:`seg.kernels.focused_linear.triton_kernels`.
"""

from __future__ import annotations

import os
import warnings
from functools import cache

import torch
from torch import Tensor

from seg.kernels.focused_linear import triton_ops
from seg.kernels.focused_linear.reference import focused_linear_attention_tokens as reference_tokens

__all__ = ["focused_linear_attention", "interpreted"]

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def interpreted() -> bool:
    """Triton's interpreter runs kernels on CPU tensors (``TRITON_INTERPRET=1``, for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@cache
def _probe(device: str) -> str | None:
    """Run the kernels once on a small problem on ``device`` (compiling them) and compare forward and backward
    with the reference; None when they agree, else the reason not to use them. The first call may come from
    inside ``no_grad``, ``inference_mode`` or autocast: the probe runs outside all three."""
    if not triton_ops.triton_available():
        return "Triton is missing or cannot run here"
    device_type = torch.device(device).type
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
            return _compare_with_reference(device)
    except Exception as err:  # a kernel that fails to compile or launch: use the reference
        return f"the Triton kernels failed: {type(err).__name__}: {err}"


def _compare_with_reference(device: str) -> str | None:
    """Forward and backward of the kernels (float32) and of the reference (float64, so that TF32 matmul
    settings cannot make the comparison fail) on one small problem; None when they agree."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 37, 64, generator=gen).to(device) for _ in range(3))
    scale = (torch.randn(1, 1, 64, generator=gen) * 0.5).to(device)
    results = []
    for run, dtype in ((triton_ops.focused_linear_attention_triton, torch.float32), (reference_tokens, torch.float64)):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v, scale)]
        out = run(*leaves, 2, 3.0)
        out.square().sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results, strict=True):
        want = want.to(got.dtype)
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item()):
            return "the Triton kernels disagree with the reference on this device"
    return None


def focused_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, focusing_factor: float
) -> Tensor:
    """Focused linear attention without the DWC term through the Triton kernels, or the reference (with one
    warning) where they cannot be trusted. q (B, N, C), k and v (B, n, C), scale (1, 1, C) -> (B, N, C)."""
    if not torch.compiler.is_compiling():
        reason = _probe(str(q.device))
        if reason is None:
            return triton_ops.focused_linear_attention_triton(q, k, v, scale, num_heads, focusing_factor)
        _warn_once(f"attn_backend 'triton': {reason}; using the reference")
    return reference_tokens(q, k, v, scale, num_heads, focusing_factor)
