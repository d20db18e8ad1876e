"""Adapting published ImageNet checkpoints to this project's encoders.

timm calls a model's ``pretrained_filter_fn(state_dict, model)`` after reading the file (with
``weights_only=True``). :func:`adapt_state_dict` is the shared part of those filters: it resizes
position tables to the model's grid, drops the classifier when it does not fit, fills parameters the
published models do not have (per-stage output norms), and refuses anything else that does not match,
listing the missing, unexpected and mis-shaped names. timm loads non-strictly whenever it drops the
classifier itself, so this check is what keeps a wrong file from loading half-way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor, nn

from seg.model.layers import resize_token_grid

__all__ = ["CheckpointMismatchError", "adapt_state_dict", "unwrap_checkpoint"]


class CheckpointMismatchError(ValueError):
    """A checkpoint whose parameter names or shapes do not fit the model."""


def unwrap_checkpoint(checkpoint: dict) -> dict[str, Tensor]:
    """The state dict inside a checkpoint dict (``'model'`` / ``'state_dict'``), without ``module.``."""
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _resize_table(value: Tensor, target: Tensor) -> Tensor:
    """Resize a (1, n, C) position table stored on a square grid to the target's square grid."""
    side = round(target.shape[1] ** 0.5)
    return resize_token_grid(value, (side, side))


def adapt_state_dict(
    state_dict: dict[str, Tensor],
    model: nn.Module,
    *,
    position_tables: Callable[[str], bool],
    dropped: Iterable[str] = (),
    fresh: Callable[[str], bool] = lambda name: False,
    converters: Iterable[Callable[[str, Tensor, Tensor], Tensor | None]] = (),
    classifier: str = "head",
) -> dict[str, Tensor]:
    """Map a published state dict onto ``model`` or raise :class:`CheckpointMismatchError`.

    Args:
        state_dict: the checkpoint's tensors (already unwrapped from ``'model'``).
        model: the freshly built model to load into.
        position_tables: names of (1, n, C) tables to resize bilinearly to the model's grid.
        dropped: checkpoint names the model deliberately does not have (ignored).
        fresh: model names the checkpoint is not expected to have (kept at their initial values).
        converters: ``fn(name, value, target) -> tensor or None`` applied first (renames of layout, e.g.
            dropping a class-token entry, or resizing other tables).
        classifier: prefix of the classifier, dropped when the model's differs (other class count).
    """
    state_dict = unwrap_checkpoint(state_dict)
    target = model.state_dict()
    dropped = set(dropped)
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for name, value in state_dict.items():
        if name in dropped:
            continue
        is_head = name.startswith(classifier + ".")
        if name not in target:
            if not is_head:
                unexpected.append(name)
            continue
        ref = target[name]
        for convert in converters:
            converted = convert(name, value, ref)
            if converted is not None:
                value = converted
        if position_tables(name) and value.shape != ref.shape and value.shape[-1] == ref.shape[-1]:
            value = _resize_table(value, ref)
        if value.shape != ref.shape:
            if is_head:
                continue  # another class count: keep the model's own initial head
            mismatched.append(f"{name}: file {tuple(value.shape)} vs model {tuple(ref.shape)}")
            continue
        out[name] = value.to(ref.dtype)
    missing = []
    for name, ref in target.items():
        if name in out or any(m.startswith(name + ":") for m in mismatched):
            continue
        if fresh(name) or name.startswith(classifier + "."):
            out[name] = ref.clone()
        else:
            missing.append(name)
    if missing or unexpected or mismatched:
        source = (getattr(model, "pretrained_cfg", None) or {}).get("file") or "the checkpoint"
        lines = [f"{source} does not match {type(model).__name__}"]
        for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if names:
                more = " ..." if len(names) > 20 else ""
                lines.append(f"  {title} ({len(names)}): " + ", ".join(names[:20]) + more)
        raise CheckpointMismatchError("\n".join(lines))
    return out

