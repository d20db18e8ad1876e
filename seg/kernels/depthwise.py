"""Depthwise 'same' convolution on channels-last maps, shared by every depthwise filter of the encoders: PVT v2's
Mix-FFN (:class:`seg.model.layers.mlp.DWConv`) and focused linear attention's DWC term (rank restoration).

The transformer encoders hold tokens (B, N, C); viewed as a map (B, C, H, W) they are channels-last, and oneDNN runs
the convolution in that layout only when the map's strides read as channels-last. Viewing the tokens as
(B, H, W, C) and permuting does that (:func:`depthwise_tokens`); the earlier ``transpose(1, 2).reshape(B, C, H, W)``
gave a batch stride of C for B = 1 that does not read as channels-last, so oneDNN converted the map to NCHW and the
result back (two copies of the map per call, 35 % of FLatten-PVTv2-B0's forward at 512^2). The filters get
channels-last strides over the same memory too (:func:`channels_last_filters`, a view), so input and filters
agree; measured alone this is neutral (0.99-1.03x on the encoders, BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["DepthwiseConv", "channels_last_filters", "depthwise_conv_same", "depthwise_tokens"]


def channels_last_filters(weight: Tensor) -> Tensor:
    """Depthwise filters (C, 1, kh, kw) as a channels-last view of the same memory (no copy)."""
    C, one, kh, kw = weight.shape
    if one != 1:
        raise ValueError(f"depthwise filters are (C, 1, kh, kw), got {tuple(weight.shape)}")
    weight = weight.contiguous()
    return weight.as_strided(weight.shape, (kh * kw, 1, kw, 1))


class DepthwiseConv(torch.autograd.Function):
    """Depthwise 'same' convolution (odd square kernel, stride 1) with a backward made of two convolutions.

    dL/dx is the correlation of dL/dout with the flipped filters, and dL/dw[c] the correlation of the
    padded input channel c with dL/dout[c] used as a filter: both run through fast depthwise kernels,
    where the generic depthwise weight gradient is several times slower on CPU.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, channels_last_filters(weight), bias, padding=weight.shape[-1] // 2, groups=x.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        B, C = x.shape[:2]
        pad = weight.shape[-1] // 2
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad_out, channels_last_filters(weight.flip(-2, -1)), padding=pad, groups=C)
        if ctx.needs_input_grad[1]:
            grad_w = sum(  # (1, C, k, k) per image: its dL/dout[c] (H x W) is the filter for channel c
                F.conv2d(x[i : i + 1], grad_out[i].unsqueeze(1), padding=pad, groups=C) for i in range(B)
            ).view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b


def depthwise_conv_same(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Depthwise convolution with 'same' padding: x (B, C, H, W), weight (C, 1, k, k)."""
    k = weight.shape[-1]
    if k % 2 == 0 or weight.shape[-2] != k:
        return F.conv2d(x, weight, bias, padding="same", groups=x.shape[1])
    device = x.device.type
    if torch.is_autocast_enabled(device):  # cast as autocast would, so forward and backward agree on dtypes
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device, enabled=False):
            return DepthwiseConv.apply(x, weight, bias)
    return DepthwiseConv.apply(x, weight, bias)


def depthwise_tokens(x: Tensor, size: tuple[int, int], weight: Tensor, bias: Tensor | None) -> Tensor:
    """Depthwise 'same' convolution of tokens (B, N, C) on their H x W grid ``size`` -> (B, N, C), no layout copy
    when x is contiguous (weight (C, 1, k, k), bias (C,))."""
    B, N, C = x.shape
    x_map = x.reshape(B, *size, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last memory
    out = depthwise_conv_same(x_map, weight, bias)  # (B, C, H, W), channels-last
    return out.permute(0, 2, 3, 1).reshape(B, N, C)  # (B, N, C), a view when out is channels-last
