"""The Triton kernels of :mod:`seg.kernels.focused_linear.triton.launch` (maths and notation: see there).

Kernels (``bh`` = one (image, head) pair; "split" = a contiguous range of token blocks):

forward
    ``row_stats_kernel``    grid (token blocks,)                 1 / |y| and s per token, two sweeps over C
    ``summary_kernel``      grid (B * h, splits over n, chunks)  KV[:, chunk] and k_mean partial sums, tl.dot
    ``apply_kernel``        grid (B * h, blocks of N)            g_q on the fly, numerator by column chunks,
                                                                 normaliser, division
backward
    ``query_grad_summary_kernel``   grid (B * h, splits over N, chunks)  dL/dKV[:, chunk], dL/dk_mean partial
                                    sums, plus per head and query token dL/dg_q . g_q and dL/ds_q
    ``key_grad_kernel``             grid (B * h, blocks of n)    dL/dv, and per head and key token dL/dphi_k . g_k
    ``input_grad_kernel``           grid (B * h, token blocks)   dL/dq or dL/dk through the power and the norms,
                                    plus per-block partial sums of dL/d(1 / T)

A "chunk" is DC columns of a (D_PAD, D_PAD) summary: with DC < D_PAD no kernel holds a whole (D_PAD, D_PAD)
operand, which keeps the shared memory of head dim 128 within consumer GPUs (see
:mod:`seg.kernels.focused_linear.triton.tiles`). Token tensors are read and written through their (image, token)
strides, channel stride 1.

Torch glue only sums the small partial results (over splits, heads of a token, blocks) and applies softplus.
The backward of the power, with G = dL/dg and S = dL/ds of one token
(as in :func:`seg.kernels.focused_linear.cpu.closed_form.kernel_power_backward`):

    dL/dy = [p u^(p-1) (G - S s g / |g|^2) + u ((p + 1) S s - p G . g)] / |y|
    dL/dx = dL/dy / T where x > 0,   dL/d(1 / T) = sum over tokens of dL/dy (ReLU(x) + eps)

Triton reads ``TRITON_INTERPRET`` when the kernels are defined, i.e. when this module is imported: set it to 1
before the import to run the kernels on CPU tensors through Triton's interpreter (slow; for tests).
"""

import os
import types

from seg.kernels.focused_linear.reference import DENOM_EPS, KERNEL_EPS

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels below are then plain, never launched functions
    triton = None
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)

__all__ = [
    "INTERPRETED",
    "apply_kernel",
    "input_grad_kernel",
    "key_grad_kernel",
    "query_grad_summary_kernel",
    "row_stats_kernel",
    "summary_kernel",
]

_KERNEL_EPS = tl.constexpr(KERNEL_EPS)
_DENOM_EPS = tl.constexpr(DENOM_EPS)

# whether the kernels of this module were defined for Triton's CPU interpreter (triton < 3.3 has no knobs)
INTERPRETED = triton is not None and (
    bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else os.environ.get("TRITON_INTERPRET") == "1"
)


def _jit(fn):
    """``triton.jit`` when triton is installed, else the function unchanged."""
    return fn if triton is None else triton.jit(fn)


@_jit
def _image_and_head(H):
    # axis 0 of every attention grid runs over (image, head) pairs: (pair index, image b, head)
    bh = tl.program_id(0)
    return bh, bh // H, bh % H


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
def _tile(b, head, t0, T, d, stride_b, stride_t, c0, BLOCK: tl.constexpr, WIDTH: tl.constexpr):
    # offsets and mask of channels [c0, c0 + WIDTH) of one head for BLOCK tokens from t0 of image b, in a
    # (B, T, C) tensor with strides (stride_b, stride_t, 1); plus the token indices
    rows = t0 + tl.arange(0, BLOCK)
    cols = c0 + tl.arange(0, WIDTH)
    mask = (rows < T)[:, None] & (cols < d)[None, :]
    offs = b.to(tl.int64) * stride_b + rows.to(tl.int64)[:, None] * stride_t + (head * d + cols)[None, :]
    return offs, mask, rows


