"""Focused linear attention (FLatten) as fused Triton kernels: the launch plan and the raw forward / backward.

The maths is that of :func:`seg.kernels.focused_linear.cpu.focused_linear_attention` (without the DWC term),
on token-layout tensors q (B, N, C), k and v (B, n, C), heads as contiguous channel blocks (C = h * d):

    y = (ReLU(x) + eps) / T,  T = softplus(scale)      per channel
    u = y / |y|,  g = u^p,  s = |y| / |g|              |.|: L2 norm over all C channels of a token
    phi(x) = s * g                                     the focused kernel f_p(y): direction powered, norm kept
    KV = sum_j phi(k_j) v_j^T / n,  k_mean = sum_j phi(k_j) / n                      per head, (d, d) and (d,)
    out_i = (g_qi . KV) / (g_qi . k_mean + eps / s_qi)                               per head

The per-token factor s_q of phi(q) cancels except at the eps, and the mean (divide by n) keeps the published
fp16-safe normalisation. Powering the unit vector u keeps every value of g in (0, 1], whatever the input scale.
Everything runs in float32 inside the kernels; inputs may be float32, float16 or bfloat16, with any strides
whose channel stride is 1 (q / k / v as chunks of one fused projection are read in place).

The kernels live in :mod:`seg.kernels.focused_linear.triton.kernels`, their tile configurations in
:mod:`seg.kernels.focused_linear.triton.tiles`; this module plans the launches, sums the small partial results
(:func:`forward`, :func:`backward`: no autograd) and wraps them in one autograd function
(:func:`focused_linear_attention_triton`, which raises on what it cannot run; the checked entry is
:mod:`seg.kernels.focused_linear.triton.checked`).

Triton reads ``TRITON_INTERPRET`` when the kernels are defined, i.e. when this module is imported: set it to 1
before the import to run the kernels on CPU tensors through Triton's interpreter (slow; for tests).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from seg.kernels.focused_linear.triton.kernels import (
    INTERPRETED,
    apply_kernel,
    input_grad_kernel,
    key_grad_kernel,
    query_grad_summary_kernel,
    row_stats_kernel,
    summary_kernel,
    triton,
)
from seg.kernels.focused_linear.triton.tiles import INTERPRETER_TILES, Tiles, choose_tiles, device_shared_limit
from seg.kernels.focused_linear.triton.tiles import pad_head_dim as pad_head_dim

__all__ = ["MAX_HEAD_DIM", "SUPPORTED_DTYPES", "backward", "check_inputs", "focused_linear_attention_triton",
           "forward", "pad_head_dim", "triton_available"]

MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_BLOCKS_PER_SPLIT = 8  # token blocks a reduction program sums before its partial result is written
_INTERPRETED = INTERPRETED  # a module attribute of its own: tests switch it off to check the device guard


def triton_available() -> bool:
    """Whether the kernels can run: triton is installed and either a CUDA device is present or the kernels
    were defined for the interpreter (``TRITON_INTERPRET=1`` when this module was imported). Never raises."""
    try:
        return triton is not None and (_INTERPRETED or torch.cuda.is_available())
    except Exception:
        return False


def _device_of(x: Tensor) -> contextlib.AbstractContextManager:
    """Make x's CUDA device the current one while kernels are launched (triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _strides(x: Tensor) -> tuple[int, int]:
    """(image, token) strides of a (B, T, C) tensor whose channel stride is 1."""
    return x.stride(0), x.stride(1)


