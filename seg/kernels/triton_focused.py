"""Focused linear attention (FLatten) as fused Triton kernels, forward and backward.

The maths is that of :func:`seg.kernels.cpu_attention.focused_linear_attention_tokens` (without the DWC term),
on token-layout tensors q (B, N, C), k and v (B, n, C), heads as contiguous channel blocks (C = h * d):

    y = (ReLU(x) + eps) / T,  T = softplus(scale)      per channel
    u = y / |y|,  g = u^p,  s = |y| / |g|              |.|: L2 norm over all C channels of a token
    phi(x) = s * g                                     the focused kernel f_p(y): direction powered, norm kept
    KV = sum_j phi(k_j) v_j^T / n,  k_mean = sum_j phi(k_j) / n                      per head, (d, d) and (d,)
    out_i = (g_qi . KV) / (g_qi . k_mean + eps / s_qi)                               per head

The per-token factor s_q of phi(q) cancels except at the eps, and the mean (divide by n) keeps the published
fp16-safe normalisation. Powering the unit vector u keeps every value of g in (0, 1], whatever the input scale.
Everything runs in float32 inside the kernels; inputs may be float32, float16 or bfloat16.

Kernels (``bh`` = one (image, head) pair; "split" = a contiguous range of token blocks):

forward
    ``_row_stats_kernel``   grid (token blocks,)        1 / |y| and s per token, two sweeps over the C channels
    ``_summary_kernel``     grid (B * h, splits over n)  KV and k_mean partial sums, phi(k) on the fly, tl.dot
    ``_apply_kernel``       grid (B * h, blocks of N)    g_q on the fly, numerator (tl.dot), normaliser, division
backward
    ``_query_grad_summary_kernel``  grid (B * h, splits over N)  dL/dKV, dL/dk_mean partial sums, plus per head
                                    and query token dL/dg_q . g_q and dL/ds_q
    ``_key_grad_kernel``            grid (B * h, blocks of n)    dL/dv, and per head and key token dL/dphi_k . g_k
    ``_input_grad_kernel``          grid (B * h, token blocks)   dL/dq or dL/dk through the power and the norms,
                                    plus per-block partial sums of dL/d(1 / T)

Torch glue only sums the small partial results (over splits, heads of a token, blocks) and applies softplus.
The backward of the power, with G = dL/dg and S = dL/ds of one token
(as in :func:`seg.kernels.cpu_focused.kernel_power_backward`):

    dL/dy = [p u^(p-1) (G - S s g / |g|^2) + u ((p + 1) S s - p G . g)] / |y|
    dL/dx = dL/dy / T where x > 0,   dL/d(1 / T) = sum over tokens of dL/dy (ReLU(x) + eps)

Triton reads ``TRITON_INTERPRET`` when the kernels are defined, i.e. when this module is imported: set it to 1
before the import to run the kernels on CPU tensors through Triton's interpreter (slow; for tests).
"""

import contextlib
import os
import types

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from seg.layers.focused_linear import DENOM_EPS, KERNEL_EPS

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels below are then plain, never launched functions
    triton = None
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)

__all__ = ["focused_linear_attention_triton", "triton_available"]

MAX_HEAD_DIM = 128
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_KERNEL_EPS = tl.constexpr(KERNEL_EPS)
_DENOM_EPS = tl.constexpr(DENOM_EPS)


def _jit(fn):
    """``triton.jit`` when triton is installed, else the function unchanged."""
    return fn if triton is None else triton.jit(fn)


# whether the kernels of this module were defined for Triton's CPU interpreter (triton < 3.3 has no knobs)
_INTERPRETED = triton is not None and (
    bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else os.environ.get("TRITON_INTERPRET") == "1"
)


def triton_available() -> bool:
    """Whether the kernels can run: triton is installed and either a CUDA device is present or the kernels
    were defined for the interpreter (``TRITON_INTERPRET=1`` when this module was imported). Never raises."""
    try:
        return triton is not None and (_INTERPRETED or torch.cuda.is_available())
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------------------------
# kernels


@_jit
def _power(u, P: tl.constexpr, P_INT: tl.constexpr):
    # u^(p-1) and u^p for u in [0, 1]: repeated products for a small integer p (P_INT > 0), exp2 / log2 otherwise
    if P_INT > 0:
        u_pm1 = u * 0.0 + 1.0
        for _ in tl.static_range(P_INT - 1):
            u_pm1 = u_pm1 * u
    else:
        u_pm1 = tl.exp2((P - 1.0) * tl.log2(u))
    return u_pm1, u_pm1 * u


