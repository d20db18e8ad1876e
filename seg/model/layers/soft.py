"""Softmax-free attention (SOFT, Lu et al., NeurIPS 2021, arXiv 2110.11945; SOFT-Norm: IJCV, arXiv 2207.03341).

Softmax is replaced by a Gaussian kernel on shared queries and keys (K = Q, both scaled by d^-1/4):
S_ij = exp(-|q_i - q_j|^2 / 2). The N x N matrix is never formed: with m bottleneck tokens q~ taken from
Q, S ~ A pinv(B) A^T where A = K(Q, Q~) is N x m and B = K(Q~, Q~) is m x m, and the output

    out = A @ (pinv(B) @ (A^T @ V)) + DWConv(V)          cost O(N m d + m^2 d + m^3 * iterations).

pinv(B) comes from Newton-Raphson iterations on P = B + 0.01 I (:func:`newton_inverse`), run without autograd:
:class:`NewtonInverse` backpropagates the analytic gradient of a matrix inverse. SOFT-Norm replaces pinv(B) by
D^-1/2 pinv(B) D^-1/2 with D the row sums of B (better behaved at the large token counts of dense tasks).

Bottleneck grid: for an H x W map and reduction sr the m = ceil(H / sr) * ceil(W / sr) tokens come from a
strided conv (kernel = stride = sr, one filter bank shared by all heads) over Q zero-padded at the bottom /
right to a multiple of sr, then LayerNorm + GELU (as the published models); or from ceil-mode average pooling,
whose edge windows average only the pixels inside the map (the paper's description).

Numerics: the kernel, the inverse, the normalisation and the three products run in float32 (float64 inputs
stay float64) with autocast disabled; the result is cast back to v's dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from seg.kernels.onednn import Linear

__all__ = [
    "NewtonInverse",
    "SoftAttention",
    "gaussian_kernel",
    "newton_inverse",
    "newton_pinv",
    "soft_attention",
]

NEWTON_ITERS = 20  # iterations of every published model
NEWTON_REG = 0.01  # P = B + 0.01 I keeps the iteration away from B's near-zero eigenvalues
PUBLISHED_DWC_KERNEL = {8: 9, 4: 5, 2: 3, 1: 3}  # DWConv kernel of the published stage with this sr


def gaussian_kernel(x: Tensor, y: Tensor) -> Tensor:
    """exp(-|x_i - y_j|^2 / 2) from |x|^2 + |y|^2 - 2 x.y: (..., N, d), (..., M, d) -> (..., N, M).

    Computed in x's dtype; squared distances below zero (cancellation) are clamped to zero.
    """
    sq = x.square().sum(-1, keepdim=True) + y.square().sum(-1).unsqueeze(-2) - 2.0 * (x @ y.transpose(-2, -1))
    return torch.exp(-0.5 * sq.clamp_min(0.0))


def newton_inverse(mat: Tensor, iters: int = NEWTON_ITERS, reg: float = NEWTON_REG) -> Tensor:
    """Newton-Raphson (Newton-Schulz) approximation of (mat + reg I)^-1, batched over leading dims, no autograd.

    V_0 = alpha P^T with alpha = 0.9 * 2 / (max row sum of |mat|)^2 per matrix, V_{k+1} = 2 V_k - V_k P V_k.
    For the symmetric non-negative kernel matrices here P^T = P and the max row sum bounds the spectral
    norm, so alpha sigma_max(P)^2 < 2 and the iteration converges quadratically; eigenvalues much smaller
    than sqrt(1 / alpha) converge late, which truncates them the way a pseudo-inverse would.

    Args:
        mat: (..., m, m) matrices.
        iters: Newton-Raphson iterations.
        reg: ridge added to the diagonal before inverting.
    """
    with torch.no_grad():
        eye = torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
        p = mat + reg * eye
        row_sum = mat.abs().sum(-1).amax(-1)  # (...) max row sum per matrix
        alpha = (0.9 * 2.0 / row_sum.square().clamp_min(1e-12))[..., None, None]
        v = alpha * p.transpose(-2, -1)
        for _ in range(iters):
            v = 2.0 * v - v @ (p @ v)
        return v


class NewtonInverse(torch.autograd.Function):
    """(B + reg I)^-1 by :func:`newton_inverse`, with the analytic backward dL/dB = -V^T (dL/dV) V^T."""

    @staticmethod
    def forward(ctx: FunctionCtx, mat: Tensor, iters: int, reg: float) -> Tensor:
        inverse = newton_inverse(mat, iters, reg)
        ctx.save_for_backward(inverse)
        return inverse

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        inverse_t = inverse.transpose(-2, -1)
        return -(inverse_t @ grad @ inverse_t), None, None


def newton_pinv(mat: Tensor, iters: int = NEWTON_ITERS, reg: float = NEWTON_REG) -> Tensor:
    """Differentiable (mat + reg I)^-1 for (..., m, m) kernel matrices; see :class:`NewtonInverse`."""
    return NewtonInverse.apply(mat, iters, reg)


def soft_attention(
    q: Tensor,
    landmarks: Tensor,
    v: Tensor,
    normalize: bool = False,
    iters: int = NEWTON_ITERS,
    reg: float = NEWTON_REG,
) -> Tensor:
    """A pinv(B) A^T V without the DWConv term, in linear order, returned in v's dtype.

    Args:
        q: queries (= keys), already scaled by d^-1/4 (B, h, N, d).
        landmarks: the m bottleneck tokens (B, h, m, d), on the same scale.
        v: values (B, h, N, d).
        normalize: SOFT-Norm: use D^-1/2 pinv(B) D^-1/2 with D the row sums of B.
        iters: Newton-Raphson iterations.
        reg: ridge of the inverse.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, landmarks, vf = q.to(dtype), landmarks.to(dtype), v.to(dtype)
        a = gaussian_kernel(q, landmarks)  # (B, h, N, m)
        b = gaussian_kernel(landmarks, landmarks)  # (B, h, m, m)
        b_inv = newton_pinv(b, iters, reg)
        if normalize:
            d_inv_sqrt = b.sum(-1).rsqrt()  # (B, h, m), row sums >= 1 (unit diagonal)
            b_inv = d_inv_sqrt.unsqueeze(-1) * b_inv * d_inv_sqrt.unsqueeze(-2)
        summary = b_inv @ (a.transpose(-2, -1) @ vf)  # (B, h, m, d)
        out = a @ summary  # (B, h, N, d)
    return out.to(v.dtype)


