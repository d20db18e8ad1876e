"""Opt-in fast paths behind one switch: ``attn_backend`` of the encoders (and of their YAML ``encoder_kwargs``).

- ``reference``: the readable maths of :mod:`seg.layers`, autograd-differentiable, on any device.
- ``cpu``: for CPU tensors, the closed-form backward, the folded inference and oneDNN linears
  (:mod:`seg.kernels.cpu_attention`, :mod:`seg.kernels.onednn`); the private oneDNN operator is used only
  after a one-time probe call succeeds, with a warning and ``F.linear`` otherwise.
- ``triton``: for CUDA tensors, fused focused-linear-attention kernels, forward and backward
  (:mod:`seg.kernels.triton_focused`); a missing or broken Triton falls back to the reference with a warning.
- ``auto`` (the default): ``cpu`` on CPU tensors, ``triton`` on CUDA tensors, the reference elsewhere,
  decided per call, so a model moved between devices keeps the right path.

Every backend computes what the reference computes (tests compare them); anything a backend does not
cover (a dtype, a device, the compiler or an exporter tracing the model) runs the reference.
"""

from __future__ import annotations

import os
import warnings
from functools import cache
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from seg.kernels import triton_focused
from seg.kernels.cpu_attention import cpu_forward
from seg.kernels.onednn import OneDNNLinear, linear_gelu
from seg.layers.focused_linear import FastPath, FocusedLinearAttention, focused_linear_attention
from seg.layers.mlp import Mlp

__all__ = ["AttnBackend", "BACKENDS", "set_backend", "triton_forward"]

AttnBackend = Literal["auto", "reference", "cpu", "triton"]
BACKENDS: tuple[str, ...] = get_args(AttnBackend)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _triton_interpreted() -> bool:
    """Triton's interpreter runs kernels on CPU tensors (``TRITON_INTERPRET=1``, for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@cache
def _triton_probe(device: str) -> str | None:
    """Run the kernels once on a small problem on ``device`` (compiling them) and compare forward and backward
    with the reference; None when they agree, else the reason not to use them. The first call may come from
    inside ``no_grad``, ``inference_mode`` or autocast: the probe runs outside all three."""
    if not triton_focused.triton_available():
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
    for run, dtype in ((triton_focused.focused_linear_attention_triton, torch.float32),
                       (_reference_tokens, torch.float64)):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v, scale)]
        out = run(*leaves, 2, 3.0)
        out.square().sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results, strict=True):
        want = want.to(got.dtype)
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item()):
            return "the Triton kernels disagree with the reference on this device"
    return None


def _reference_tokens(q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, p: float) -> Tensor:
    """The reference maths on token-layout tensors (B, N, C), for the probe."""
    B, C = q.shape[0], q.shape[2]
    heads = lambda t: t.reshape(B, -1, num_heads, C // num_heads).transpose(1, 2)  # (B, h, N, d)
    return focused_linear_attention(heads(q), heads(k), heads(v), scale, p).transpose(1, 2).reshape(B, -1, C)


def triton_forward(attn: FocusedLinearAttention, x: Tensor, size: tuple[int, int]) -> Tensor | None:
    """The module's forward with the fused Triton attention core (projections, DWC and output in torch).

    The first call on a device probes the kernels against the reference; when Triton is missing, fails or
    disagrees, the reference runs instead, with one warning."""
    if not (x.is_cuda or _triton_interpreted()) or torch.compiler.is_compiling():
        return None
    reason = _triton_probe(str(x.device))
    if reason is not None:
        _warn_once(f"attn_backend 'triton': {reason}; using the reference")
        return None
    q, k, v, kv_size = attn.project(x, size)
    out = triton_focused.focused_linear_attention_triton(q, k, v, attn.scale, attn.num_heads, attn.focusing_factor)
    out = out + attn.rank_restoration(v, kv_size, size)
    return attn.proj_drop(attn.proj(out))


def _auto_forward(attn: FocusedLinearAttention, x: Tensor, size: tuple[int, int]) -> Tensor | None:
    if x.device.type == "cpu":
        return cpu_forward(attn, x, size)
    return triton_forward(attn, x, size) if x.is_cuda else None


class _FusedGeluMlp(Mlp):
    """:class:`~seg.layers.mlp.Mlp` whose fc1 + GELU run as one oneDNN product in CPU inference."""

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if self.dwconv is not None or type(self.act) is not nn.GELU:
            return super().forward(x, size)
        x = linear_gelu(x, self.fc1.weight, self.fc1.bias, self.act.approximate)
        return self.drop(self.fc2(self.drop(x)))


_FAST_PATHS: dict[str, FastPath | None] = {
    "auto": _auto_forward,
    "reference": None,
    "cpu": cpu_forward,
    "triton": triton_forward,
}


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Route every focused linear attention (and, for ``cpu`` / ``auto``, every Linear and MLP) of ``model``
    through ``backend``; parameters and state-dict names are untouched. Returns ``model``."""
    if backend not in _FAST_PATHS:
        raise ValueError(f"attn_backend {backend!r} is not one of {', '.join(BACKENDS)}")
    onednn = backend in ("auto", "cpu")
    for module in model.modules():
        if isinstance(module, FocusedLinearAttention):
            module.fast_path = _FAST_PATHS[backend]
        # swap the class of plain layers in place (as torch.nn.utils.parametrize does): same state, new forward
        if type(module) in (nn.Linear, OneDNNLinear):
            module.__class__ = OneDNNLinear if onednn else nn.Linear
        elif type(module) in (Mlp, _FusedGeluMlp):
            module.__class__ = _FusedGeluMlp if onednn else Mlp
    model.attn_backend = backend
    return model
