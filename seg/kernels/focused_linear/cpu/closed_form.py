"""Closed-form forward and backward passes of focused linear attention for the ``cpu`` backend.

Everything here computes exactly what the reference functions in :mod:`seg.kernels.focused_linear.reference`
compute (tests compare them in float64); the closed-form backwards make fewer passes over memory and
allocate fewer temporaries than autograd does through the same chain of element-wise operations, which is
what pays on a CPU with few cores. On a GPU the reference (or the ``triton`` backend) runs instead: the
single-image oneDNN products and the per-image depthwise weight gradient here are CPU trade-offs.
All inputs are float32 or float64: callers run these outside autocast.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from seg.kernels.depthwise import DepthwiseConv, depthwise_conv_same
from seg.kernels.focused_linear.reference import DENOM_EPS, KERNEL_EPS
from seg.kernels.onednn import linear


class KernelPower(NamedTuple):
    """The focused kernel of one input, f_p(y) = s * g with g = u^p and u = y / |y|, plus its saved state."""

    relu: Tensor  # ReLU(x) (B, N, C)
    u: Tensor  # y / |y| (B, N, C)
    u_pm1: Tensor  # u^(p-1) (B, N, C), so that g = u_pm1 * u
    g: Tensor  # u^p (B, N, C)
    norm_y: Tensor  # |y| (B, N, 1)
    norm_g: Tensor  # |g| (B, N, 1), >= C^(-p/2)
    s: Tensor  # |y| / |g| (B, N, 1)


def kernel_power(x: Tensor, inv_temp: Tensor, p: float) -> KernelPower:
    """g = (y / |y|)^p and s = |y| / |g| for y = (ReLU(x) + eps) / T, so that f_p(y) = s * g.

    Powering the unit vector keeps every value bounded (u, g in (0, 1], |g| >= C^(-p/2)): nothing under-
    or overflows in float32, whatever the scale of y (a token whose channels are all <= 0 has y = eps / T).
    x: (B, N, C); inv_temp: 1 / T, (1, 1, C).
    """
    relu = F.relu(x)
    y = torch.addcmul(inv_temp * KERNEL_EPS, relu, inv_temp)  # (ReLU(x) + eps) / T
    norm_y = torch.linalg.vector_norm(y, dim=-1, keepdim=True)  # (B, N, 1)
    u = y.mul_(norm_y.reciprocal())
    u_pm1 = u.pow(p - 1)
    g = u_pm1 * u
    norm_g = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    return KernelPower(relu, u, u_pm1, g, norm_y, norm_g, norm_y / norm_g)


def kernel_power_inference(x: Tensor, inv_temp: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """g and s of :func:`kernel_power` without keeping anything for a backward pass (one buffer, in place)."""
    y = torch.addcmul(inv_temp * KERNEL_EPS, F.relu(x), inv_temp)
    norm_y = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    g = y.mul_(norm_y.reciprocal()).pow_(p)
    return g, norm_y / torch.linalg.vector_norm(g, dim=-1, keepdim=True)


def kernel_power_backward(
    kp: KernelPower, grad_g: Tensor, grad_g_dot_g: Tensor, grad_s: Tensor, inv_temp: Tensor, p: float,
    grad_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """dL/dx and dL/d(1/T) of :func:`kernel_power`, given G = dL/dg = grad_scale * grad_g and S = dL/ds.

    With n = |y|: dL/dy = [p u^(p-1) (G - S s g / |g|^2) + u ((p + 1) S s - p G.g)] / n, then
    dL/dx = dL/dy / T where x > 0, and dL/d(1/T) = sum over tokens of dL/dy (ReLU(x) + eps).
    ``grad_g`` is overwritten. ``grad_g_dot_g`` is grad_g . g per token (B, N, 1); ``grad_scale`` a
    positive per-token factor (B, N, 1) of the true G, folded into the per-token scalars.
    """
    sigma = 1.0 if grad_scale is None else grad_scale
    ss = grad_s * kp.s  # (B, N, 1)
    radial = (p + 1) * ss - p * sigma * grad_g_dot_g  # (B, N, 1)
    t = grad_g.addcmul_(kp.g, -(ss / kp.norm_g.square()) / sigma)  # (G - S s g / |g|^2) / sigma
    t.mul_(kp.u_pm1)
    grad_y = (kp.u * (radial / kp.norm_y)).addcmul_(t, (p * sigma) / kp.norm_y)  # (B, N, C)
    token_dims = tuple(range(grad_y.dim() - 1))
    grad_inv_temp = torch.linalg.vecdot(grad_y, kp.relu, dim=token_dims[-1]).sum(dim=token_dims[:-1])
    grad_inv_temp = (grad_inv_temp + KERNEL_EPS * grad_y.sum(dim=token_dims)).view_as(inv_temp)
    grad_x = torch.ops.aten.threshold_backward(grad_y.mul_(inv_temp), kp.relu, 0)  # ReLU's gate: x > 0
    return grad_x, grad_inv_temp


def heads(t: Tensor, num_heads: int) -> Tensor:
    """(B, T, C) tokens -> (B, h, T, d) per-head view (heads are contiguous channel blocks; no copy)."""
    B, T, C = t.shape
    return t.view(B, T, num_heads, C // num_heads).transpose(1, 2)


def tokens(t: Tensor) -> Tensor:
    """(B, h, T, d) per-head tensor -> (B, T, C) tokens (a copy unless h = 1)."""
    B, h, T, d = t.shape
    return t.transpose(1, 2).reshape(B, T, h * d)


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for (B, h, N, K) @ (B, h, K, M) -> (B, h, N, M).

    With one image and one head, a linear layer (oneDNN on CPU, see :mod:`seg.kernels.onednn`) with b, a
    small K x M summary, copied to a dense weight (oneDNN's fast kernels want one).
    """
    if a.shape[0] * a.shape[1] == 1:
        weight = b[0, 0].transpose(0, 1).contiguous()  # (M, K)
        return linear(a[0, 0], weight, None)[None, None]
    return a @ b


