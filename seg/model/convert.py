"""``python -m seg.model.convert``: the one converter from a checkpoint to a saved model folder.

    python -m seg.model.convert CHECKPOINT --config configs/<recipe>.yaml --out DIR

builds the model the recipe describes and writes ``config.json``, ``model.safetensors`` and a model card into
``DIR`` (load it with ``Segmentor.from_pretrained(DIR)``, ``Predictor.from_pretrained(DIR)`` or train and evaluate
from it with ``cli.py ... --model.weights DIR``). ``CHECKPOINT`` is one of:

- a published mmsegmentation 0.x segmenter (``meta`` / ``state_dict`` / ``optimizer``): ``backbone.``, ``neck.``,
  ``decode_head.`` and ``auxiliary_head.`` map one to one onto the encoder and the heads (:mod:`seg.model.heads`); every
  tensor is checked, and missing, unexpected and mis-shaped names are printed one per line (exit 1 when a
  tensor of the model is missing or mis-shaped). ``CLASSES`` / ``PALETTE`` of ``meta`` become the saved data-set
  facts;
- a Lightning checkpoint of this project (as ``python -m seg.train.pretrained``);
- a published ImageNet checkpoint: the encoder initialised from it (the model's checkpoint filter), the heads as
  built.

Files are read with ``weights_only=True``: tensors and plain data, plus the numpy scalars mmseg writes into
``meta`` (and nothing else; a file holding any other object is refused without running it), memory-mapped where
the file allows, so the optimizer state is never read into memory.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import hashlib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from seg.model import hub
from seg.model.published import published_for

__all__ = ["ConversionError", "Report", "main", "map_mmseg_state", "read_published"]

ENCODER_PREFIX = "encoder.model.model."  # smp's timm encoder -> timm's feature wrapper -> the encoder itself
MMSEG_PREFIXES = {"backbone.": ENCODER_PREFIX, "neck.": "decode_head.neck.", "decode_head.": "decode_head.",
                  "auxiliary_head.": "aux_head."}
# buffers the published backbones store and this project rebuilds from the live size (never loaded)
REBUILT = ("relative_position_index", "attn_mask", "rope.rotations")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says why, naming the file."""


def _numpy_allowlist() -> list[Any]:
    """The globals a numpy scalar pickles to (numpy 1.x and 2.x module names), and nothing else."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtypes = [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    names = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):  # torch 2.4: objects only, and the
        names = [scalar, codecs.encode]  # scalar's bytes (``_codecs.encode``), allowed by default from torch 2.5
    return [*names, np.dtype, *dtypes]


def _allowing(allowed: list[Any]) -> contextlib.AbstractContextManager:
    """``torch.serialization.safe_globals`` (torch >= 2.5); torch 2.4 only has the process-wide allowlist."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(allowed)
    torch.serialization.add_safe_globals(allowed)
    return contextlib.nullcontext()


def read_published(path: str | Path) -> dict[str, Any]:
    """A checkpoint dict, read with ``weights_only=True`` and the numpy-scalar allowlist, memory-mapped.

    Raises:
        FileNotFoundError: no such file.
        ConversionError: not a checkpoint, or one holding other Python objects (not loaded, nothing run).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with _allowing(_numpy_allowlist()):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # not the zip format (legacy files): read without mapping
                raise ConversionError(f"cannot read {path}: {type(err).__name__}: {err}") from err
            checkpoint = _load_unmapped(path)
        except Exception as err:
            raise ConversionError(
                f"refused {path}: it holds Python objects beyond tensors, plain data and numpy scalars, and was not "
                f"loaded (weights_only=True): {_first_line(err)}") from err
    if not isinstance(checkpoint, dict):
        raise ConversionError(f"{path} is not a checkpoint (a dict with 'state_dict' or 'model')")
    return checkpoint


def _load_unmapped(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConversionError(f"refused {path}: not loadable with weights_only=True: {_first_line(err)}") from err


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    unsafe = [line for line in lines if "Unsupported global" in line or "GLOBAL" in line]
    return (unsafe or lines or [type(err).__name__])[0]


def kind_of(checkpoint: Mapping[str, Any]) -> str:
    """``mmseg``, ``lightning`` or ``imagenet`` (a classifier's or encoder's weights)."""
    state = checkpoint.get("state_dict")
    if isinstance(state, Mapping):
        if any(str(k).startswith(tuple(MMSEG_PREFIXES)) for k in state):
            return "mmseg"
        if any(str(k).startswith("model.") for k in state):
            return "lightning"
    return "imagenet"


@dataclass
class Report:
    """What mapping a published state dict onto the model found."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mis_shaped: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mis_shaped

    def lines(self) -> list[str]:
        out = [f"missing: {n}" for n in self.missing] + [f"mis-shaped: {n}" for n in self.mis_shaped]
        out += [f"unexpected (not loaded): {n}" for n in self.unexpected]
        if self.rebuilt:
            out.append(f"rebuilt from the input size, not loaded: {len(self.rebuilt)} buffers ({', '.join(REBUILT)})")
        return out