@_jit
def _kernel_tile(
    x_ptr, r_ptr, inv_ny_ptr, b, head, t0, T, C, d,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, P: tl.constexpr, P_INT: tl.constexpr,
):
    # one head's channels of BLOCK tokens from t0 of image b: x (raw, fp32), ReLU(x), u, u^(p-1), g = u^p,
    # each (BLOCK, D_PAD) and zero outside the valid tokens / channels, plus the tile's mask and token indices
    rows = t0 + tl.arange(0, BLOCK)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < T
    col_ok = cols < d
    mask = row_ok[:, None] & col_ok[None, :]
    offs = (b * T + rows).to(tl.int64)[:, None] * C + (head * d + cols)[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + head * d + cols, mask=col_ok, other=0.0)
    inv_ny = tl.load(inv_ny_ptr + b * T + rows, mask=row_ok, other=0.0)
    relu = tl.maximum(x, 0.0)
    u = tl.where(mask, (relu + _KERNEL_EPS) * r[None, :] * inv_ny[:, None], 0.0)
    u_pm1, g = _power(u, P, P_INT)
    u_pm1 = tl.where(mask, u_pm1, 0.0)
    g = tl.where(mask, g, 0.0)
    return x, relu, u, u_pm1, g, mask, rows


@_jit
def _load_tile(ptr, b, head, t0, T, C, d, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
    # one head's channels of BLOCK tokens as float32 (BLOCK, D_PAD), zero outside
    rows = t0 + tl.arange(0, BLOCK)
    cols = tl.arange(0, D_PAD)
    mask = (rows < T)[:, None] & (cols < d)[None, :]
    offs = (b * T + rows).to(tl.int64)[:, None] * C + (head * d + cols)[None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@_jit
def _store_tile(ptr, value, b, head, t0, T, C, d, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
    # store a (BLOCK, D_PAD) tile into one head's channels, cast to the buffer's dtype
    rows = t0 + tl.arange(0, BLOCK)
    cols = tl.arange(0, D_PAD)
    mask = (rows < T)[:, None] & (cols < d)[None, :]
    offs = (b * T + rows).to(tl.int64)[:, None] * C + (head * d + cols)[None, :]
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@_jit
def _load_square(ptr, bh, D_PAD: tl.constexpr):
    # the (D_PAD, D_PAD) float32 matrix of one (image, head) pair
    i = tl.arange(0, D_PAD)
    return tl.load(ptr + bh * D_PAD * D_PAD + i[:, None] * D_PAD + i[None, :])


@_jit
def _row_stats_kernel(
    x_ptr, r_ptr, inv_ny_ptr, s_ptr, R, C,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, P: tl.constexpr, P_INT: tl.constexpr,
):
    # per token of x (R, C): 1 / |y| and s = |y| / |g|
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    base = rows.to(tl.int64)[:, None] * C
    sum_y2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + cols, mask=col_ok, other=0.0)
        y = tl.where(mask, (tl.maximum(x, 0.0) + _KERNEL_EPS) * r[None, :], 0.0)
        sum_y2 += tl.sum(y * y, axis=1)
    inv_ny = tl.where(row_ok, 1.0 / tl.sqrt_rn(tl.where(row_ok, sum_y2, 1.0)), 0.0)
    sum_g2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + cols, mask=col_ok, other=0.0)
        u = tl.where(mask, (tl.maximum(x, 0.0) + _KERNEL_EPS) * r[None, :] * inv_ny[:, None], 0.0)
        _, g = _power(u, P, P_INT)
        g = tl.where(mask, g, 0.0)
        sum_g2 += tl.sum(g * g, axis=1)
    s = 1.0 / (tl.where(row_ok, inv_ny, 1.0) * tl.sqrt_rn(tl.where(row_ok, sum_g2, 1.0)))  # |y| / |g|
    tl.store(inv_ny_ptr + rows, inv_ny, mask=row_ok)
    tl.store(s_ptr + rows, s, mask=row_ok)


@_jit
def _summary_kernel(
    k_ptr, v_ptr, r_ptr, inv_ny_ptr, s_ptr, kv_ptr, km_ptr,
    n, C, d, H, blocks_per_split, inv_n,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, P: tl.constexpr, P_INT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # partial KV = sum_j phi(k_j) v_j^T / n and k_mean = sum_j phi(k_j) / n over one split of the keys
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    head = bh % H
    acc_kv = tl.zeros((D_PAD, D_PAD), dtype=tl.float32)
    acc_km = tl.zeros((D_PAD,), dtype=tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(n, BLOCK))
    for blk in range(first, last):
        t0 = blk * BLOCK
        _, _, _, _, g, _, rows = _kernel_tile(k_ptr, r_ptr, inv_ny_ptr, b, head, t0, n, C, d, BLOCK, D_PAD, P, P_INT)
        a = tl.load(s_ptr + b * n + rows, mask=rows < n, other=0.0) * inv_n  # phi(k) / n = a g
        phi = g * a[:, None]
        v = _load_tile(v_ptr, b, head, t0, n, C, d, BLOCK, D_PAD)
        acc_kv = tl.dot(tl.trans(phi), v, acc_kv, input_precision=DOT_PRECISION)
        acc_km += tl.sum(phi, axis=0)
    out = bh * tl.num_programs(1) + split
    i = tl.arange(0, D_PAD)
    tl.store(kv_ptr + out * D_PAD * D_PAD + i[:, None] * D_PAD + i[None, :], acc_kv)
    tl.store(km_ptr + out * D_PAD + i, acc_km)


@_jit
def _attend_tile(g, s_q, kv, km, DOT_PRECISION: tl.constexpr):
    # numerator g KV (BLOCK, D_PAD) and 1 / (g . k_mean + eps / s_q) (BLOCK,)
    num = tl.dot(g, kv, input_precision=DOT_PRECISION)
    rden = 1.0 / (tl.sum(g * km[None, :], axis=1) + _DENOM_EPS / s_q)
    return num, rden


@_jit
def _apply_kernel(
    q_ptr, r_ptr, inv_ny_ptr, s_ptr, kv_ptr, km_ptr, out_ptr,
    N, C, d, H,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, P: tl.constexpr, P_INT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # out = (g_q . KV) / (g_q . k_mean + eps / s_q) for one block of queries of one (image, head)
    bh = tl.program_id(0)
    b = bh // H
    head = bh % H
    t0 = tl.program_id(1) * BLOCK
    _, _, _, _, g, _, rows = _kernel_tile(q_ptr, r_ptr, inv_ny_ptr, b, head, t0, N, C, d, BLOCK, D_PAD, P, P_INT)
    s_q = tl.load(s_ptr + b * N + rows, mask=rows < N, other=1.0)
    kv = _load_square(kv_ptr, bh, D_PAD)
    km = tl.load(km_ptr + bh * D_PAD + tl.arange(0, D_PAD))
    num, rden = _attend_tile(g, s_q, kv, km, DOT_PRECISION)
    _store_tile(out_ptr, num * rden[:, None], b, head, t0, N, C, d, BLOCK, D_PAD)


@_jit
def _query_grads(g, s_q, grad_out, kv, km, DOT_PRECISION: tl.constexpr):
    # dL/dnum (BLOCK, D_PAD), dL/dden (BLOCK,) and dL/dg_q (BLOCK, D_PAD) of one query tile
    num, rden = _attend_tile(g, s_q, kv, km, DOT_PRECISION)
    grad_num = grad_out * rden[:, None]
    grad_den = -tl.sum(grad_out * num, axis=1) * rden * rden
    grad_g = tl.dot(grad_num, tl.trans(kv), input_precision=DOT_PRECISION) + grad_den[:, None] * km[None, :]
    return grad_num, grad_den, grad_g


@_jit
def _query_grad_summary_kernel(
    q_ptr, r_ptr, inv_ny_ptr, s_ptr, kv_ptr, km_ptr, grad_out_ptr,
    grad_kv_ptr, grad_km_ptr, dot_ptr, grad_s_ptr,
    N, C, d, H, blocks_per_split,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, P: tl.constexpr, P_INT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # partial dL/dKV = sum_i g_qi^T dL/dnum_i and dL/dk_mean = sum_i dL/dden_i g_qi over one split of the queries;
    # per (token, head): dL/dg_q . g_q and dL/ds_q = -dL/dden eps / s_q^2, summed over heads by the caller
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    head = bh % H
    kv = _load_square(kv_ptr, bh, D_PAD)
    km = tl.load(km_ptr + bh * D_PAD + tl.arange(0, D_PAD))
    acc_kv = tl.zeros((D_PAD, D_PAD), dtype=tl.float32)
    acc_km = tl.zeros((D_PAD,), dtype=tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(N, BLOCK))
    for blk in range(first, last):
        t0 = blk * BLOCK
        _, _, _, _, g, _, rows = _kernel_tile(q_ptr, r_ptr, inv_ny_ptr, b, head, t0, N, C, d, BLOCK, D_PAD, P, P_INT)
        row_ok = rows < N
        s_q = tl.load(s_ptr + b * N + rows, mask=row_ok, other=1.0)
        grad_out = _load_tile(grad_out_ptr, b, head, t0, N, C, d, BLOCK, D_PAD)
        grad_num, grad_den, grad_g = _query_grads(g, s_q, grad_out, kv, km, DOT_PRECISION)
        acc_kv = tl.dot(tl.trans(g), grad_num, acc_kv, input_precision=DOT_PRECISION)
        acc_km += tl.sum(g * grad_den[:, None], axis=0)
        per_head = (b * N + rows) * H + head  # (B, N, h) layout
        tl.store(dot_ptr + per_head, tl.sum(grad_g * g, axis=1), mask=row_ok)
        tl.store(grad_s_ptr + per_head, -grad_den * _DENOM_EPS / (s_q * s_q), mask=row_ok)
    out = bh * tl.num_programs(1) + split
    i = tl.arange(0, D_PAD)
    tl.store(grad_kv_ptr + out * D_PAD * D_PAD + i[:, None] * D_PAD + i[None, :], acc_kv)
    tl.store(grad_km_ptr + out * D_PAD + i, acc_km)


@_jit
def _key_grad_kernel(
    k_ptr, v_ptr, r_ptr, inv_ny_ptr, s_ptr, grad_kv_ptr, grad_km_ptr, grad_v_ptr, dot_ptr,
    n, C, d, H, inv_n,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, P: tl.constexpr, P_INT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # dL/dv = phi(k) / n . dL/dKV, and per (token, head) dL/dphi . g_k with dL/dphi = v dL/dKV^T + dL/dk_mean
    bh = tl.program_id(0)
    b = bh // H
    head = bh % H
    t0 = tl.program_id(1) * BLOCK
    _, _, _, _, g, _, rows = _kernel_tile(k_ptr, r_ptr, inv_ny_ptr, b, head, t0, n, C, d, BLOCK, D_PAD, P, P_INT)
    row_ok = rows < n
    a = tl.load(s_ptr + b * n + rows, mask=row_ok, other=0.0) * inv_n
    grad_kv = _load_square(grad_kv_ptr, bh, D_PAD)
    grad_km = tl.load(grad_km_ptr + bh * D_PAD + tl.arange(0, D_PAD))
    grad_v = tl.dot(g * a[:, None], grad_kv, input_precision=DOT_PRECISION)
    _store_tile(grad_v_ptr, grad_v, b, head, t0, n, C, d, BLOCK, D_PAD)
    v = _load_tile(v_ptr, b, head, t0, n, C, d, BLOCK, D_PAD)
    grad_phi = tl.dot(v, tl.trans(grad_kv), input_precision=DOT_PRECISION) + grad_km[None, :]
    tl.store(dot_ptr + (b * n + rows) * H + head, tl.sum(grad_phi * g, axis=1), mask=row_ok)


@_jit
def _input_grad_kernel(
    x_ptr, r_ptr, inv_ny_ptr, s_ptr, kv_ptr, km_ptr, other_ptr, dot_ptr, grad_s_ptr, grad_x_ptr, grad_r_ptr,
    T, C, d, H, inv_n,
    IS_QUERY: tl.constexpr,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, P: tl.constexpr, P_INT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # dL/dx through the power and the norms for one token block of one head, and the block's dL/d(1 / T).
    # queries: kv / km hold KV / k_mean, other = dL/dout, dot = dL/dg . g (all heads), grad_s = dL/ds;
    # keys: kv / km hold dL/dKV / dL/dk_mean, other = v, dot = dL/dphi . g (all heads), dL/ds from it.
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    b = bh // H
    head = bh % H
    t0 = blk * BLOCK
    x, relu, u, u_pm1, g, mask, rows = _kernel_tile(
        x_ptr, r_ptr, inv_ny_ptr, b, head, t0, T, C, d, BLOCK, D_PAD, P, P_INT
    )
    row_ok = rows < T
    inv_ny = tl.load(inv_ny_ptr + b * T + rows, mask=row_ok, other=0.0)
    s = tl.load(s_ptr + b * T + rows, mask=row_ok, other=1.0)
    kv = _load_square(kv_ptr, bh, D_PAD)
    km = tl.load(km_ptr + bh * D_PAD + tl.arange(0, D_PAD))
    other = _load_tile(other_ptr, b, head, t0, T, C, d, BLOCK, D_PAD)
    dot = tl.load(dot_ptr + b * T + rows, mask=row_ok, other=0.0)
    if IS_QUERY:
        _, _, grad_g = _query_grads(g, s, other, kv, km, DOT_PRECISION)
        grad_s = tl.load(grad_s_ptr + b * T + rows, mask=row_ok, other=0.0)
        grad_g_dot_g = dot
    else:
        # phi(k) / n = a g with a = s / n: dL/dg = a dL/dphi, dL/ds = dL/dphi . g / n
        a = s * inv_n
        grad_phi = tl.dot(other, tl.trans(kv), input_precision=DOT_PRECISION) + km[None, :]
        grad_g = grad_phi * a[:, None]
        grad_s = dot * inv_n
        grad_g_dot_g = dot * a
    ss = grad_s * s
    radial = (P + 1.0) * ss - P * grad_g_dot_g  # (BLOCK,)
    coef = ss * (s * inv_ny) * (s * inv_ny)  # S s / |g|^2, as |g| = |y| / s
    grad_y = (P * u_pm1 * (grad_g - coef[:, None] * g) + u * radial[:, None]) * inv_ny[:, None]
    grad_y = tl.where(mask, grad_y, 0.0)
    cols = tl.arange(0, D_PAD)
    r = tl.load(r_ptr + head * d + cols, mask=cols < d, other=0.0)
    _store_tile(grad_x_ptr, tl.where(x > 0.0, grad_y * r[None, :], 0.0), b, head, t0, T, C, d, BLOCK, D_PAD)
    grad_r = tl.sum(grad_y * (relu + _KERNEL_EPS), axis=0)
    tl.store(grad_r_ptr + (bh * tl.num_programs(1) + blk) * D_PAD + cols, grad_r)


# ----------------------------------------------------------------------------------------------------------------
# launchers


def _device_of(x: Tensor) -> contextlib.AbstractContextManager:
    """Make x's CUDA device the current one while kernels are launched (triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class _Plan:
    """Block sizes and launch shapes for one call: B images, h heads of d channels, N queries, n keys."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, num_heads: int, p: float) -> None:
        B, N, C = q.shape
        self.B, self.N, self.n, self.C, self.h = B, N, k.shape[1], C, num_heads
        self.d = C // num_heads
        self.d_pad = max(16, triton.next_power_of_2(self.d))
        self.p = float(p)
        self.p_int = int(p) if float(p).is_integer() and 1 <= p <= 8 else 0
        fp32 = all(t.dtype == torch.float32 for t in (q, k, v))
        self.dot_precision = "ieee" if fp32 else "tf32"
        if _INTERPRETED:  # every program runs in Python: small tiles, few programs
            self.block, self.block_r, self.num_warps, self.programs = 16, 16, 4, 2
        else:
            self.block = 64 if self.d_pad <= 64 else 32
            self.block_r = 16
            self.num_warps = 4 if self.d_pad <= 64 else 8
            self.programs = 4 * torch.cuda.get_device_properties(q.device).multi_processor_count
        self.block_c = min(triton.next_power_of_2(C), 256 if not _INTERPRETED else 64)

    def meta(self) -> dict:
        """Compile-time parameters shared by the attention kernels."""
        return dict(BLOCK=self.block, D_PAD=self.d_pad, P=self.p, P_INT=self.p_int,
                    DOT_PRECISION=self.dot_precision, num_warps=self.num_warps)

    def splits(self, tokens: int) -> tuple[int, int]:
        """(splits, token blocks per split) for a reduction over `tokens` spread over about ``programs`` programs."""
        blocks = triton.cdiv(tokens, self.block)
        splits = max(1, min(blocks, triton.cdiv(self.programs, self.B * self.h)))
        per_split = triton.cdiv(blocks, splits)
        return triton.cdiv(blocks, per_split), per_split


def _row_stats(x: Tensor, inv_temp: Tensor, plan: _Plan) -> tuple[Tensor, Tensor]:
    """1 / |y| and s = |y| / |g| per token of x (B, T, C), each (B * T,) float32."""
    rows = x.shape[0] * x.shape[1]
    inv_ny = torch.empty(rows, device=x.device, dtype=torch.float32)
    s = torch.empty_like(inv_ny)
    grid = (triton.cdiv(rows, plan.block_r),)
    _row_stats_kernel[grid](x, inv_temp, inv_ny, s, rows, plan.C, BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
                            P=plan.p, P_INT=plan.p_int, num_warps=plan.num_warps)
    return inv_ny, s


def _partial_buffers(plan: _Plan, splits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-split (B * h, splits, D, D) and (B * h, splits, D) float32 outputs of a summary kernel."""
    bh, D = plan.B * plan.h, plan.d_pad
    return (torch.empty(bh, splits, D, D, device=device, dtype=torch.float32),
            torch.empty(bh, splits, D, device=device, dtype=torch.float32))


def _block_grad_r(grad_r_blocks: Tensor, plan: _Plan) -> Tensor:
    """Per-block dL/d(1 / T) (B * h, blocks, D) summed to (C,)."""
    per_head = grad_r_blocks.view(plan.B, plan.h, -1, plan.d_pad)[..., : plan.d]  # (B, h, blocks, d)
    return per_head.sum(dim=(0, 2)).reshape(plan.C)


class _FocusedAttention(torch.autograd.Function):
    """Focused linear attention on token-layout tensors; forward and backward are Triton kernels."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, inv_temp: Tensor, num_heads: int, p: float) -> Tensor:
        plan = _Plan(q, k, v, num_heads, p)
        B, N, n, C, h = plan.B, plan.N, plan.n, plan.C, plan.h
        inv_ny_q, s_q = _row_stats(q, inv_temp, plan)
        inv_ny_k, s_k = _row_stats(k, inv_temp, plan)
        splits, per_split = plan.splits(n)
        kv, km = _partial_buffers(plan, splits, q.device)
        _summary_kernel[(B * h, splits)](k, v, inv_temp, inv_ny_k, s_k, kv, km, n, C, plan.d, h, per_split,
                                         1.0 / n, **plan.meta())
        kv, km = kv.sum(dim=1), km.sum(dim=1)  # (B * h, D, D), (B * h, D)
        out = torch.empty(B, N, C, device=q.device, dtype=v.dtype)
        _apply_kernel[(B * h, triton.cdiv(N, plan.block))](q, inv_temp, inv_ny_q, s_q, kv, km, out, N, C, plan.d, h,
                                                          **plan.meta())
        ctx.save_for_backward(q, k, v, inv_temp, inv_ny_q, s_q, inv_ny_k, s_k, kv, km)
        ctx.plan = plan
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        with _device_of(grad_out):
            return _FocusedAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, inv_temp, inv_ny_q, s_q, inv_ny_k, s_k, kv, km = ctx.saved_tensors
        plan: _Plan = ctx.plan
        B, N, n, C, h, d = plan.B, plan.N, plan.n, plan.C, plan.h, plan.d
        device, f32 = q.device, torch.float32
        grad_out = grad_out.contiguous()
        # queries: dL/dKV, dL/dk_mean and the per-token scalars of the power's backward
        splits, per_split = plan.splits(N)
        grad_kv, grad_km = _partial_buffers(plan, splits, device)
        dot_q = torch.empty(B, N, h, device=device, dtype=f32)
        grad_s_q = torch.empty(B, N, h, device=device, dtype=f32)
        _query_grad_summary_kernel[(B * h, splits)](
            q, inv_temp, inv_ny_q, s_q, kv, km, grad_out, grad_kv, grad_km, dot_q, grad_s_q,
            N, C, d, h, per_split, **plan.meta(),
        )
        grad_kv, grad_km = grad_kv.sum(dim=1), grad_km.sum(dim=1)  # (B * h, D, D), (B * h, D)
        # keys: dL/dv and the per-token scalar dL/dphi . g_k
        key_blocks = triton.cdiv(n, plan.block)
        grad_v = torch.empty_like(v)
        dot_k = torch.empty(B, n, h, device=device, dtype=f32)
        _key_grad_kernel[(B * h, key_blocks)](k, v, inv_temp, inv_ny_k, s_k, grad_kv, grad_km, grad_v, dot_k,
                                              n, C, d, h, 1.0 / n, **plan.meta())
        # inputs through the power and the norms; per-token scalars summed over heads first
        query_blocks = triton.cdiv(N, plan.block)
        grad_q = torch.empty_like(q)
        grad_r_q = torch.empty(B * h, query_blocks, plan.d_pad, device=device, dtype=f32)
        _input_grad_kernel[(B * h, query_blocks)](
            q, inv_temp, inv_ny_q, s_q, kv, km, grad_out, dot_q.sum(-1), grad_s_q.sum(-1), grad_q, grad_r_q,
            N, C, d, h, 1.0, IS_QUERY=True, **plan.meta(),
        )
        grad_k = torch.empty_like(k)
        grad_r_k = torch.empty(B * h, key_blocks, plan.d_pad, device=device, dtype=f32)
        dot_k = dot_k.sum(-1)  # (B, n)
        _input_grad_kernel[(B * h, key_blocks)](
            k, inv_temp, inv_ny_k, s_k, grad_kv, grad_km, v, dot_k, dot_k, grad_k, grad_r_k,
            n, C, d, h, 1.0 / n, IS_QUERY=False, **plan.meta(),
        )
        grad_r = _block_grad_r(grad_r_q, plan) + _block_grad_r(grad_r_k, plan)
        needs = ctx.needs_input_grad
        return (grad_q if needs[0] else None, grad_k if needs[1] else None, grad_v if needs[2] else None,
                grad_r if needs[3] else None, None, None)


def focused_linear_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, focusing_factor: float = 3.0
) -> Tensor:
    """Focused linear attention without the DWC term, through the Triton kernels of this module.

    Same maths as :func:`seg.kernels.cpu_attention.focused_linear_attention_tokens`, differentiable with
    respect to q, k, v and scale.

    Args:
        q: raw query projections (B, N, C), float32 / float16 / bfloat16.
        k: raw key projections with the positional encoding added (B, n, C); n may differ from N.
        v: values (B, n, C).
        scale: the learnable temperature (1, 1, C); T = softplus(scale), taken in float32.
        num_heads: heads h, contiguous channel blocks (C = h * d, d <= 128).
        focusing_factor: the power p of the focusing function (p >= 1).

    Returns:
        (B, N, C) in v's dtype.
    """
    if not triton_available():
        raise RuntimeError(
            "focused_linear_attention_triton needs triton and a CUDA device, or TRITON_INTERPRET=1 set before "
            "seg.kernels.triton_focused is imported (Triton's CPU interpreter)"
        )
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"expected (B, N, C) tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, N, C = q.shape
    if k.shape[0] != B or k.shape[2] != C or v.shape != k.shape:
        raise ValueError(f"k and v must be (B, n, C) with q's B and C: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if C % num_heads:
        raise ValueError(f"{C} channels are not divisible by {num_heads} heads")
    if C // num_heads > MAX_HEAD_DIM:
        raise ValueError(f"head dim {C // num_heads} exceeds {MAX_HEAD_DIM}")
    if scale.numel() != C:
        raise ValueError(f"scale has {scale.numel()} values for {C} channels")
    if B == 0 or N == 0 or k.shape[1] == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if focusing_factor < 1:
        raise ValueError(f"focusing_factor must be >= 1, got {focusing_factor}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} is {t.dtype}; supported: float32, float16, bfloat16")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k and v must be on one device")
    if not _INTERPRETED and q.device.type != "cuda":
        raise ValueError(f"the compiled kernels take CUDA tensors, got {q.device}")
    with torch.autocast(device_type=q.device.type, enabled=False), _device_of(q):
        inv_temp = F.softplus(scale.to(device=q.device, dtype=torch.float32)).reciprocal().reshape(C)  # (C,)
        return _FocusedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), inv_temp.contiguous(),
                                       num_heads, float(focusing_factor))

