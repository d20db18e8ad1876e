"""Saved segmentors: where their files come from (a folder or a Hugging Face Hub repository), what ``config.json``
holds, strict weight loading that lists what does not match, and the model card.

A saved segmentor is a folder (or Hub repository) of three files, the ``PyTorchModelHubMixin`` layout::

    config.json         {"format": "flatten-seg", "version": 3,
                         the Segmentor arguments at the top level (encoder, encoder_kwargs, decoder,
                         decoder_channels, aux_head, num_classes, pad_multiple, channels_last),
                         "dataset": {"name", "class_names", "palette", "mean", "std", "test_scale"},  (optional)
                         "inference": the InferenceConfig fields,                                      (optional)
                         "metrics": {"val/mIoU": ...},                                                 (optional)
                         "source": {"file", "sha256", "kind", "recipe", "published"}}  (optional: converted)
    model.safetensors   the state dict (tensors only: loading runs no pickled code)
    README.md           the model card: encoder, decoder, classes, data set and metrics when known

Version 1 folders (written by ``seg.train.pretrained`` before this layout: the arguments under ``"model"``, the class
names, palette and ``"preprocessing"`` at the top level, no model card) still load. Versions 1 and 2 predate the
mmseg heads: :mod:`seg.model.legacy` says which of their heads load and which are refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from seg.model.config_checks import (
    check_dataset_section,
    check_inference_section,
    check_model_arguments,
    load_bounded_json,
)

__all__ = [
    "CARD_FILE",
    "CARD_TAGS",
    "CONFIG_FILE",
    "FORMAT",
    "VERSION",
    "WEIGHTS_FILE",
    "load_weights",
    "model_card",
    "read_config",
    "read_weights",
    "resolve_file",
    "write_weights",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
FORMAT, VERSION = "flatten-seg", 3  # 3: the mmseg heads (seg.model.legacy says what loads from 1 and 2)
_LEGACY_VERSION = 1
CARD_TAGS = ("image-segmentation", "semantic-segmentation")
_SECTIONS = ("dataset", "inference", "metrics", "source")  # config.json entries beside the Segmentor arguments
# a Hub repository id: "name" or "namespace/name" (letters, digits, - _ .); anything else can only be a path
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def resolve_file(source: str | os.PathLike[str], filename: str, **hub_kwargs: Any) -> Path:
    """The local path of ``filename`` in ``source``: a folder, or a Hub repository id (downloaded into the
    Hugging Face cache; ``hub_kwargs`` go to ``hf_hub_download``: revision, cache_dir, token, local_files_only,
    force_download).

    Raises:
        FileNotFoundError: a missing folder or file, named; a source that is neither a folder nor a Hub model.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        file = path / filename
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: a saved segmentor holds {CONFIG_FILE} and {WEIGHTS_FILE}")
        return file
    name = os.fspath(source)
    if path.exists() or not _REPO_ID.match(name) or ".." in name:
        raise FileNotFoundError(f"pretrained folder {path} does not exist (write one with save_pretrained or "
                                "`python -m seg.train.pretrained`)")
    try:
        return Path(hf_hub_download(repo_id=name, filename=filename, **hub_kwargs))
    except LocalEntryNotFoundError as err:  # offline or local_files_only, and not in the cache
        raise FileNotFoundError(f"{filename} of the Hub model {name} is not in the local cache, and the Hub was "
                                f"not asked (offline or local_files_only): {err}") from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(f"the Hub repository {name} has no {filename}") from err
    except (OSError, ValueError, RuntimeError) as err:  # not found, offline, bad revision: HF errors derive from these
        raise FileNotFoundError(f"{name} is neither a local folder nor a model on the Hugging Face Hub "
                                f"({type(err).__name__}: {err})") from err


def read_config(path: Path, decoders: Collection[str] = ()) -> dict[str, Any]:
    """Parse ``config.json`` (versions 1 to 3) into ``{"model": Segmentor arguments, "version": the file's version,
    "dataset": ..., "inference": ..., "metrics": ...}`` (sections absent from the file are None).

    Raises:
        ValueError: not JSON, not this format or version, or no Segmentor arguments (the file named).
    """
    config = load_bounded_json(path)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} config (its 'format' entry is not {FORMAT!r})")
    version = config.get("version")
    if version == _LEGACY_VERSION:
        config = _from_version_1(path, config)
    elif not isinstance(version, int) or not _LEGACY_VERSION < version <= VERSION:
        raise ValueError(f"{path} has version {version!r}; this code reads versions {_LEGACY_VERSION} to {VERSION}")
    model = {k: v for k, v in config.items() if k not in (*_SECTIONS, "format", "version")}
    if not isinstance(model.get("encoder"), str) or not isinstance(model.get("num_classes"), int):
        raise ValueError(f"{path}: the Segmentor arguments need a string 'encoder' and an integer 'num_classes'")
    check_model_arguments(Path(path), model, decoders)
    check_dataset_section(Path(path), config.get("dataset"), model["num_classes"])
    check_inference_section(Path(path), config.get("inference"))
    if config.get("source") is not None and not isinstance(config["source"], dict):
        raise ValueError(f"{path}: 'source' must be a mapping (file, sha256, kind, recipe, published)")
    return {"model": model, "version": version, **{key: config.get(key) for key in _SECTIONS}}