def map_mmseg_state(state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Report]:
    """An mmseg 0.x ``state_dict`` under this project's names, and what did not fit ``own`` (the model's)."""
    out: dict[str, Tensor] = {}
    report = Report()
    shaped: set[str] = set()  # model names present in the file with another shape
    for key, value in state.items():
        prefix = next((p for p in MMSEG_PREFIXES if key.startswith(p)), None)
        name = MMSEG_PREFIXES[prefix] + key[len(prefix):] if prefix else key
        if name not in own:
            (report.rebuilt if key.endswith(REBUILT) else report.unexpected).append(key)
        elif tuple(value.shape) != tuple(own[name].shape):
            report.mis_shaped.append(f"{key} (file {tuple(value.shape)}, model {name} {tuple(own[name].shape)})")
            shaped.add(name)
        else:
            out[name] = value
    report.missing = [name for name in own if name not in out and name not in shaped]
    return out, report


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dataset_from_meta(meta: Any, num_classes: int) -> tuple[list[str] | None, list[list[int]] | None]:
    """``CLASSES`` and ``PALETTE`` of an mmseg ``meta`` when they fit the model's class count."""
    if not isinstance(meta, Mapping):
        return None, None
    classes, palette = meta.get("CLASSES"), meta.get("PALETTE")
    names = [str(c) for c in classes] if isinstance(classes, list | tuple) and len(classes) == num_classes else None
    colours = None
    if isinstance(palette, list | tuple) and len(palette) == num_classes:
        colours = [[int(v) for v in rgb] for rgb in palette]
    return names, colours


def convert(checkpoint_path: Path, cli_args: Sequence[str], out: Path) -> Path:
    """Convert ``checkpoint_path`` for the model of ``cli_args`` (``--config ...``) into the folder ``out``."""
    from seg.train.pretrained import from_config  # the CLI's model building (imports Lightning)

    checkpoint = read_published(checkpoint_path)
    kind = kind_of(checkpoint)
    args = list(cli_args)
    if kind == "lightning":
        predictor = from_config(args, str(checkpoint_path))
    elif kind == "imagenet":
        predictor = from_config([*args, f"--model.model.init_args.encoder_checkpoint={checkpoint_path}"])
    else:
        predictor = from_config([*args, "--model.model.init_args.encoder_checkpoint=null"])
        model = predictor.model
        state, report = map_mmseg_state(checkpoint["state_dict"], model.state_dict())
        for line in report.lines():
            print(line)
        if not report.ok:
            raise ConversionError(f"{checkpoint_path} does not fit the model of {_configs(args)}: "
                                  f"{len(report.missing)} missing, {len(report.mis_shaped)} mis-shaped tensors "
                                  "(listed above)")
        model.load_state_dict(state, strict=False)
        names, palette = _dataset_from_meta(checkpoint.get("meta"), model.num_classes)
        facts = {"class_names": tuple(names or ()), "palette": tuple(map(tuple, palette or ()))}
        predictor.spec = dataclasses.replace(predictor.spec, **{k: v for k, v in facts.items() if v})
    config = next((a for a in args if a.endswith((".yaml", ".yml"))), None)
    published = published_for(config) if config else None
    predictor.source = {
        "file": checkpoint_path.name, "sha256": _sha256(checkpoint_path), "kind": kind,
        "recipe": config, "published": None if published is None else
        {"mIoU": published.miou, "mAcc": published.macc, "source": published.source},
    }
    folder = predictor.save_pretrained(out)
    print(f"wrote {folder / hub.CONFIG_FILE}, {folder / hub.WEIGHTS_FILE} and {folder / hub.CARD_FILE} "
          f"({kind} checkpoint {checkpoint_path.name})")
    return folder


def _configs(args: Sequence[str]) -> str:
    return " ".join(a for a in args if a.endswith((".yaml", ".yml"))) or "the command line"


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m seg.model.convert CHECKPOINT --config configs/<recipe>.yaml --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m seg.model.convert",
        description="Write a saved model folder (config.json + model.safetensors + README.md) from a published "
        "mmsegmentation 0.x segmenter, a Lightning checkpoint of this project or a published ImageNet checkpoint. "
        "Every other argument (--config, --model..., --data...) is read as by `python cli.py`.",
    )
    parser.add_argument("checkpoint", type=Path, help="the checkpoint file (.pth / .ckpt)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    args, cli_args = parser.parse_known_args(argv)
    if not any(a == "--config" or a.startswith("--config=") for a in cli_args):
        parser.error("give the recipe: --config configs/<recipe>.yaml")
    return convert(args.checkpoint, cli_args, args.out)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
