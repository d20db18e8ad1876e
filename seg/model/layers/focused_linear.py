"""The focused linear attention layer of the FLatten encoders: projections, positional encoding, DWC.

The maths is in :mod:`seg.kernels.focused_linear.reference` (pure functions, beside the fast paths that are
tested against it); ``forward`` asks the operation's dispatch
(:func:`seg.kernels.focused_linear.select_mode`) which implementation runs this call, the readable reference
or a fast path (CPU closed-form backward, folded CPU inference, Triton kernels), each tested equal to it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seg.kernels.focused_linear import attention, check_backend, fused_inference, rank_restoration, select_mode
from seg.kernels.focused_linear.reference import resize_token_grid
from seg.model.layers.projections import ProjectedAttention

__all__ = ["FocusedLinearAttention"]


class FocusedLinearAttention(ProjectedAttention):
    """Focused linear attention over an H x W token grid, as in the published FLatten models.

    Parameter names match the published checkpoints: ``q``, ``kv`` (or ``qkv`` when ``fused_qkv``),
    ``proj``, ``scale``, ``positional_encoding``, ``dwc`` and, with ``sr_ratio > 1``, ``sr``, ``norm``.

    Args:
        dim: channels C.
        num_heads: heads h; head dim d = C / h.
        grid_size: (H, W) token grid the positional encoding is stored at (the training grid,
            56 x 56 for stage 1 at 224 x 224). It is resized to any other grid on the fly.
        qkv_bias: bias in the q / kv projections.
        sr_ratio: spatial reduction of keys and values (conv k = s = sr, then LayerNorm).
        focusing_factor: power p of the focusing function.
        kernel_size: DWC kernel; one depthwise filter bank of size d shared by all heads.
        proj_drop: dropout after the output projection.
        fused_qkv: one ``qkv`` projection (Swin naming) instead of ``q`` and ``kv`` (PVT naming).

        attn_backend: ``auto``, ``reference``, ``cpu`` or ``triton`` (see :mod:`seg.kernels.focused_linear`);
            a plain attribute, also set model-wide by :func:`seg.kernels.set_backend`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: tuple[int, int] = (56, 56),
        qkv_bias: bool = True,
        sr_ratio: int = 1,
        focusing_factor: float = 3.0,
        kernel_size: int = 5,
        proj_drop: float = 0.0,
        fused_qkv: bool = False,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__(dim, num_heads, {"qkv": 3} if fused_qkv else {"q": 1, "kv": 2}, qkv_bias, sr_ratio,
                         proj_drop, fused=fused_qkv)
        self.focusing_factor = focusing_factor
        self.fused_qkv = fused_qkv
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2,
                             groups=self.head_dim)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        kv_grid = (grid_size[0] // sr_ratio) * (grid_size[1] // sr_ratio)
        self.positional_encoding = nn.Parameter(torch.zeros(1, kv_grid, dim))
        self.attn_backend = check_backend(attn_backend)

    def positional_encoding_at(self, size: tuple[int, int]) -> Tensor:
        """The positional encoding resized to an (H', W') key grid: (1, H' * W', C)."""
        return resize_token_grid(self.positional_encoding, size)

    def projection_weights(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor, Tensor | None]:
        """(w, b) of q, k and v, whichever of ``q`` / ``kv`` / ``qkv`` holds them."""
        if self.fused_qkv:
            wq, wk, wv = self.qkv.weight.chunk(3)
            bq, bk, bv = self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None, None, None)
        else:
            wq, bq = self.q.weight, self.q.bias
            wk, wv = self.kv.weight.chunk(2)
            bk, bv = self.kv.bias.chunk(2) if self.kv.bias is not None else (None, None)
        return wq, bq, wk, bk, wv, bv

    def project(self, x: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
        """q (B, N, C), k with the positional encoding and v (B, n, C), and the key grid (H', W')."""
        if self.fused_qkv:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            kv_size = size
        else:
            x_kv, kv_size = self.key_value_tokens(x, size)
            q = self.q(x)
            k, v = self.kv(x_kv).chunk(2, dim=-1)
        return q, k + self.positional_encoding_at(kv_size).to(k.dtype), v, kv_size

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x: (B, N, C) tokens of an H x W grid (N = H * W) -> (B, N, C)."""
        B, N, C = x.shape
        H, W = size
        if N != H * W:
            raise ValueError(f"{N} tokens do not form a {H} x {W} grid")
        h, p = self.num_heads, self.focusing_factor
        mode = select_mode(self.attn_backend, x, global_keys=self.sr_ratio == 1)
        if mode == "cpu_inference":  # projections, kernel and DWC folded into one pass
            out = fused_inference(x, size, self.projection_weights(), self.positional_encoding, self.scale,
                                  self.dwc.weight, self.dwc.bias, h, p)
        else:
            q, k, v, kv_size = self.project(x, size)
            out = attention(q, k, v, self.scale, h, p, mode)
            out = out + rank_restoration(v, kv_size, size, self.dwc.weight, self.dwc.bias, h, mode)
        return self.proj_drop(self.proj(out))
