"""The staged-encoder base of every encoder family: timm's feature API over four stages, the classifier,
gradient checkpointing, the attention backend switch and the one check of ``attn_type``, written once.
FLatten-PVT / PVTv2, FLatten-Swin, SOFT, MLLA and RAVLT subclass it directly; Agent-PVT, Agent-Swin, MALA and
the PolaFormers through those classes.

The trunk runs through four methods: :meth:`~StagedEncoder._begin` (before stage 0),
:meth:`~StagedEncoder._stage` (one stage: the state for the next stage and, when asked, the stage's NCHW
feature map), :meth:`~StagedEncoder._end` (the output of a complete or early-stopped trunk) and
:meth:`~StagedEncoder._prune` (drop the modules of stages and norms that are no longer used). Their defaults
are the token pyramid of Swin and MLLA (a ``layers`` list of stages with ``blocks`` and ``downsample``, then the
final ``norm``); PVT and SOFT run their published numbered stage attributes, RAVLT its maps. A family registers
each stage with :meth:`~StagedEncoder._add_stage` (its ``feature_info`` entry and output norm) and ends its
constructor with :meth:`~StagedEncoder._finish`. Pooling and the classifier are
:class:`~seg.model.backbones._registry.ClassifierBackbone`'s.

Per-stage output norms (LayerNorms on the feature maps, the segmentation backbones' ``norm0..3``) exist only
in models built for features (``feature_norms=True``, which ``features_only=True`` sets): a classifier never
uses them, and a parameter without a gradient breaks the classifier's training (timm's contract: every
parameter gets a gradient) and DDP. The base applies them to the returned feature maps and prunes them with
the stages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from seg.kernels import set_backend
from seg.model.backbones._registry import ClassifierBackbone, init_transformer_weights

__all__ = ["AttentionFactory", "StagedEncoder", "stage_factories"]

Size = tuple[int, int]
# (dim, num_heads, grid_size, sr_ratio, shift) -> the attention of one block: grid_size is the stage's token grid
# at the training resolution (the grid position tables are stored at), sr_ratio the stage's spatial reduction
# (1 where the skeleton has none) and shift whether the block shifts its windows (Swin's odd blocks; False
# elsewhere). The module takes what the skeleton's blocks give it: (tokens (B, N, C), (H, W)), or on RAVLT's
# maps ((B, C, H, W), RoPE tables).
AttentionFactory = Callable[[int, int, Size, int, bool], nn.Module]
Letters = Mapping[str, AttentionFactory]


def stage_factories(
    attn_type: str,
    letters: Letters | Sequence[Letters],
    attn_layers: Sequence[AttentionFactory] | None = None,
    *,
    num_stages: int = 4,
    aliases: Mapping[str, str] | None = None,
) -> list[AttentionFactory]:
    """One attention factory per stage: ``attn_layers`` when given, else the letters of ``attn_type``.

    The one check of ``attn_type`` of every family: ``num_stages`` letters, each a key of ``letters`` (one dict
    for all stages, or one per stage when the factories depend on the stage) or of ``aliases`` (the published
    spellings: ``{'B': 'S'}`` for the Agent families, ``{'l': 'L', 'v': 'S'}`` for RAVLT / MALA). ``S`` is the
    skeleton's own softmax attention in every family that has a softmax option.
    """
    if attn_layers is not None:
        if len(attn_layers) != num_stages:
            raise ValueError(f"attn_layers needs one factory per stage ({num_stages}), got {len(attn_layers)}")
        return list(attn_layers)
    per_stage = [letters] * num_stages if isinstance(letters, Mapping) else list(letters)
    aliases = aliases or {}
    valid = ", ".join([*per_stage[0], *(f"{a} (= {b})" for a, b in aliases.items())])
    if len(attn_type) != num_stages:
        raise ValueError(f"attn_type {attn_type!r} must be {num_stages} letters of: {valid}")
    unknown = {letter for letter in attn_type if aliases.get(letter, letter) not in per_stage[0]}
    if unknown:
        raise ValueError(f"attn_type {attn_type!r}: unknown letter(s) {', '.join(sorted(unknown))}; valid: {valid}")
    return [per_stage[i][aliases.get(letter, letter)] for i, letter in enumerate(attn_type)]


class StagedEncoder(ClassifierBackbone):
    """Base of the staged encoders; subclasses set ``_num_stages``, build their stages and register each with
    :meth:`_add_stage`.

    The default trunk is the token pyramid of Swin and MLLA: ``layers``, a list of stages, each with
    ``blocks`` (run on (B, N, C) tokens and their (H, W) grid) and ``downsample`` (the merge to the next stage,
    None after the last), then the final ``norm``. Families with another trunk override :meth:`_stage` and
    :meth:`_end`; those whose stages are numbered attributes (PVT's and SOFT's published ``patch_embed1``,
    ``block1``, ... kept as the checkpoints name them) list the attribute stems in ``_stage_parts``.
    """

    _num_stages: int
    grad_checkpointing: bool = False
    _stage_parts: tuple[str, ...] = ()  # numbered stage attributes (``block`` -> block1..4); () for ``layers``
    _final_modules: tuple[str, ...] = ("norm",)  # after the last stage; replaced by identities when pruned

    def __init__(self, feature_norms: bool = False) -> None:
        super().__init__()
        self.feature_norms = feature_norms
        self.feature_info: list[dict[str, Any]] = []
        self._output_norms: dict[int, str] = {}  # stage index -> name of its output norm

    def _add_output_norm(self, i: int, name: str, norm: nn.Module) -> str | None:
        """Register ``norm`` as stage i's output norm ``name`` when ``feature_norms``; returns the name or None."""
        if not self.feature_norms:
            return None
        parent, _, leaf = name.rpartition(".")  # a dotted name registers inside an existing container
        (self.get_submodule(parent) if parent else self).add_module(leaf, norm)
        self._output_norms[i] = name
        return name

    def _add_stage(self, i: int, num_chs: int, reduction: int, module: str, norm: tuple[str, nn.Module] | None = None,
                   norm_leaf: str = "") -> None:
        """Stage i's ``feature_info`` entry; with ``norm`` (name, module), its output norm when ``feature_norms``,
        which the entry then names (``norm_leaf``: the LayerNorm inside it) instead of the trunk ``module``."""
        name = self._add_output_norm(i, *norm) if norm is not None else None
        module = f"{name}{norm_leaf}" if name else module
        self.feature_info.append(dict(num_chs=num_chs, reduction=reduction, module=module))

    def _finish(self, num_classes: int, global_pool: str, attn_backend: str,
                init: Callable[[nn.Module], None] = init_transformer_weights) -> None:
        """After the stages: the classifier, every module's ``init`` and the attention backend."""
        self.reset_classifier(num_classes, global_pool)
        self.apply(init)
        self.set_attn_backend(attn_backend)

    def _part(self, i: int, stem: str) -> Any:
        """Stage i's numbered attribute ``stem`` (``_part(0, 'block')`` is ``block1``), None if absent."""
        return getattr(self, f"{stem}{i + 1}", None)

    def _begin(self, x: Tensor) -> Any:
        """The state stage 0 starts from. Default: the tokens (B, N, C) of ``patch_embed`` after ``pos_drop``,
        and their grid."""
        x, size = self.patch_embed(x)  # (B, N, C)
        return self.pos_drop(x), size

    def _stage(self, i: int, state: tuple[Tensor, Size], feature: bool) -> tuple[Any, Tensor | None]:
        """Run stage i: (state for stage i + 1, its feature map (B, C_i, H_i, W_i) when ``feature``).

        Default: the blocks of ``layers[i]`` on (B, N, C) tokens of an (H, W) grid, then its ``downsample``."""
        x, size = state
        stage = self.layers[i]
        out = self.run_blocks(stage.blocks, x, size)
        feat = out.reshape(out.shape[0], *size, -1).permute(0, 3, 1, 2) if feature else None  # (B, C, H, W)
        if stage.downsample is None:
            return (out, size), feat
        return stage.downsample(out, size), feat

    def _end(self, state: tuple[Tensor, Size], complete: bool) -> Tensor:
        """What :meth:`forward_features` returns, or the last computed stage's output when stopped early.

        Default: the last stage's tokens through the final ``norm`` as (B, C, H, W); when stopped early, the
        merged tokens."""
        x, size = state
        if complete:
            x = self.norm(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, *size)  # (B, N, C) -> (B, C, H, W)

    def _prune(self, max_index: int, take_indices: list[int], prune_norm: bool) -> None:
        """Remove the modules of stages after ``max_index`` (the output norms of stages not in ``take_indices``
        are already gone) and, when ``prune_norm`` or a stage is cut, the final modules (they fit the last stage)."""
        if self._stage_parts:
            for i in range(max_index + 1, self._num_stages):
                for stem in self._stage_parts:
                    if self._part(i, stem) is not None:
                        delattr(self, f"{stem}{i + 1}")
        else:
            self.layers = self.layers[: max_index + 1]
            self.layers[-1].downsample = None  # its output would feed no stage
        if prune_norm or max_index < self._num_stages - 1:
            for name in self._final_modules:
                setattr(self, name, nn.Identity())

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
