"""Attention layers: pure maths over (B, h, N, d) tensors plus thin modules."""

from seg.layers.focused_linear import (
    FocusedLinearAttention,
    focus,
    focused_kernel,
    focused_linear_attention,
    focused_linear_attention_tokens,
    linear_attention,
    resize_token_grid,
)
from seg.layers.soft import NewtonInverse, SoftAttention, gaussian_kernel, newton_inverse, newton_pinv, soft_attention
from seg.layers.softmax import SpatialReductionAttention
from seg.layers.window import WindowAttention, resize_bias_table

__all__ = [
    "FocusedLinearAttention",
    "NewtonInverse",
    "SoftAttention",
    "SpatialReductionAttention",
    "WindowAttention",
    "focus",
    "focused_kernel",
    "focused_linear_attention",
    "focused_linear_attention_tokens",
    "gaussian_kernel",
    "linear_attention",
    "newton_inverse",
    "newton_pinv",
    "resize_bias_table",
    "resize_token_grid",
    "soft_attention",
]
