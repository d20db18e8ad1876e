"""Attention layers: one readable, autograd-differentiable implementation of each attention's maths (pure
functions over (B, h, N, d) tensors plus thin modules); focused linear attention keeps its maths beside its fast
paths in :mod:`seg.kernels.focused_linear` (reference.py, cpu.py, triton.py) and is re-exported here."""

from seg.kernels.focused_linear.reference import (
    focus,
    focused_kernel,
    focused_linear_attention,
    linear_attention,
    resize_token_grid,
)
from seg.model.layers.agent import AgentAttention, agent_attention, agent_position_biases
from seg.model.layers.focused_linear import FocusedLinearAttention
from seg.model.layers.mala import MALAttention, magnitude_aware_linear_attention
from seg.model.layers.mlla import MllaAttention, conv_tokens, mlla_linear_attention
from seg.model.layers.mlp import DWConv, Mlp
from seg.model.layers.plugin import FocusedLinearAttention2d
from seg.model.layers.pola import PolaLinearAttention, polarity_aware_linear_attention
from seg.model.layers.precision import at_least_fp32, elu_feature_inputs
from seg.model.layers.rala import (
    RALAttention,
    RoPESoftmaxAttention,
    rank_augmented_linear_attention,
    rope_softmax_attention,
)
from seg.model.layers.rope import RoPE, apply_rope, rope_frequencies, rotate_pairs
from seg.model.layers.soft import (
    NewtonInverse,
    SoftAttention,
    gaussian_kernel,
    newton_inverse,
    newton_pinv,
    soft_attention,
)
from seg.model.layers.softmax import SpatialReductionAttention
from seg.model.layers.window import WindowAttention, resize_bias_table

__all__ = [
    "AgentAttention",
    "DWConv",
    "FocusedLinearAttention",
    "FocusedLinearAttention2d",
    "MALAttention",
    "MllaAttention",
    "Mlp",
    "NewtonInverse",
    "PolaLinearAttention",
    "RALAttention",
    "RoPE",
    "RoPESoftmaxAttention",
    "SoftAttention",
    "SpatialReductionAttention",
    "WindowAttention",
    "agent_attention",
    "agent_position_biases",
    "apply_rope",
    "at_least_fp32",
    "conv_tokens",
    "elu_feature_inputs",
    "focus",
    "focused_kernel",
    "focused_linear_attention",
    "gaussian_kernel",
    "linear_attention",
    "magnitude_aware_linear_attention",
    "mlla_linear_attention",
    "newton_inverse",
    "newton_pinv",
    "polarity_aware_linear_attention",
    "rank_augmented_linear_attention",
    "resize_bias_table",
    "resize_token_grid",
    "rope_frequencies",
    "rope_softmax_attention",
    "rotate_pairs",
    "soft_attention",
]