@_jit
def _load_tile(ptr, b, head, t0, T, d, stride_b, stride_t, c0, BLOCK: tl.constexpr, WIDTH: tl.constexpr):
    # (BLOCK, WIDTH) float32 tile of one head's channels from c0, zero outside
    offs, mask, _ = _tile(b, head, t0, T, d, stride_b, stride_t, c0, BLOCK, WIDTH)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@_jit
def _store_tile(ptr, value, b, head, t0, T, d, stride_b, stride_t, c0, BLOCK: tl.constexpr, WIDTH: tl.constexpr):
    # store a (BLOCK, WIDTH) tile into one head's channels from c0, cast to the buffer's dtype
    offs, mask, _ = _tile(b, head, t0, T, d, stride_b, stride_t, c0, BLOCK, WIDTH)
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@_jit
def _kernel_tile(
    x_ptr, r_ptr, inv_ny_ptr, b, head, t0, T, d, stride_b, stride_t,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, P: tl.constexpr, P_INT: tl.constexpr,
):
    # one head's channels of BLOCK tokens from t0 of image b: x (raw, fp32), ReLU(x), u, u^(p-1), g = u^p,
    # each (BLOCK, D_PAD) and zero outside the valid tokens / channels, plus the tile's mask and token indices
    offs, mask, rows = _tile(b, head, t0, T, d, stride_b, stride_t, 0, BLOCK, D_PAD)
    cols = tl.arange(0, D_PAD)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + head * d + cols, mask=cols < d, other=0.0)
    inv_ny = tl.load(inv_ny_ptr + b * T + rows, mask=rows < T, other=0.0)
    relu = tl.maximum(x, 0.0)
    u = tl.where(mask, (relu + _KERNEL_EPS) * r[None, :] * inv_ny[:, None], 0.0)
    u_pm1, g = _power(u, P, P_INT)
    u_pm1 = tl.where(mask, u_pm1, 0.0)
    g = tl.where(mask, g, 0.0)
    return x, relu, u, u_pm1, g, mask, rows


@_jit
def _mapped_rows(
    x_ptr, r_ptr, inv_ny_ptr, s_ptr, b, head, t0, T, d, stride_b, stride_t, S_OTHER: tl.constexpr,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, P: tl.constexpr, P_INT: tl.constexpr,
):
    # g = u^p of the tile of _kernel_tile (BLOCK, D_PAD), its token indices, and s per token (S_OTHER outside)
    _, _, _, _, g, _, rows = _kernel_tile(x_ptr, r_ptr, inv_ny_ptr, b, head, t0, T, d, stride_b, stride_t,
                                          BLOCK, D_PAD, P, P_INT)
    s = tl.load(s_ptr + b * T + rows, mask=rows < T, other=S_OTHER)
    return g, rows, s


@_jit
def _load_vector(ptr, bh, D_PAD: tl.constexpr):
    # the (D_PAD,) float32 vector of one (image, head) pair
    return tl.load(ptr + bh * D_PAD + tl.arange(0, D_PAD))


@_jit
def _token_block(
    x_ptr, r_ptr, inv_ny_ptr, s_ptr, vec_ptr, H, T, d, stride_b, stride_t, S_OTHER: tl.constexpr,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, P: tl.constexpr, P_INT: tl.constexpr,
):
    # the block of tokens of a program on grid (B * h, blocks of T): its (image, head) pair bh = (b, head), first
    # token t0, the _mapped_rows of x, and g . v per token for the pair's (D_PAD,) vector v at vec_ptr
    bh, b, head = _image_and_head(H)
    t0 = tl.program_id(1) * BLOCK
    g, rows, s = _mapped_rows(x_ptr, r_ptr, inv_ny_ptr, s_ptr, b, head, t0, T, d, stride_b, stride_t, S_OTHER,
                              BLOCK, D_PAD, P, P_INT)
    g_v = tl.sum(g * _load_vector(vec_ptr, bh, D_PAD)[None, :], axis=1)
    return bh, b, head, t0, g, rows, s, g_v