def _summaries(phi_k: Tensor, v: Tensor, h: int) -> Tensor:
    """Per-head [KV | k_mean] = [sum_j phi_k,j v_j^T | sum_j phi_k,j]: (B, n, C), (B, n, C) -> (B, h, d, d + 1)."""
    k4 = heads(phi_k, h)  # (B, h, n, d)
    return torch.cat([k4.transpose(-2, -1) @ heads(v, h), k4.sum(dim=2).unsqueeze(-1)], dim=-1)


def _attend(g_q: Tensor, s_q: Tensor, phi_k: Tensor, v: Tensor, h: int) -> tuple[Tensor, Tensor, Tensor]:
    """out = (g_q . KV) / (g_q . k_mean + eps / s_q) per head, plus what the backward needs.

    g_q (B, N, C), s_q (B, N, 1), phi_k = phi(k) / n (B, n, C), v (B, n, C) -> out (B, N, C), the per-head
    summary [KV | k_mean] (B, h, d, d + 1) and 1 / denominator (B, h, N, 1). Numerator and denominator come
    out of one product per head.
    """
    B, N, C = g_q.shape
    d = C // h
    kvm = _summaries(phi_k, v, h)  # (B, h, d, d + 1)
    num_den = _matmul(heads(g_q, h), kvm)  # (B, h, N, d + 1): numerator | denominator
    rden = (num_den[..., d:] + (DENOM_EPS / s_q).view(B, 1, N, 1)).reciprocal_()  # (B, h, N, 1)
    return tokens(num_den[..., :d].mul_(rden)), kvm, rden


def focused_tokens_inference(q: Tensor, k: Tensor, v: Tensor, inv_temp: Tensor, num_heads: int, p: float) -> Tensor:
    """:class:`FocusedTokens`' forward for inference: same maths, nothing kept, fewer buffers."""
    g_q, s_q = kernel_power_inference(q, inv_temp, p)
    g_k, s_k = kernel_power_inference(k, inv_temp, p)
    phi_k = g_k.mul_(s_k / k.shape[1])  # (B, n, C)
    return _attend(g_q, s_q, phi_k, v, num_heads)[0]


