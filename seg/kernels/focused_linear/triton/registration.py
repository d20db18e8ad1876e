"""The Triton path as one ``torch.library`` operator (``seg::focused_linear_attention``): opaque to
``torch.compile``, with a fake implementation for tracing and the backward registered through
``register_autograd`` (``torch.library.custom_op``, torch >= 2.4 as the project requires).

The implementations themselves (kernels or reference, chosen inside) come from
:mod:`seg.kernels.focused_linear.triton.checked`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["register"]

ForwardImpl = Callable[[Tensor, Tensor, Tensor, Tensor, int, float], list[Tensor]]
BackwardImpl = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor], int, float], list[Tensor]]
SavedShapes = Callable[[Tensor, Tensor, int], list[tuple[int, ...]]]
Attention = Callable[[Tensor, Tensor, Tensor, Tensor, int, float], Tensor]

_FORWARD_SCHEMA = "(Tensor q, Tensor k, Tensor v, Tensor scale, int num_heads, float p) -> Tensor[]"
_BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor scale, Tensor[] saved, int num_heads, float p)"
    " -> Tensor[]"
)


def _outside_autocast(fn: Callable) -> Callable:
    """fn run with autocast off on the device of its second argument (the first tensor for the forward)."""

    def run(*args):
        device = next(a for a in args if isinstance(a, Tensor)).device.type
        with torch.autocast(device, enabled=False):
            return fn(*args)

    return run


def register(forward_impl: ForwardImpl, backward_impl: BackwardImpl, saved_shapes: SavedShapes) -> Attention:
    """The attention callable (q, k, v, scale, num_heads, p) -> out, as a registered operator."""
    forward_impl, backward_impl = _outside_autocast(forward_impl), _outside_autocast(backward_impl)

    # explicit schemas: torch 2.4 cannot infer one from postponed (string) annotations
    @torch.library.custom_op("seg::focused_linear_attention", mutates_args=(), schema=_FORWARD_SCHEMA)
    def forward_op(q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, p: float) -> list[Tensor]:
        return forward_impl(q, k, v, scale, num_heads, p)

    @forward_op.register_fake
    def _(q: Tensor, k: Tensor, v: Tensor, scale: Tensor, num_heads: int, p: float) -> list[Tensor]:
        out = q.new_empty(q.shape, dtype=v.dtype)
        return [out] + [q.new_empty(shape, dtype=torch.float32) for shape in saved_shapes(q, k, num_heads)]

    @torch.library.custom_op("seg::focused_linear_attention_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
    def backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: Tensor, saved: list[Tensor],
                    num_heads: int, p: float) -> list[Tensor]:
        return backward_impl(grad_out, q, k, v, scale, saved, num_heads, p)

    @backward_op.register_fake
    def _(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: Tensor, saved: list[Tensor],
          num_heads: int, p: float) -> list[Tensor]:
        return [torch.empty_like(t) for t in (q, k, v, scale)]

    def setup_context(ctx, inputs: tuple, output: list[Tensor]) -> None:
        q, k, v, scale, num_heads, p = inputs
        ctx.save_for_backward(q, k, v, scale, *output[1:])
        ctx.num_heads, ctx.p = num_heads, p

    def backward(ctx, grads: list[Tensor | None]) -> tuple[Tensor | None, ...]:
        q, k, v, scale, *saved = ctx.saved_tensors
        grad_out = grads[0] if grads[0] is not None else torch.zeros_like(q, dtype=v.dtype)
        return (*backward_op(grad_out, q, k, v, scale, saved, ctx.num_heads, ctx.p), None, None)

    forward_op.register_autograd(backward, setup_context=setup_context)
    return lambda q, k, v, scale, num_heads, p: forward_op(q, k, v, scale, num_heads, p)[0]