class SoftAttention(nn.Module):
    """SOFT attention over an H x W token grid, a drop-in for the PVT block's attention.

    Parameters: ``q`` and ``v`` projections (no key projection), ``landmark`` (strided conv, no bias) and
    ``landmark_norm`` (LayerNorm over d) when ``landmarks='conv'``, ``dwc`` (one k x k filter per head shared
    over its d channels, no bias) and ``proj``.

    Args:
        dim: channels C.
        num_heads: heads h; head dim d = C / h (32 in the published models).
        sr_ratio: reduction of the bottleneck grid (8, 4, 2 in stages 1-3); 1 keeps m = N (cubic in N).
        kernel_size: DWConv kernel; None takes the published stage's (9 for sr 8, 5 for sr 4, else 3).
        qkv_bias: bias in the q / v projections.
        landmarks: ``'conv'`` (strided conv + LayerNorm + GELU, published code) or ``'pool'`` (average pooling).
        normalize: SOFT-Norm, D^-1/2 pinv(B) D^-1/2.
        newton_iters: Newton-Raphson iterations of the inverse.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int = 1,
        kernel_size: int | None = None,
        qkv_bias: bool = True,
        landmarks: Literal["conv", "pool"] = "conv",
        normalize: bool = False,
        newton_iters: int = NEWTON_ITERS,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if landmarks not in ("conv", "pool"):
            raise ValueError(f"landmarks must be 'conv' or 'pool', got {landmarks!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.landmarks = landmarks
        self.normalize = normalize
        self.newton_iters = newton_iters
        kernel_size = PUBLISHED_DWC_KERNEL.get(sr_ratio, 3) if kernel_size is None else kernel_size
        d = self.head_dim
        self.q = Linear(dim, dim, bias=qkv_bias)
        self.v = Linear(dim, dim, bias=qkv_bias)
        if landmarks == "conv":
            self.landmark = nn.Conv2d(d, d, kernel_size=sr_ratio, stride=sr_ratio, bias=False)
            self.landmark_norm = nn.LayerNorm(d)
        self.dwc = nn.Conv2d(num_heads, num_heads, kernel_size, padding=kernel_size // 2, groups=num_heads,
                             bias=False)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def bottleneck(self, q: Tensor, size: tuple[int, int]) -> Tensor:
        """The m = ceil(H / sr) * ceil(W / sr) bottleneck tokens of scaled queries: (B, h, N, d) -> (B, h, m, d)."""
        B, h, N, d = q.shape
        s = self.sr_ratio
        q_map = q.transpose(2, 3).reshape(B * h, d, *size)  # (B*h, d, H, W)
        if self.landmarks == "pool":
            grid = F.avg_pool2d(q_map, s, s, ceil_mode=True) if s > 1 else q_map  # (B*h, d, H', W')
            return grid.reshape(B, h, d, -1).transpose(2, 3)  # (B, h, m, d)
        q_map = F.pad(q_map, (0, -size[1] % s, 0, -size[0] % s))  # (B*h, d, s*H', s*W')
        grid = self.landmark(q_map)  # (B*h, d, H', W')
        tokens = grid.reshape(B, h, d, -1).transpose(2, 3)  # (B, h, m, d)
        return F.gelu(self.landmark_norm(tokens))

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x: (B, N, C) tokens of an H x W grid (N = H * W) -> (B, N, C)."""
        B, N, C = x.shape
        H, W = size
        if N != H * W:
            raise ValueError(f"{N} tokens do not form a {H} x {W} grid")
        h, d = self.num_heads, self.head_dim
        q = self.q(x).reshape(B, N, h, d).transpose(1, 2) * d**-0.25  # (B, h, N, d), K = Q
        v = self.v(x).reshape(B, N, h, d).transpose(1, 2)  # (B, h, N, d)
        out = soft_attention(q, self.bottleneck(q, size), v, self.normalize, self.newton_iters)
        v_map = v.permute(0, 3, 1, 2).reshape(B * d, h, H, W)  # (B*d, h, H, W): one filter per head
        out = out + self.dwc(v_map).reshape(B, d, h, N).permute(0, 2, 3, 1)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(out))