@_jit
def _load_columns(ptr, bh, c0, D_PAD: tl.constexpr, WIDTH: tl.constexpr):
    # columns [c0, c0 + WIDTH) of the (D_PAD, D_PAD) float32 matrix of one (image, head) pair: (D_PAD, WIDTH)
    i = tl.arange(0, D_PAD)
    j = c0 + tl.arange(0, WIDTH)
    return tl.load(ptr + bh * D_PAD * D_PAD + i[:, None] * D_PAD + j[None, :])


@_jit
def _load_columns_transposed(ptr, bh, c0, D_PAD: tl.constexpr, WIDTH: tl.constexpr):
    # the same columns, transposed on load: (WIDTH, D_PAD)
    i = tl.arange(0, D_PAD)
    j = c0 + tl.arange(0, WIDTH)
    return tl.load(ptr + bh * D_PAD * D_PAD + i[None, :] * D_PAD + j[:, None])


@_jit
def _kernel_input_chunk(x_ptr, r_ptr, base, row_ok, c0, C, BLOCK_C: tl.constexpr):
    # y = (ReLU(x) + eps) / T on channels [c0, c0 + BLOCK_C) of a block of rows (0 outside), and its mask
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + cols, mask=col_ok, other=0.0)
    return tl.where(mask, (tl.maximum(x, 0.0) + _KERNEL_EPS) * r[None, :], 0.0), mask


