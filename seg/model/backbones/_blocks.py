"""The transformer block of the token-pyramid skeletons (PVT, Swin, SOFT): attention and MLP residuals around
any attention mapping (tokens (B, N, C), (H, W)) -> (B, N, C); parameter names as the published checkpoints
(``norm1``, ``attn``, ``norm2``, ``mlp``)."""

from __future__ import annotations

from collections.abc import Callable

from timm.layers import DropPath
from torch import Tensor, nn

from seg.model.layers.mlp import Mlp

__all__ = ["Block"]


class Block(nn.Module):
    """Pre-norm block x += attn(LN x); x += MLP(LN x), or with ``post_norm`` SOFT's x = LN(x + attn(x));
    x = LN(x + MLP(x)).

    Args:
        dim: channels C.
        mlp_ratio: MLP expansion.
        attn_layer: builds the block's attention (a closure over its heads, grid and reduction).
        conv_mlp: PVT v2's 3x3 depthwise conv inside the MLP.
        drop: dropout after the MLP's activation and projection.
        drop_path: stochastic depth rate of the two residual branches.
        norm_layer: the two norms (PVT and SOFT's softmax stage: LayerNorm eps 1e-6; Swin, SOFT: 1e-5).
        act_layer: the MLP's activation (SOFT: tanh-GELU).
        post_norm: normalise after each residual sum (SOFT's stages 1-3).
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        attn_layer: Callable[[], nn.Module],
        conv_mlp: bool = False,
        drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        post_norm: bool = False,
    ) -> None:
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), conv=conv_mlp, drop=drop, act_layer=act_layer)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, N, C) tokens of an H x W grid -> (B, N, C)."""
        if self.post_norm:
            x = self.norm1(x + self.drop_path(self.attn(x, size)))
            return self.norm2(x + self.drop_path(self.mlp(x, size)))
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x), size))