def plan_tiles(device: torch.device, d_pad: int, dtype: torch.dtype) -> Tiles:
    """The tile configuration of a call: chosen per device from its shared memory per block."""
    if _INTERPRETED:
        return INTERPRETER_TILES
    return choose_tiles(d_pad, dtype, device_shared_limit(device))


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive integers (no triton needed)."""
    return -(-a // b)


def split_blocks(blocks: int, wanted: int) -> tuple[int, int]:
    """(splits, blocks per split) of a reduction over ``blocks`` token blocks cut into at most ``wanted``
    contiguous splits of equal size (the last may be shorter)."""
    per_split = cdiv(blocks, max(1, min(wanted, blocks)))
    return cdiv(blocks, per_split), per_split


class _Plan:
    """Tiles and launch shapes for one call: B images, h heads of d channels, N queries, n keys.

    ``splits``: how many splits each reduction over tokens is cut into (at most one per token block); None
    lets the device decide (about four programs per multiprocessor, each summing at least
    ``MIN_BLOCKS_PER_SPLIT`` blocks; the interpreter's default is one split).
    """

    def __init__(self, q: Tensor, k: Tensor, num_heads: int, p: float, splits: int | None = None) -> None:
        B, N, C = q.shape
        self.B, self.N, self.n, self.C, self.h = B, N, k.shape[1], C, num_heads
        self.d = C // num_heads
        self.d_pad = pad_head_dim(self.d)
        self.p = float(p)
        self.p_int = int(p) if float(p).is_integer() and 1 <= p <= 8 else 0
        self.dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
        self.tiles = plan_tiles(q.device, self.d_pad, q.dtype)
        self.block = self.tiles.block
        self.chunks = self.d_pad // min(self.tiles.chunk, self.d_pad)
        self.forced_splits = splits
        self.programs = 2 if _INTERPRETED else 4 * torch.cuda.get_device_properties(q.device).multi_processor_count
        self.block_r = 16
        self.block_c = min(1 << (C - 1).bit_length(), 256 if not _INTERPRETED else 64)  # next power of two

    def meta(self) -> dict:
        """Compile-time parameters shared by the attention kernels."""
        return dict(BLOCK=self.block, D_PAD=self.d_pad, DC=self.d_pad // self.chunks, P=self.p, P_INT=self.p_int,
                    DOT_PRECISION=self.dot_precision, num_warps=self.tiles.num_warps,
                    num_stages=self.tiles.num_stages)

    def splits(self, tokens: int) -> tuple[int, int]:
        """(splits, token blocks per split) of a reduction over ``tokens``: the forced count where one was
        given, else about ``programs`` programs in all, each summing at least ``MIN_BLOCKS_PER_SPLIT`` blocks
        (one split when there are fewer)."""
        blocks = cdiv(tokens, self.block)
        if self.forced_splits is not None:
            return split_blocks(blocks, self.forced_splits)
        wanted = cdiv(self.programs, self.B * self.h * self.chunks)
        return split_blocks(blocks, min(wanted, blocks // MIN_BLOCKS_PER_SPLIT))


def _row_stats(x: Tensor, inv_temp: Tensor, plan: _Plan) -> tuple[Tensor, Tensor]:
    """1 / |y| and s = |y| / |g| per token of x (B, T, C), each (B * T,) float32."""
    rows = x.shape[0] * x.shape[1]
    inv_ny = torch.empty(rows, device=x.device, dtype=torch.float32)
    s = torch.empty_like(inv_ny)
    row_stats_kernel[(cdiv(rows, plan.block_r),)](
        x, inv_temp, inv_ny, s, rows, x.shape[1], plan.C, *_strides(x), BLOCK_R=plan.block_r,
        BLOCK_C=plan.block_c, P=plan.p, P_INT=plan.p_int, num_warps=4,
    )
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


def forward(
    q: Tensor, k: Tensor, v: Tensor, inv_temp: Tensor, num_heads: int, p: float, splits: int | None = None,
) -> tuple[Tensor, ...]:
    """Kernels' forward: out (B, N, C) in v's dtype, then what :func:`backward` needs: 1 / |y| and s of q and
    k ((B * N,), (B * n,)), KV (B * h, D, D) and k_mean (B * h, D), float32. ``splits``: see :class:`_Plan`."""
    plan = _Plan(q, k, num_heads, p, splits)
    B, N, n, C, h = plan.B, plan.N, plan.n, plan.C, plan.h
    with _device_of(q):
        inv_ny_q, s_q = _row_stats(q, inv_temp, plan)
        inv_ny_k, s_k = _row_stats(k, inv_temp, plan)
        splits, per_split = plan.splits(n)
        kv, km = _partial_buffers(plan, splits, q.device)
        summary_kernel[(B * h, splits, plan.chunks)](
            k, v, inv_temp, inv_ny_k, s_k, kv, km, n, plan.d, h, per_split, 1.0 / n, *_strides(k), *_strides(v),
            **plan.meta(),
        )
        kv, km = kv.sum(dim=1), km.sum(dim=1)  # (B * h, D, D), (B * h, D)
        out = torch.empty(B, N, C, device=q.device, dtype=v.dtype)
        apply_kernel[(B * h, cdiv(N, plan.block))](
            q, inv_temp, inv_ny_q, s_q, kv, km, out, N, plan.d, h, *_strides(q), *_strides(out), **plan.meta(),
        )
    return out, inv_ny_q, s_q, inv_ny_k, s_k, kv, km


def backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, inv_temp: Tensor, saved: tuple[Tensor, ...],
    num_heads: int, p: float, splits: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Kernels' backward from dL/dout (B, N, C) and :func:`forward`'s saved results: dL/dq, dL/dk, dL/dv in
    their inputs' dtypes and dL/d(1 / T) (C,) float32. ``splits``: see :class:`_Plan`."""
    inv_ny_q, s_q, inv_ny_k, s_k, kv, km = saved
    plan = _Plan(q, k, num_heads, p, splits)
    B, N, n, h = plan.B, plan.N, plan.n, plan.h
    device, f32 = q.device, torch.float32
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    with _device_of(q):
        # queries: dL/dKV, dL/dk_mean and the per-token scalars of the power's backward
        splits, per_split = plan.splits(N)
        grad_kv, grad_km = _partial_buffers(plan, splits, device)
        dot_q = torch.empty(B, N, h, device=device, dtype=f32)
        grad_s_q = torch.empty(B, N, h, device=device, dtype=f32)
        query_grad_summary_kernel[(B * h, splits, plan.chunks)](
            q, inv_temp, inv_ny_q, s_q, kv, km, grad_out, grad_kv, grad_km, dot_q, grad_s_q,
            N, plan.d, h, per_split, *_strides(q), *_strides(grad_out), **plan.meta(),
        )
        grad_kv, grad_km = grad_kv.sum(dim=1), grad_km.sum(dim=1)  # (B * h, D, D), (B * h, D)
        # keys: dL/dv and the per-token scalar dL/dphi . g_k
        key_blocks = cdiv(n, plan.block)
        grad_v = torch.empty(v.shape, device=device, dtype=v.dtype)
        dot_k = torch.empty(B, n, h, device=device, dtype=f32)
        key_grad_kernel[(B * h, key_blocks)](
            k, v, inv_temp, inv_ny_k, s_k, grad_kv, grad_km, grad_v, dot_k, n, plan.d, h, 1.0 / n,
            *_strides(k), *_strides(v), *_strides(grad_v), **plan.meta(),
        )
        # inputs through the power and the norms; per-token scalars summed over heads first
        query_blocks = cdiv(N, plan.block)
        grad_q = torch.empty(q.shape, device=device, dtype=q.dtype)
        grad_r_q = torch.empty(B * h, query_blocks, plan.d_pad, device=device, dtype=f32)
        input_grad_kernel[(B * h, query_blocks)](
            q, inv_temp, inv_ny_q, s_q, kv, km, grad_out, dot_q.sum(-1), grad_s_q.sum(-1), grad_q, grad_r_q,
            N, plan.d, h, 1.0, *_strides(q), *_strides(grad_out), *_strides(grad_q), IS_QUERY=True, **plan.meta(),
        )
        grad_k = torch.empty(k.shape, device=device, dtype=k.dtype)
        grad_r_k = torch.empty(B * h, key_blocks, plan.d_pad, device=device, dtype=f32)
        dot_k = dot_k.sum(-1)  # (B, n)
        input_grad_kernel[(B * h, key_blocks)](
            k, inv_temp, inv_ny_k, s_k, grad_kv, grad_km, v, dot_k, dot_k, grad_k, grad_r_k,
            n, plan.d, h, 1.0 / n, *_strides(k), *_strides(v), *_strides(grad_k), IS_QUERY=False, **plan.meta(),
        )
    return grad_q, grad_k, grad_v, _block_grad_r(grad_r_q, plan) + _block_grad_r(grad_r_k, plan)


def inverse_temperature(scale: Tensor, channels: int, device: torch.device) -> Tensor:
    """1 / softplus(scale) as a (C,) float32 vector on ``device``."""
    return F.softplus(scale.to(device=device, dtype=torch.float32)).reciprocal().reshape(channels)


def channels_last_stride(x: Tensor) -> Tensor:
    """x itself when its channel stride is 1 (any other strides are passed to the kernels), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


class _FocusedAttention(torch.autograd.Function):
    """Focused linear attention on token-layout tensors; forward and backward are Triton kernels."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, inv_temp: Tensor, num_heads: int, p: float) -> Tensor:
        out, *saved = forward(q, k, v, inv_temp, num_heads, p)
        ctx.save_for_backward(q, k, v, inv_temp, *saved)
        ctx.num_heads, ctx.p = num_heads, p
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, inv_temp, *saved = ctx.saved_tensors
        grads = backward(grad_out, q, k, v, inv_temp, tuple(saved), ctx.num_heads, ctx.p)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4], strict=True)) + (
            None, None)


