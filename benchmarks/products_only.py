"""A lower bound on the CPU time of focused linear attention: its matrix products and DWC, nothing else.

:class:`ProductsOnly` runs what the folded inference of :class:`seg.model.layers.FocusedLinearAttention` multiplies
(one stacked q / k projection, the v projection, the per-head (d, d) summaries, the queries against them, the
output projection) and its depthwise convolution, with the same kernels (oneDNN linears, channels-last DWC),
and drops every element-wise step: kernel function, norms, power, normaliser, positional encoding. Its output
is not attention; its time is what no element-wise fusion can go below with these products, in inference and,
under autograd, forward + backward.
"""

from __future__ import annotations

import torch
from published_flatten import replace_attention  # benchmarks/ is on the path of every script here
from torch import Tensor, nn

from seg.kernels.focused_linear.cpu import rank_restoration
from seg.kernels.focused_linear.cpu.closed_form import heads
from seg.kernels.onednn import linear
from seg.model.layers import FocusedLinearAttention


class ProductsOnly(nn.Module):
    """The products and DWC of ``layer`` (global keys), sharing its parameters."""

    def __init__(self, layer: FocusedLinearAttention) -> None:
        super().__init__()
        if layer.sr_ratio != 1:
            raise ValueError("the products-only bound covers layers with global keys (sr_ratio=1)")
        self.layer = layer

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        a = self.layer
        B, N, C = x.shape
        h = a.num_heads
        wq, bq, wk, bk, wv, bv = a.projection_weights()
        bias = None if bq is None else torch.cat([bq, bk])
        qk = linear(x, torch.cat([wq, wk]), bias).view(B, N, 2, C)  # (B, N, 2, C)
        v = linear(x, wv, bv)  # (B, N, C)
        summaries = heads(qk[:, :, 1], h).transpose(-2, -1) @ heads(v, h)  # (B, h, d, d)
        out = rank_restoration(v, size, size, a.dwc.weight, a.dwc.bias, h)  # (B, N, C)
        heads(out, h).add_(heads(qk[:, :, 0], h) @ summaries)
        return a.proj(out)


def products_only(model: nn.Module) -> nn.Module:
    """``model`` with every focused linear attention layer replaced by its :class:`ProductsOnly` bound."""
    return replace_attention(model, ProductsOnly)


__all__ = ["ProductsOnly", "products_only"]
