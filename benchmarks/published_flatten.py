"""The published focused linear attention, written literally from its formulation (FLatten, arXiv 2308.00442).

Used only as the reference the optimised :class:`seg.model.layers.FocusedLinearAttention` is timed against:
separate norms, element-wise power, renormalisation over all C channels, head split, mean-based z,
n^-0.5 scaling of k and v, DWC on v. It shares parameter names with the project's module, so the same
state dict drives both and their outputs can be compared before timing.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from seg.model.layers import FocusedLinearAttention, resize_token_grid


class PublishedFocusedLinearAttention(FocusedLinearAttention):
    """Same parameters as the project's module (sr = 1); forward written as the published formulation."""

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        B, N, C = x.shape
        H, W = size
        q = self.q(x)
        k, v = self.kv(x).reshape(B, -1, 2, C).permute(2, 0, 1, 3)  # 2 x (B, n, C)
        n = k.shape[1]
        k = k + resize_token_grid(self.positional_encoding, size)
        scale = nn.Softplus()(self.scale)
        q = nn.ReLU()(q) + 1e-6
        k = nn.ReLU()(k) + 1e-6
        q = q / scale
        k = k / scale
        q_norm = q.norm(dim=-1, keepdim=True)
        k_norm = k.norm(dim=-1, keepdim=True)
        q = q**self.focusing_factor
        k = k**self.focusing_factor
        q = (q / q.norm(dim=-1, keepdim=True)) * q_norm
        k = (k / k.norm(dim=-1, keepdim=True)) * k_norm
        h = self.num_heads
        q = q.reshape(B, N, h, -1).permute(0, 2, 1, 3)  # (B, h, N, d)
        k = k.reshape(B, n, h, -1).permute(0, 2, 1, 3)  # (B, h, n, d)
        v = v.reshape(B, n, h, -1).permute(0, 2, 1, 3)  # (B, h, n, d)
        z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        kv = (k.transpose(-2, -1) * (n**-0.5)) @ (v * (n**-0.5))
        out = q @ kv * z
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        v = v.reshape(B * h, H, W, -1).permute(0, 3, 1, 2)  # (B*h, d, H, W) as published
        out = out + self.dwc(v).reshape(B, C, N).permute(0, 2, 1)
        return self.proj_drop(self.proj(out))


def published_like(module: FocusedLinearAttention) -> PublishedFocusedLinearAttention:
    """A published-formulation twin of ``module`` holding the same parameters."""
    if module.sr_ratio != 1 or module.fused_qkv:
        raise ValueError("the published-formulation twin covers sr_ratio=1 with q / kv projections")
    twin = PublishedFocusedLinearAttention(
        module.proj.in_features, module.num_heads, qkv_bias=module.q.bias is not None,
        focusing_factor=module.focusing_factor, kernel_size=module.dwc.kernel_size[0],
    )
    twin.positional_encoding = nn.Parameter(module.positional_encoding.detach().clone())
    twin.load_state_dict(module.state_dict())
    return twin.to(module.proj.weight.device, module.proj.weight.dtype)


def replace_attention(model: nn.Module, make: Callable[[FocusedLinearAttention], nn.Module]) -> nn.Module:
    """``model`` with every focused linear attention layer replaced, in place, by ``make(layer)``."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is FocusedLinearAttention:
                setattr(parent, name, make(child))
    return model


__all__ = ["PublishedFocusedLinearAttention", "published_like", "replace_attention"]
