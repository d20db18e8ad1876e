"""Lightning checkpoints: the one reader of a training checkpoint's segmentor weights, for every command that
loads a run (``seg.train.pretrained``, ``seg.serve.export``, ``seg.serve.app``) and for predictions from a
checkpoint."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from seg.model.hub import load_weights
from seg.model.inference import InferenceConfig, SettingError
from seg.model.legacy import upgrade_state

__all__ = ["best_score", "check_settings", "load_checkpoint", "read_checkpoint", "segmentor_state"]

PREFIX = "model."  # SegmentationTask holds the segmentor as `model`


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint file read as tensors and plain data only (``weights_only=True``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read that way, holds no state dict, or holds hyper-parameters that fail
            the checks of their construction (the file and the field named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path}: not a PyTorch checkpoint, or one holding more than tensors "
                         f"and plain data (read with weights_only=True): {type(err).__name__}: {err}") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not a checkpoint (a dict with a 'state_dict', or a state dict)")
    check_settings(checkpoint.get("hyper_parameters", {}), path)
    return checkpoint


def check_settings(hparams: Any, source: str | os.PathLike[str], where: str = "hyper_parameters") -> None:
    """Run the construction checks on every :class:`~seg.model.inference.InferenceConfig` in loaded hyper-parameters
    (unpickling skips ``__post_init__``, so a forged file could carry a stride of 0 or a negative crop).

    Raises:
        SettingError: "<source>: <where>.<key>: <field> must be ..." for the first setting out of range.
    """
    if isinstance(hparams, InferenceConfig):
        try:
            hparams.validate()
        except SettingError as err:
            raise SettingError(f"{source}: {where}: {err}") from err
    elif isinstance(hparams, Mapping):
        for key, value in hparams.items():
            check_settings(value, source, f"{where}.{key}")
    elif isinstance(hparams, list | tuple):
        for i, value in enumerate(hparams):
            check_settings(value, source, f"{where}[{i}]")


def segmentor_state(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The segmentor's tensors of a Lightning checkpoint of SegmentationTask (``state_dict`` entries under
    ``model.``), or of a plain state dict of the segmentor."""
    state = checkpoint.get("state_dict", checkpoint)
    if any(key.startswith(PREFIX) for key in state):
        return {key[len(PREFIX):]: value for key, value in state.items() if key.startswith(PREFIX)}
    return dict(state)


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], built_from: str = "the config") -> dict[str, Any]:
    """Load the segmentor weights of a checkpoint into ``model``, strictly; returns the checkpoint.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unreadable file, weights of an earlier head (:mod:`seg.model.legacy`), or weights that do not
            match ``model`` (the missing, unexpected and mis-shaped names listed, after "<path> does not match the
            model built from <built_from>").
    """
    checkpoint = read_checkpoint(path)
    state = upgrade_state(segmentor_state(checkpoint), getattr(model, "decoder_name", ""), str(path))
    load_weights(model, state, f"{path} does not match the model built from {built_from}")
    return checkpoint


def best_score(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> dict[str, float] | None:
    """``{monitor: score}`` when ``path`` is the best checkpoint its ModelCheckpoint kept (e.g. ``best.ckpt`` with
    ``val/mIoU``), else None: the score of the weights in that file, for the model card."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if not str(key).startswith("ModelCheckpoint") or not isinstance(state, dict):
            continue
        best, score, monitor = state.get("best_model_path"), state.get("best_model_score"), state.get("monitor")
        if best and monitor and score is not None and Path(best).name == Path(path).name:
            return {str(monitor): float(score)}
    return None