def _attend_into(g_q: Tensor, eps_q: Tensor, phi_k: Tensor, v: Tensor, num_heads: int, acc: Tensor) -> Tensor:
    """acc += per head (g_q . KV) / (g_q . k_mean + eps_q), KV = sum_j phi_k,j v_j^T, k_mean = sum_j phi_k,j.

    g_q: any positive per-token multiple of the queries' focused kernel (B, N, C), a view; eps_q: the
    normaliser's eps in that scale (B, N, 1); phi_k: phi(k) / n (B, n, C); v (B, n, C); acc (B, N, C),
    contiguous.
    """
    B, N, C = g_q.shape
    h, d = num_heads, C // num_heads
    kvm = _summaries(phi_k, v, h)  # (B, h, d, d + 1)
    num_den = _matmul(heads(g_q, h), kvm)  # (B, h, N, d + 1): numerator | denominator
    rden = (num_den[..., d:] + eps_q.view(B, 1, N, 1)).reciprocal_()  # (B, h, N, 1)
    heads(acc, h).addcmul_(num_den[..., :d], rden)
    return acc


def focused_attention_into(y_qk: Tensor, v: Tensor, num_heads: int, p: float, acc: Tensor) -> Tensor:
    """acc += focused linear attention, for inference from the kernel inputs of q and k stacked.

    y_qk: y = (ReLU(x) + eps) / T of the queries and keys of the same N tokens, (B, N, 2, C), float32 or
    float64, overwritten; v: values (B, N, C); acc: (B, N, C), contiguous, e.g. the DWC term. Same maths
    as :func:`focused_tokens_inference`, with one pass per step for q and k together. Powers the unit
    vectors (every value in (0, 1]): nothing under- or overflows, whatever the scale of y.
    """
    N = y_qk.shape[1]
    norm_y = torch.linalg.vector_norm(y_qk, dim=-1, keepdim=True)  # (B, N, 2, 1)
    g = y_qk.mul_(norm_y.reciprocal()).pow_(p)  # u^p, every value in (0, 1]
    s = norm_y.div_(torch.linalg.vector_norm(g, dim=-1, keepdim=True))  # (B, N, 2, 1): f_p = s * g
    phi_k = g[:, :, 1].mul_(s[:, :, 1] / N)  # phi(k) / N (B, N, C)
    return _attend_into(g[:, :, 0], DENOM_EPS / s[:, :, 0], phi_k, v, num_heads, acc)


def focused_attention_into_direct(y_qk: Tensor, v: Tensor, num_heads: int, p: float, acc: Tensor) -> Tensor | None:
    """:func:`focused_attention_into` with one pass fewer over (B, N, 2, C): it powers y itself.

    f_p(y) = |y| y^p / |y^p|, and the queries enter numerator and denominator linearly, so y_q^p serves as
    their direction with the eps scaled to eps |y_q^p| / |y_q|. Returns None, leaving ``acc`` untouched, when
    y^p or its norm leaves the floating-point range (``y_qk`` is overwritten either way: the caller rebuilds
    it and runs :func:`focused_attention_into`).
    """
    N = y_qk.shape[1]
    norm_y = torch.linalg.vector_norm(y_qk, dim=-1, keepdim=True)  # (B, N, 2, 1)
    yp = y_qk.pow_(p)
    norm_yp = torch.linalg.vector_norm(yp, dim=-1, keepdim=True)  # (B, N, 2, 1)
    lowest, highest = torch.aminmax(norm_yp)  # one reduction; NaN fails both comparisons
    if not (lowest.item() > 0 and highest.item() < math.inf):
        return None
    phi_k = yp[:, :, 1].mul_(norm_y[:, :, 1] / norm_yp[:, :, 1] / N)  # phi(k) / N = |y| y^p / |y^p| / N
    eps_q = DENOM_EPS * norm_yp[:, :, 0] / norm_y[:, :, 0]  # (B, N, 1)
    return _attend_into(yp[:, :, 0], eps_q, phi_k, v, num_heads, acc)