@_jit
def row_stats_kernel(
    x_ptr, r_ptr, inv_ny_ptr, s_ptr, R, T, C, stride_b, stride_t,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, P: tl.constexpr, P_INT: tl.constexpr,
):
    # per token of x (B, T, C) (R = B * T rows): 1 / |y| and s = |y| / |g|
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    base = (rows // T).to(tl.int64)[:, None] * stride_b + (rows % T).to(tl.int64)[:, None] * stride_t
    sum_y2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        y, _ = _kernel_input_chunk(x_ptr, r_ptr, base, row_ok, c0, C, BLOCK_C)
        sum_y2 += tl.sum(y * y, axis=1)
    inv_ny = tl.where(row_ok, 1.0 / tl.sqrt_rn(tl.where(row_ok, sum_y2, 1.0)), 0.0)
    sum_g2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        y, mask = _kernel_input_chunk(x_ptr, r_ptr, base, row_ok, c0, C, BLOCK_C)
        _, g = _power(y * inv_ny[:, None], P, P_INT)
        g = tl.where(mask, g, 0.0)
        sum_g2 += tl.sum(g * g, axis=1)
    s = 1.0 / (tl.where(row_ok, inv_ny, 1.0) * tl.sqrt_rn(tl.where(row_ok, sum_g2, 1.0)))  # |y| / |g|
    tl.store(inv_ny_ptr + rows, inv_ny, mask=row_ok)
    tl.store(s_ptr + rows, s, mask=row_ok)


@_jit
def _store_partials(square_ptr, vector_ptr, out, c0, acc_columns, acc_vector, D_PAD: tl.constexpr, DC: tl.constexpr):
    # one split's partial sums: columns [c0, c0 + DC) of a (D_PAD, D_PAD) matrix and the (D_PAD,) vector, at
    # slot `out` of (B * h, splits); every column chunk of a split writes the same vector
    i = tl.arange(0, D_PAD)
    j = c0 + tl.arange(0, DC)
    tl.store(square_ptr + out * D_PAD * D_PAD + i[:, None] * D_PAD + j[None, :], acc_columns)
    tl.store(vector_ptr + out * D_PAD + i, acc_vector)


@_jit
def _split_range(blocks_per_split, T, BLOCK: tl.constexpr):
    # the token blocks [first, last) of the split on grid axis 1
    first = tl.program_id(1) * blocks_per_split
    return first, tl.minimum(first + blocks_per_split, tl.cdiv(T, BLOCK))


@_jit
def summary_kernel(
    k_ptr, v_ptr, r_ptr, inv_ny_ptr, s_ptr, kv_ptr, km_ptr,
    n, d, H, blocks_per_split, inv_n, k_sb, k_st, v_sb, v_st,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, DC: tl.constexpr, P: tl.constexpr, P_INT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # partial KV[:, chunk] = sum_j phi(k_j) v_j[chunk]^T / n and k_mean = sum_j phi(k_j) / n over one split of
    # the keys; grid (B * h, splits, D_PAD / DC)
    bh, b, head = _image_and_head(H)
    c0 = tl.program_id(2) * DC
    acc_kv = tl.zeros((D_PAD, DC), dtype=tl.float32)
    acc_km = tl.zeros((D_PAD,), dtype=tl.float32)
    first, last = _split_range(blocks_per_split, n, BLOCK)
    for blk in range(first, last):
        t0 = blk * BLOCK
        g, _, s = _mapped_rows(k_ptr, r_ptr, inv_ny_ptr, s_ptr, b, head, t0, n, d, k_sb, k_st, 0.0,
                               BLOCK, D_PAD, P, P_INT)
        phi = g * (s * inv_n)[:, None]  # phi(k) / n = a g with a = s / n
        v = _load_tile(v_ptr, b, head, t0, n, d, v_sb, v_st, c0, BLOCK, DC)
        acc_kv = tl.dot(tl.trans(phi), v, acc_kv, input_precision=DOT_PRECISION)
        acc_km += tl.sum(phi, axis=0)
    _store_partials(kv_ptr, km_ptr, bh * tl.num_programs(1) + tl.program_id(1), c0, acc_kv, acc_km, D_PAD, DC)


@_jit
def _numerator_dot(g, kv_ptr, bh, grad_out_ptr, b, head, t0, T, d, go_sb, go_st,
                   BLOCK: tl.constexpr, D_PAD: tl.constexpr, DC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # sum over channels of dL/dout * (g KV) for a query tile (BLOCK,), one column chunk of KV at a time
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, D_PAD, DC):
        num = tl.dot(g, _load_columns(kv_ptr, bh, c0, D_PAD, DC), input_precision=DOT_PRECISION)
        grad_out = _load_tile(grad_out_ptr, b, head, t0, T, d, go_sb, go_st, c0, BLOCK, DC)
        total += tl.sum(grad_out * num, axis=1)
    return total


@_jit
def apply_kernel(
    q_ptr, r_ptr, inv_ny_ptr, s_ptr, kv_ptr, km_ptr, out_ptr,
    N, d, H, q_sb, q_st, o_sb, o_st,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, DC: tl.constexpr, P: tl.constexpr, P_INT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # out = (g_q . KV) / (g_q . k_mean + eps / s_q) for one block of queries of one (image, head)
    bh, b, head, t0, g, _, s_q, g_km = _token_block(q_ptr, r_ptr, inv_ny_ptr, s_ptr, km_ptr, H, N, d, q_sb, q_st,
                                                    1.0, BLOCK, D_PAD, P, P_INT)
    rden = 1.0 / (g_km + _DENOM_EPS / s_q)
    for c0 in range(0, D_PAD, DC):
        num = tl.dot(g, _load_columns(kv_ptr, bh, c0, D_PAD, DC), input_precision=DOT_PRECISION)
        _store_tile(out_ptr, num * rden[:, None], b, head, t0, N, d, o_sb, o_st, c0, BLOCK, DC)


@_jit
def query_grad_summary_kernel(
    q_ptr, r_ptr, inv_ny_ptr, s_ptr, kv_ptr, km_ptr, grad_out_ptr,
    grad_kv_ptr, grad_km_ptr, dot_ptr, grad_s_ptr,
    N, d, H, blocks_per_split, q_sb, q_st, go_sb, go_st,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, DC: tl.constexpr, P: tl.constexpr, P_INT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # partial dL/dKV[:, chunk] = sum_i g_qi^T dL/dnum_i[chunk] and dL/dk_mean = sum_i dL/dden_i g_qi over one
    # split of the queries; grid (B * h, splits, D_PAD / DC). Chunk 0 also stores per (token, head)
    # dL/dg_q . g_q = rden S + dL/dden (g_q . k_mean) with S = dL/dout . num, and dL/ds_q = -dL/dden eps / s_q^2
    bh, b, head = _image_and_head(H)
    chunk = tl.program_id(2)
    c0 = chunk * DC
    km = _load_vector(km_ptr, bh, D_PAD)
    acc_kv = tl.zeros((D_PAD, DC), dtype=tl.float32)
    acc_km = tl.zeros((D_PAD,), dtype=tl.float32)
    first, last = _split_range(blocks_per_split, N, BLOCK)
    for blk in range(first, last):
        t0 = blk * BLOCK
        g, rows, s_q = _mapped_rows(q_ptr, r_ptr, inv_ny_ptr, s_ptr, b, head, t0, N, d, q_sb, q_st, 1.0,
                                    BLOCK, D_PAD, P, P_INT)
        row_ok = rows < N
        g_km = tl.sum(g * km[None, :], axis=1)
        rden = 1.0 / (g_km + _DENOM_EPS / s_q)
        total = _numerator_dot(g, kv_ptr, bh, grad_out_ptr, b, head, t0, N, d, go_sb, go_st,
                               BLOCK, D_PAD, DC, DOT_PRECISION)
        grad_den = -total * rden * rden
        grad_num = _load_tile(grad_out_ptr, b, head, t0, N, d, go_sb, go_st, c0, BLOCK, DC) * rden[:, None]
        acc_kv = tl.dot(tl.trans(g), grad_num, acc_kv, input_precision=DOT_PRECISION)
        acc_km += tl.sum(g * grad_den[:, None], axis=0)
        per_head = (b * N + rows) * H + head  # (B, N, h) layout
        first_chunk = row_ok & (chunk == 0)
        tl.store(dot_ptr + per_head, total * rden + grad_den * g_km, mask=first_chunk)
        tl.store(grad_s_ptr + per_head, -grad_den * _DENOM_EPS / (s_q * s_q), mask=first_chunk)
    _store_partials(grad_kv_ptr, grad_km_ptr, bh * tl.num_programs(1) + tl.program_id(1), c0, acc_kv, acc_km,
                    D_PAD, DC)


@_jit
def key_grad_kernel(
    k_ptr, v_ptr, r_ptr, inv_ny_ptr, s_ptr, grad_kv_ptr, grad_km_ptr, grad_v_ptr, dot_ptr,
    n, d, H, inv_n, k_sb, k_st, v_sb, v_st, gv_sb, gv_st,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, DC: tl.constexpr, P: tl.constexpr, P_INT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # dL/dv = a g_k dL/dKV (phi(k) / n = a g_k), and per (token, head)
    # dL/dphi . g_k = v . (g_k dL/dKV) + g_k . dL/dk_mean (dL/dphi = v dL/dKV^T + dL/dk_mean)
    bh, b, head, t0, g, rows, s, dot = _token_block(k_ptr, r_ptr, inv_ny_ptr, s_ptr, grad_km_ptr, H, n, d, k_sb,
                                                    k_st, 0.0, BLOCK, D_PAD, P, P_INT)
    a = s * inv_n
    for c0 in range(0, D_PAD, DC):
        gm = tl.dot(g, _load_columns(grad_kv_ptr, bh, c0, D_PAD, DC), input_precision=DOT_PRECISION)
        _store_tile(grad_v_ptr, gm * a[:, None], b, head, t0, n, d, gv_sb, gv_st, c0, BLOCK, DC)
        dot += tl.sum(_load_tile(v_ptr, b, head, t0, n, d, v_sb, v_st, c0, BLOCK, DC) * gm, axis=1)
    tl.store(dot_ptr + (b * n + rows) * H + head, dot, mask=rows < n)


@_jit
def _times_transposed(x_ptr, b, head, t0, T, d, x_sb, x_st, m_ptr, bh,
                      BLOCK: tl.constexpr, D_PAD: tl.constexpr, DC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # x M^T for a token tile x and the (D_PAD, D_PAD) matrix M of one (image, head): (BLOCK, D_PAD), by chunks
    acc = tl.zeros((BLOCK, D_PAD), dtype=tl.float32)
    for c0 in range(0, D_PAD, DC):
        x = _load_tile(x_ptr, b, head, t0, T, d, x_sb, x_st, c0, BLOCK, DC)
        acc = tl.dot(x, _load_columns_transposed(m_ptr, bh, c0, D_PAD, DC), acc, input_precision=DOT_PRECISION)
    return acc


@_jit
def input_grad_kernel(
    x_ptr, r_ptr, inv_ny_ptr, s_ptr, kv_ptr, km_ptr, other_ptr, dot_ptr, grad_s_ptr, grad_x_ptr, grad_r_ptr,
    T, d, H, inv_n, x_sb, x_st, ot_sb, ot_st, gx_sb, gx_st,
    IS_QUERY: tl.constexpr,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, DC: tl.constexpr, P: tl.constexpr, P_INT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # dL/dx through the power and the norms for one token block of one head, and the block's dL/d(1 / T).
    # queries: kv / km hold KV / k_mean, other = dL/dout, dot = dL/dg . g (all heads), grad_s = dL/ds;
    # keys: kv / km hold dL/dKV / dL/dk_mean, other = v, dot = dL/dphi . g (all heads), dL/ds from it.
    bh, b, head = _image_and_head(H)
    blk = tl.program_id(1)
    t0 = blk * BLOCK
    x, relu, u, u_pm1, g, mask, rows = _kernel_tile(
        x_ptr, r_ptr, inv_ny_ptr, b, head, t0, T, d, x_sb, x_st, BLOCK, D_PAD, P, P_INT
    )
    row_ok = rows < T
    inv_ny = tl.load(inv_ny_ptr + b * T + rows, mask=row_ok, other=0.0)
    s = tl.load(s_ptr + b * T + rows, mask=row_ok, other=1.0)
    km = tl.load(km_ptr + bh * D_PAD + tl.arange(0, D_PAD))
    dot = tl.load(dot_ptr + b * T + rows, mask=row_ok, other=0.0)
    other_kv_t = _times_transposed(other_ptr, b, head, t0, T, d, ot_sb, ot_st, kv_ptr, bh, BLOCK, D_PAD, DC,
                                   DOT_PRECISION)
    if IS_QUERY:
        # dL/dg = dL/dout KV^T rden + dL/dden k_mean
        rden = 1.0 / (tl.sum(g * km[None, :], axis=1) + _DENOM_EPS / s)
        total = _numerator_dot(g, kv_ptr, bh, other_ptr, b, head, t0, T, d, ot_sb, ot_st,
                               BLOCK, D_PAD, DC, DOT_PRECISION)
        grad_g = other_kv_t * rden[:, None] - (total * rden * rden)[:, None] * km[None, :]
        grad_s = tl.load(grad_s_ptr + b * T + rows, mask=row_ok, other=0.0)
        grad_g_dot_g = dot
    else:
        # phi(k) / n = a g with a = s / n: dL/dg = a dL/dphi, dL/ds = dL/dphi . g / n
        a = s * inv_n
        grad_g = (other_kv_t + km[None, :]) * a[:, None]
        grad_s = dot * inv_n
        grad_g_dot_g = dot * a
    ss = grad_s * s
    radial = (P + 1.0) * ss - P * grad_g_dot_g  # (BLOCK,)
    coef = ss * (s * inv_ny) * (s * inv_ny)  # S s / |g|^2, as |g| = |y| / s
    grad_y = (P * u_pm1 * (grad_g - coef[:, None] * g) + u * radial[:, None]) * inv_ny[:, None]
    grad_y = tl.where(mask, grad_y, 0.0)
    cols = tl.arange(0, D_PAD)
    r = tl.load(r_ptr + head * d + cols, mask=cols < d, other=0.0)
    _store_tile(grad_x_ptr, tl.where(x > 0.0, grad_y * r[None, :], 0.0), b, head, t0, T, d, gx_sb, gx_st, 0,
                BLOCK, D_PAD)
    grad_r = tl.sum(grad_y * (relu + _KERNEL_EPS), axis=0)
    tl.store(grad_r_ptr + (bh * tl.num_programs(1) + blk) * D_PAD + cols, grad_r)
