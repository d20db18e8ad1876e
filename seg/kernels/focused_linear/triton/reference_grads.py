"""The reference's output and gradients in closed form, without autograd: what the checked Triton path compares
its kernels with (in float64) and runs instead of them, inside its registered operator (where autograd does not
record and ``torch.func`` transforms are unreliable under ``torch.compile``).

The maths is :func:`seg.kernels.focused_linear.reference.focused_linear_attention_tokens`, differentiated by hand
per head on (B, h, T, d) tensors; the kernel, power and norms and their backward are those of
:mod:`seg.kernels.focused_linear.cpu.closed_form` (plain torch operations, any device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from seg.kernels.focused_linear.cpu.closed_form import kernel_power, kernel_power_backward
from seg.kernels.focused_linear.reference import DENOM_EPS
from seg.kernels.precision import at_least_fp32

__all__ = ["reference_with_grads"]


def reference_with_grads(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, p: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Output (B, N, C) and dL/dq, dL/dk, dL/dv, dL/dscale for the upstream gradient ``grad_out``, each in its
    input's dtype; computed in float32 (half inputs) or the inputs' dtype (float32 / float64)."""
    dtypes = [t.dtype for t in (v, q, k, v, scale)]
    work = torch.promote_types(at_least_fp32(q).dtype, scale.dtype)
    q, k, v, grad_out = (t.to(work) for t in (q, k, v, grad_out))
    s_param = scale.to(work)
    (B, N, C), n, h = q.shape, k.shape[1], num_heads
    d = C // h
    inv_temp = F.softplus(s_param).reciprocal().reshape(1, 1, C)
    kq, kk = kernel_power(q, inv_temp, p), kernel_power(k, inv_temp, p)
    a = kk.s / n  # (B, n, 1): phi(k) / n = a g_k
    heads = lambda t: t.reshape(B, t.shape[1], h, d).transpose(1, 2)  # (B, T, C) -> (B, h, T, d)
    tokens = lambda t: t.transpose(1, 2).reshape(B, t.shape[2], C)  # (B, h, T, d) -> (B, T, C)
    g_q, phi, vh = heads(kq.g), heads(kk.g * a), heads(v)
    kv = phi.transpose(-2, -1) @ vh  # (B, h, d, d)
    km = phi.sum(dim=2)  # (B, h, d)
    num = g_q @ kv  # (B, h, N, d)
    rden = ((g_q * km.unsqueeze(2)).sum(-1) + DENOM_EPS / kq.s.reshape(B, 1, N)).reciprocal()  # (B, h, N)
    out = num * rden.unsqueeze(-1)
    grad = heads(grad_out)
    grad_num = grad * rden.unsqueeze(-1)
    grad_den = -(grad * num).sum(-1) * rden.square()  # (B, h, N)
    grad_gq = grad_num @ kv.transpose(-2, -1) + grad_den.unsqueeze(-1) * km.unsqueeze(2)  # (B, h, N, d)
    grad_kv = g_q.transpose(-2, -1) @ grad_num  # (B, h, d, d)
    grad_km = (g_q * grad_den.unsqueeze(-1)).sum(dim=2)  # (B, h, d)
    grad_phi = tokens(vh @ grad_kv.transpose(-2, -1) + grad_km.unsqueeze(2))  # (B, n, C)
    grad_v = tokens(phi @ grad_kv)
    grad_gq = tokens(grad_gq)
    grad_sq = (-DENOM_EPS / kq.s.square()) * grad_den.sum(1).unsqueeze(-1)  # (B, N, 1)
    dot_q = torch.linalg.vecdot(grad_gq, kq.g).unsqueeze(-1)
    grad_q, grad_it_q = kernel_power_backward(kq, grad_gq, dot_q, grad_sq, inv_temp, p)
    dot_k = torch.linalg.vecdot(grad_phi, kk.g).unsqueeze(-1)
    grad_k, grad_it_k = kernel_power_backward(kk, grad_phi, dot_k, dot_k / n, inv_temp, p, grad_scale=a)
    s = s_param.reshape(1, 1, C)
    grad_scale = (grad_it_q + grad_it_k) * (-torch.sigmoid(s) / F.softplus(s).square())  # d(1 / softplus) / ds
    results = (tokens(out), grad_q, grad_k, grad_v, grad_scale.reshape(scale.shape))
    return tuple(t.to(dtype) for t, dtype in zip(results, dtypes, strict=True))