def check_inputs(q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, focusing_factor: float) -> None:
    """Raise a ValueError / TypeError naming what the kernels do not take."""
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
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} is {t.dtype}; supported: float32, float16, bfloat16")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k and v must be on one device")
    if not _INTERPRETED and q.device.type != "cuda":
        raise ValueError(f"the compiled kernels take CUDA tensors, got {q.device}")


def focused_linear_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, focusing_factor: float = 3.0
) -> Tensor:
    """Focused linear attention without the DWC term through the kernels, differentiable with respect to q, k,
    v and scale; raises on what they cannot run (no checks against the reference: see
    :func:`seg.kernels.focused_linear.triton.checked.focused_linear_attention`).

    Args:
        q: raw query projections (B, N, C), float32 / float16 / bfloat16, channel stride 1 for no copy.
        k: raw key projections with the positional encoding added (B, n, C); n may differ from N.
        v: values (B, n, C), q's dtype.
        scale: the learnable temperature (1, 1, C); T = softplus(scale), taken in float32.
        num_heads: heads h, contiguous channel blocks (C = h * d, d <= 128).
        focusing_factor: the power p of the focusing function (p >= 1).

    Returns:
        (B, N, C) in v's dtype.
    """
    if not triton_available():
        raise RuntimeError(
            "focused_linear_attention_triton needs triton and a CUDA device, or TRITON_INTERPRET=1 set before "
            "seg.kernels.focused_linear.triton.launch is imported (Triton's CPU interpreter)"
        )
    check_inputs(q, k, v, scale, num_heads, focusing_factor)
    with torch.autocast(device_type=q.device.type, enabled=False):
        inv_temp = inverse_temperature(scale, q.shape[2], q.device)
        q, k, v = (channels_last_stride(t) for t in (q, k, v))
        return _FocusedAttention.apply(q, k, v, inv_temp, num_heads, float(focusing_factor))
