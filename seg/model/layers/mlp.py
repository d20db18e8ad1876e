"""The transformer MLP of the encoders: fc1 -> (3x3 depthwise conv, PVT v2) -> GELU -> fc2.

The linear layers are :class:`seg.kernels.onednn.Linear` (oneDNN on float32 CPU tensors), and fc1 + GELU run
as one fused product where :func:`seg.kernels.onednn.linear_gelu` can (CPU inference)."""

from __future__ import annotations

from torch import Tensor, nn

from seg.kernels.depthwise import depthwise_tokens
from seg.kernels.onednn import Linear, linear_gelu

__all__ = ["DWConv", "Mlp"]


class DWConv(nn.Module):
    """3x3 depthwise conv over the token grid (PVT v2's Mix-FFN), run channels-last like the tokens
    (:func:`seg.kernels.depthwise.depthwise_tokens`: no layout copy around it)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, N, C) tokens of an H x W grid ``size`` -> (B, N, C)."""
        return depthwise_tokens(x, size, self.dwconv.weight, self.dwconv.bias)


class Mlp(nn.Module):
    """fc1 -> (depthwise conv when ``conv``) -> activation -> fc2; parameter names as timm's / PVT's ``Mlp``.

    Args:
        dim: input and output channels.
        hidden: hidden channels.
        conv: PVT v2's 3x3 depthwise conv after fc1 (the forward then needs the token grid).
        drop: dropout after the activation and after fc2.
        act_layer: activation (exact GELU by default; SOFT uses the tanh approximation).
    """

    def __init__(self, dim: int, hidden: int, conv: bool = False, drop: float = 0.0,
                 act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.dwconv = DWConv(hidden) if conv else None
        self.act = act_layer()
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """(B, N, C) tokens (of an H x W grid ``size``, needed with ``conv``) -> (B, N, C)."""
        if self.dwconv is None and type(self.act) is nn.GELU:  # fc1 + GELU: one fused product where it can
            x = self.drop(linear_gelu(x, self.fc1.weight, self.fc1.bias, self.act.approximate))
            return self.drop(self.fc2(x))
        x = self.fc1(x)
        if self.dwconv is not None:
            if size is None:
                raise ValueError("an Mlp with a depthwise conv needs the token grid size")
            x = self.dwconv(x, size)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))
