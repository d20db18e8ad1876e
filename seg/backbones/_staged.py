"""The staged-encoder base of every encoder family: timm's feature API over four stages, the classifier,
gradient checkpointing and the attention backend switch, written once. FLatten-PVT / PVTv2, FLatten-Swin, SOFT,
MLLA and RAVLT subclass it directly; Agent-PVT and Agent-Swin through the PVT and Swin classes.

A family describes its trunk with four small methods: :meth:`~StagedEncoder._begin` (before stage 0),
:meth:`~StagedEncoder._stage` (one stage: the state for the next stage and, when asked, the stage's NCHW
feature map), :meth:`~StagedEncoder._end` (the output of a complete or early-stopped trunk) and
:meth:`~StagedEncoder._prune` (drop the modules of stages and norms that are no longer used). Pooling and
the classifier are :class:`~seg.backbones._registry.ClassifierBackbone`'s.

Per-stage output norms (LayerNorms on the feature maps, the segmentation backbones' ``norm0..3``) exist only
in models built for features (``feature_norms=True``, which ``features_only=True`` sets): a classifier never
uses them, and a parameter without a gradient breaks the classifier's training (timm's contract: every
parameter gets a gradient) and DDP. Families register them with :meth:`~StagedEncoder._add_output_norm`;
the base applies them to the returned feature maps and prunes them with the stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from seg.backbones._registry import ClassifierBackbone
from seg.kernels import set_backend

__all__ = ["AttentionFactory", "StagedEncoder", "stage_factories"]

# (dim, num_heads, grid_size, sr_ratio) -> attention module taking (tokens (B, N, C), (H, W)).
AttentionFactory = Callable[[int, int, tuple[int, int], int], nn.Module]


def stage_factories(
    attn_type: str, letters: dict[str, AttentionFactory], attn_layers: Sequence[AttentionFactory] | None
) -> list[AttentionFactory]:
    """One attention factory per stage: ``attn_layers`` when given, else the letters of ``attn_type``."""
    if attn_layers is not None:
        if len(attn_layers) != len(attn_type):
            raise ValueError(f"attn_layers needs one factory per stage ({len(attn_type)}), got {len(attn_layers)}")
        return list(attn_layers)
    unknown = set(attn_type) - set(letters)
    if unknown:
        raise ValueError(f"attn_type {attn_type!r}: unknown letter(s) {', '.join(sorted(unknown))}; "
                         f"valid: {', '.join(letters)}")
    return [letters[letter] for letter in attn_type]


class StagedEncoder(ClassifierBackbone):
    """Base of the staged encoders; subclasses set ``_num_stages`` and implement the trunk methods."""

    _num_stages: int
    grad_checkpointing: bool = False

    def __init__(self, feature_norms: bool = False) -> None:
        super().__init__()
        self.feature_norms = feature_norms
        self._output_norms: dict[int, str] = {}  # stage index -> name of its output norm

    def _add_output_norm(self, i: int, name: str, norm: nn.Module) -> str | None:
        """Register ``norm`` as stage i's output norm ``name`` when ``feature_norms``; returns the name or None."""
        if not self.feature_norms:
            return None
        parent, _, leaf = name.rpartition(".")  # a dotted name registers inside an existing container
        (self.get_submodule(parent) if parent else self).add_module(leaf, norm)
        self._output_norms[i] = name
        return name

    def _begin(self, x: Tensor) -> Any:
        """The state stage 0 starts from (default: the image itself)."""
        return x

    def _stage(self, i: int, state: Any, feature: bool) -> tuple[Any, Tensor | None]:
        """Run stage i: (state for stage i + 1, its feature map (B, C_i, H_i, W_i) when ``feature``)."""
        raise NotImplementedError

    def _end(self, state: Any, complete: bool) -> Tensor:
        """What :meth:`forward_features` returns, or the last computed stage's output when stopped early."""
        raise NotImplementedError

    def _prune(self, max_index: int, take_indices: list[int], prune_norm: bool) -> None:
        """Remove the modules of stages after ``max_index`` and the final norm when ``prune_norm`` (the output
        norms of stages not in ``take_indices`` are already gone)."""
        raise NotImplementedError

    def _feature(self, i: int, x: Tensor, final_norm: bool) -> Tensor:
        """Stage i's feature map (B, C, H, W) through its output norm, if built, then the final ``norm``."""
        norms = [self.get_submodule(self._output_norms[i])] if i in self._output_norms else []
        if final_norm and isinstance(getattr(self, "norm", None), nn.Module):
            norms.append(self.norm)
        for norm in norms:  # LayerNorms over C: (B, C, H, W) -> (B, H, W, C) -> (B, C, H, W)
            x = norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x

    def set_attn_backend(self, backend: str) -> None:
        """Set ``attn_backend`` (``auto`` / ``reference`` / ``cpu`` / ``triton``, see
        :mod:`seg.kernels.focused_linear`) on this encoder and each of its attention layers that has one."""
        self.attn_backend = backend
        set_backend(self, backend)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def run_blocks(self, blocks: nn.ModuleList, x: Tensor, *args: Any) -> Tensor:
        """Apply ``blocks`` in order; with gradient checkpointing, each block's activations are recomputed."""
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, *args, use_reentrant=False)
            else:
                x = block(x, *args)
        return x

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Per-stage feature maps (timm's feature-extraction API).

        Args:
            x: images (B, C_in, H, W).
            indices: the stages to return (a list; or an int n: the last n stages; None: all).
            norm: also pass the last stage's map through the model's final ``norm`` (where the family has one).
            stop_early: stop the trunk after the last requested stage (implied by ``intermediates_only``).
            output_fmt: ``NCHW`` or ``NHWC`` maps.
            intermediates_only: return the maps only, not :meth:`forward_features`' output.

        Every map passes through its stage's output norm when the model has them (``feature_norms``).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be NCHW or NHWC, got {output_fmt}")
        take_indices, max_index = feature_take_indices(self._num_stages, indices)
        last = max_index if stop_early or intermediates_only else self._num_stages - 1
        state = self._begin(x)
        intermediates = []
        for i in range(last + 1):
            state, feature = self._stage(i, state, feature=i in take_indices)
            if feature is not None:
                feature = self._feature(i, feature, final_norm=norm and i == self._num_stages - 1)
                intermediates.append(feature if output_fmt == "NCHW" else feature.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        return self._end(state, complete=last == self._num_stages - 1), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last requested feature, unused output norms, optionally the classifier."""
        take_indices, max_index = feature_take_indices(self._num_stages, indices)
        for i, name in list(self._output_norms.items()):
            if i not in take_indices:
                parent, _, leaf = name.rpartition(".")
                delattr(self.get_submodule(parent) if parent else self, leaf)
                del self._output_norms[i]
        self._prune(max_index, list(take_indices), prune_norm)
        self._num_stages = max_index + 1
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        state = self._begin(x)
        for i in range(self._num_stages):
            state, _ = self._stage(i, state, feature=False)
        return self._end(state, complete=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
