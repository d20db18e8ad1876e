"""``--model.weights``: a trained segmentor's weights into the model a config builds, for evaluation or
fine-tuning. The source is a saved model folder (``config.json`` + ``model.safetensors``, e.g. a converted
published segmenter), a ``.safetensors`` file or a Lightning checkpoint of this project.

Fine-tuning on another data set: where the model predicts another number of classes than the weights, only the
classifiers (``conv_seg`` of the decode and auxiliary heads; ``classifier`` of smp's heads) keep their fresh
initialisation, and the returned line says so. Everything else must match exactly (missing, unexpected and
mis-shaped names listed).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor, nn

from seg.model import hub
from seg.model.checkpoint import read_checkpoint, segmentor_state
from seg.model.legacy import upgrade_arguments, upgrade_state

__all__ = ["CLASSIFIER_SUFFIXES", "load_segmentor_weights", "read_segmentor_weights"]

CLASSIFIER_SUFFIXES = (".conv_seg.weight", ".conv_seg.bias", ".classifier.weight", ".classifier.bias")
_ARCHITECTURE = ("encoder", "decoder", "decoder_channels")  # what a folder's config must share with the model


def read_segmentor_weights(source: str | os.PathLike[str], model: nn.Module) -> dict[str, Tensor]:
    """The segmentor tensors of ``source`` (a saved folder, a ``.safetensors`` file or a Lightning checkpoint),
    with earlier heads' names upgraded (:mod:`seg.model.legacy`).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: an unreadable file, or a folder saved for another encoder or decoder (both named).
    """
    path = Path(source).expanduser()
    decoder = getattr(model, "decoder_name", "")
    if path.is_dir():
        config_path = hub.resolve_file(path, hub.CONFIG_FILE)
        config = hub.read_config(config_path)
        saved = upgrade_arguments(config["model"], config["version"])
        own = getattr(model, "arguments", {})
        differ = [f"{key} {saved.get(key)!r} (model {own.get(key)!r})" for key in _ARCHITECTURE
                  if key in own and saved.get(key) != own.get(key)]
        if differ:
            raise ValueError(f"{config_path} describes another architecture than the model: {', '.join(differ)}")
        state = hub.read_weights(hub.resolve_file(path, hub.WEIGHTS_FILE))
    elif path.is_file() and path.suffix == ".safetensors":
        state = hub.read_weights(path)
    elif path.is_file():
        state = segmentor_state(read_checkpoint(path))
    else:
        raise FileNotFoundError(f"weights {path} do not exist (a saved model folder, a .safetensors file or a "
                                "Lightning checkpoint; `python -m seg.model.convert` writes a folder from a "
                                "published one)")
    return upgrade_state(state, decoder, str(path))


def load_segmentor_weights(model: nn.Module, source: str | os.PathLike[str]) -> str:
    """Load ``source`` into ``model`` strictly, but for the classifiers of another class count and an auxiliary
    head the model or the weights lack; returns one line saying what was loaded and what was left fresh."""
    state = read_segmentor_weights(source, model)
    own = model.state_dict()
    fresh: dict[str, int] = {}  # classifier weight -> the weights' class count
    for name in [n for n in state if n.endswith(CLASSIFIER_SUFFIXES) and n in own]:
        if state[name].shape != own[name].shape:
            fresh[name] = state[name].shape[0]
            state[name] = own[name]
    notes = []
    if fresh:
        heads = sorted({n.rpartition(".")[0] for n in fresh})
        notes.append(f"re-initialised the classifiers {', '.join(heads)} for {model.num_classes} classes "
                     f"(the weights have {max(fresh.values())})")
    if not any(n.startswith("aux_head.") for n in own):
        dropped = [n for n in state if n.startswith("aux_head.")]
        for n in dropped:
            del state[n]
        if dropped:
            notes.append("left out the weights' auxiliary head (the model has none)")
    elif not any(n.startswith("aux_head.") for n in state):
        state.update({n: v for n, v in own.items() if n.startswith("aux_head.")})
        notes.append("the auxiliary head starts fresh (the weights have none)")
    hub.load_weights(model, state, f"{source} does not match the model")
    return f"loaded weights from {source}" + (f"; {'; '.join(notes)}" if notes else "")