class FocusedTokens(torch.autograd.Function):
    """Focused linear attention on token-layout tensors (without the DWC), forward and closed-form backward.

    Forward, per head: out = (g_q . KV) / (g_q . k_mean + eps / s_q), with phi(k) = s_k g_k,
    KV = sum_j phi(k_j) v_j^T / n and k_mean = sum_j phi(k_j) / n. The per-token factor s_q of f_p
    cancels except at the eps. The normaliser rides along as one extra column of each head's summary, so
    numerator and denominator come out of a single product (and go back through one in the backward).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, inv_temp: Tensor, num_heads: int, p: float) -> Tensor:
        kq, kk = kernel_power(q, inv_temp, p), kernel_power(k, inv_temp, p)
        a = kk.s / k.shape[1]  # (B, n, 1): phi(k) / n = a * g_k
        phi_k = kk.g * a  # (B, n, C)
        out, kvm, rden = _attend(kq.g, kq.s, phi_k, v, num_heads)
        ctx.save_for_backward(*kq, *kk, a, phi_k, v, kvm, rden, out, inv_temp)
        ctx.num_heads, ctx.p = num_heads, p
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, None, None]:
        saved = ctx.saved_tensors
        kq, kk = KernelPower(*saved[:7]), KernelPower(*saved[7:14])
        a, phi_k, v, kvm, rden, out, inv_temp = saved[14:]
        h, p = ctx.num_heads, ctx.p
        B, N, C = out.shape
        d = C // h
        G = heads(grad_out.contiguous(), h)  # (B, h, N, d)
        # dL/d[num | den], written side by side so that one product per head carries both back
        grad_nd = torch.empty(B, h, N, d + 1, dtype=out.dtype, device=out.device)
        torch.mul(G, rden, out=grad_nd[..., :d])
        grad_den = torch.linalg.vecdot(G, heads(out, h)).unsqueeze(-1).mul_(rden).neg_()  # (B, h, N, 1)
        grad_nd[..., d:] = grad_den
        grad_gq = tokens(_matmul(grad_nd, kvm.transpose(-2, -1)))  # (B, N, C)
        grad_kvm = heads(kq.g, h).transpose(-2, -1) @ grad_nd  # (B, h, d, d + 1)
        grad_kv, grad_km = grad_kvm[..., :d], grad_kvm[..., d:]  # (B, h, d, d), (B, h, d, 1)
        grad_phi = tokens(torch.add(_matmul(heads(v, h), grad_kv.transpose(-2, -1)), grad_km.transpose(-2, -1)))
        grad_v = tokens(_matmul(heads(phi_k, h), grad_kv))  # (B, n, C)
        grad_sq = (-DENOM_EPS / kq.s.square()) * grad_den.sum(dim=1)  # (B, N, 1)
        # dL/dg_q . g_q = sum over heads of dL/d[num | den] . [num | den] = -(eps / s_q) sum_h dL/dden: g_q's
        # scale cancels but at the eps, so this needs no pass over (B, N, C)
        dot_q = grad_sq * kq.s  # (B, N, 1)
        grad_q, grad_it_q = kernel_power_backward(kq, grad_gq, dot_q, grad_sq, inv_temp, p)
        # phi_k = a g_k with a = s_k / n: dL/dg_k = a dL/dphi, dL/ds_k = dL/dphi . g_k / n
        dot_k = torch.linalg.vecdot(grad_phi, kk.g).unsqueeze(-1)
        n = phi_k.shape[1]
        grad_k, grad_it_k = kernel_power_backward(kk, grad_phi, dot_k, dot_k / n, inv_temp, p, grad_scale=a)
        return grad_q, grad_k, grad_v, grad_it_q + grad_it_k, None, None


__all__ = [
    "DepthwiseConv",
    "FocusedTokens",
    "KernelPower",
    "depthwise_conv_same",
    "focused_attention_into",
    "focused_attention_into_direct",
    "focused_tokens_inference",
    "heads",
    "kernel_power",
    "kernel_power_backward",
    "kernel_power_inference",
    "tokens",
]