def _from_version_1(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """A version 1 config (arguments under "model", data-set facts at the top level) in the version 2 layout."""
    for key in ("model", "class_names", "palette", "preprocessing", "inference"):
        if key not in config:
            raise ValueError(f"{path} has no {key!r} entry")
    pre = config["preprocessing"]
    if not isinstance(config["model"], dict) or not isinstance(pre, dict) or {"mean", "std", "test_scale"} - set(pre):
        raise ValueError(f"{path}: 'model' must hold the Segmentor arguments and 'preprocessing' hold 'mean', 'std' "
                         "and 'test_scale' [long, short]")
    dataset = {"name": None, "class_names": config["class_names"], "palette": config["palette"],
               "mean": pre["mean"], "std": pre["std"], "test_scale": pre["test_scale"]}
    return {**config["model"], "dataset": dataset, "inference": config["inference"], "metrics": None}


def read_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file, on the CPU; ValueError naming the file if it cannot be read."""
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err


def write_weights(model: torch.nn.Module, path: Path) -> None:
    """Write the state dict of ``model`` as safetensors, through a temporary file renamed over ``path``."""
    # safetensors stores dense row-major tensors: the heads' channels-last weights are made contiguous
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(state, str(tmp), metadata={"format": "pt"})  # tensor by tensor, no whole-file buffer
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_weights(model: torch.nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """Load ``state`` into ``model`` strictly; on a mismatch raise ValueError starting with ``what`` and listing
    the missing, unexpected and mis-shaped names."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{name} (file {tuple(state[name].shape)}, model {tuple(own[name].shape)})"
                    for name in set(own) & set(state) if state[name].shape != own[name].shape)
    if missing or unexpected or shapes:
        parts = [f"{label} {len(names)}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes))
                 if names]
        raise ValueError(f"{what}; " + "; ".join(parts))
    model.load_state_dict(state)


def model_card(
    config: Mapping[str, Any],
    dataset: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    source: Mapping[str, Any] | None = None,
) -> ModelCard:
    """The model card of a segmentor: ``config`` its arguments, ``dataset`` the data-set section of config.json
    (name, class names), ``metrics`` the validation scores, ``source`` the checkpoint it was converted from (file,
    sha256, recipe, published scores); parts that are not known are left out."""
    data = ModelCardData(library_name=FORMAT, tags=[*CARD_TAGS, "pytorch_model_hub_mixin", "model_hub_mixin"],
                         pipeline_tag="image-segmentation")
    encoder, decoder, k = config["encoder"], config["decoder"], config["num_classes"]
    name = (dataset or {}).get("name")
    if name:
        data.datasets = [str(name)]
    rows = [("encoder", f"`{encoder}`" + _kwargs_text(config.get("encoder_kwargs") or {})),
            ("decoder", f"`{decoder}`" + (f", {config['decoder_channels']} channels"
                                          if config.get("decoder_channels") else "")),
            ("classes", _classes_text(k, (dataset or {}).get("class_names")))]
    if name:
        rows.append(("data set", str(name)))
    if dataset and dataset.get("test_scale"):
        rows.append(("evaluation rescale", "fit into {} x {} (long x short side)".format(*dataset["test_scale"])))
    if metrics:
        rows.append(("metrics", ", ".join(f"{key} {float(value):.4f}" for key, value in metrics.items())))
    if source:
        rows.append(("converted from", f"`{source.get('file')}` ({source.get('kind')} checkpoint), sha256 "
                                       f"`{source.get('sha256')}`"))
        if source.get("recipe"):
            rows.append(("recipe", f"`{source['recipe']}`"))
        published = source.get("published")
        if published:
            macc = f", mAcc {published['mAcc']}" if published.get("mAcc") is not None else ""
            rows.append(("published (not measured here)",
                         f"ADE20K val mIoU {published['mIoU']}{macc}, single scale ({published.get('source')})"))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    trained = f", trained on {name}" if name else ""
    body = f"""
# {encoder} + {decoder}

Semantic segmentation with a `{encoder}` encoder and a `{decoder}` decoder, {k} classes{trained}.

| | |
|---|---|
{table}

## Use

```python
from seg.serve.predictor import Predictor

predictor = Predictor.from_pretrained("<this folder or Hub id>")  # the network, classes and preprocessing
labels = predictor.predict(rgb)  # uint8 (H, W, 3) photo -> (H, W) class indices

from seg.model.segmentor import Segmentor

model = Segmentor.from_pretrained("<this folder or Hub id>")  # the network alone, in eval mode
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return f" ({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})" if kwargs else ""


def _classes_text(num_classes: int, names: Sequence[str] | None, shown: int = 20) -> str:
    if not names:
        return str(num_classes)
    listed = ", ".join(str(n) for n in names[:shown])
    return f"{num_classes}: {listed}{', ...' if len(names) > shown else ''}"
