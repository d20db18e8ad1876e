"""Pretrained folders: a segmentor's weights plus everything needed to use it, without the training config.

A folder written by :func:`save_pretrained` (or ``Segmentor.save_pretrained``) holds::

    model.safetensors   the segmentor's state dict (tensors only: loading runs no pickled code)
    config.json         {"format": "flatten-seg", "version": 1,
                         "model": the Segmentor arguments (encoder, encoder_kwargs, decoder, decoder_channels,
                                  aux_head, num_classes, pad_multiple, channels_last),
                         "class_names": [...], "palette": [[r, g, b], ...],
                         "preprocessing": {"mean": [...], "std": [...], "test_scale": [long, short]},
                         "inference": the InferenceConfig fields (whole / slide / multiscale)}

``mean`` and ``std`` are per RGB channel on the 8-bit pixel scale; ``test_scale`` is the (long, short) box images
are rescaled to fit before the network, as in validation and predict. Write one from a Lightning checkpoint,
the model built from the training config exactly as training built it::

    python -m seg.pretrained --config configs/demo.yaml --ckpt_path logs/demo/checkpoints/best.ckpt \\
        --out pretrained/demo

and load it with ``Segmentor.from_pretrained("pretrained/demo")`` (the network) or
``load_pretrained("pretrained/demo")`` (the network, class names, palette and preprocessing, with
:meth:`Pretrained.predict` for one photo).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from seg.cli import SegmentationArgumentParser, SegmentationCLI
from seg.data import ADE20K, SegmentationDataModule, make_palette
from seg.data.ade20k import image_to_tensor
from seg.data.spec import IMAGENET_MEAN, IMAGENET_STD, UINT8_MAX
from seg.data.transforms import eval_transform
from seg.inference import InferenceConfig
from seg.models import Segmentor
from seg.task import SegmentationTask

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "Pretrained",
    "from_checkpoint",
    "load_pretrained",
    "main",
    "save_pretrained",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT, VERSION = "flatten-seg", 1
DEFAULT_TEST_SCALE: tuple[int, int] = ADE20K.test_scale


@dataclass
class Pretrained:
    """A segmentor with what it takes to use it: class names, colours and the evaluation preprocessing.

    Args:
        model: the network.
        class_names: one name per class.
        palette: uint8 (K, 3) RGB colour per class.
        mean: per-channel RGB mean on the 8-bit pixel scale, subtracted before the network.
        std: per-channel RGB standard deviation on the 8-bit pixel scale.
        test_scale: (long, short) box images are rescaled to fit (keeping their aspect ratio).
        inference: whole-image, sliding-window or multi-scale inference.
    """

    model: Segmentor
    class_names: list[str]
    palette: np.ndarray
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    test_scale: tuple[int, int] = DEFAULT_TEST_SCALE
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def __post_init__(self) -> None:
        self.class_names = [str(name) for name in self.class_names]
        self.palette = np.asarray(self.palette)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.test_scale = (int(self.test_scale[0]), int(self.test_scale[1]))
        self._task: SegmentationTask | None = None
        problem = _check_metadata(self.model.num_classes, self.class_names, self.palette, self.mean, self.std)
        if problem:
            raise ValueError(problem)

    def to_config(self) -> dict[str, Any]:
        """The content of ``config.json``."""
        arch = getattr(self.model, "config", None)
        if not isinstance(arch, dict):
            raise TypeError(f"{type(self.model).__name__} has no `config` dict of its constructor arguments")
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": {**arch, "encoder_kwargs": _json_kwargs(arch.get("encoder_kwargs") or {})},
            "class_names": list(self.class_names),
            "palette": self.palette.astype(int).tolist(),
            "preprocessing": {"mean": list(self.mean), "std": list(self.std), "test_scale": list(self.test_scale)},
            "inference": dataclasses.asdict(self.inference),
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created if missing; the two files
        are replaced if present). Returns the folder."""
        folder = Path(directory)
        config = self.to_config()
        folder.mkdir(parents=True, exist_ok=True)
        # safetensors stores dense row-major tensors: the heads' channels-last weights are made contiguous
        state = {name: t.detach().cpu().contiguous() for name, t in self.model.state_dict().items()}
        _replace(folder / WEIGHTS_FILE, save(state, metadata={"format": "pt"}))
        _replace(folder / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode("utf-8"))
        return folder

    def transform(self) -> Any:
        """The evaluation pipeline of this model: keep-ratio rescale into ``test_scale``, normalise."""
        return eval_transform(self.test_scale, self.mean, self.std)

    @torch.inference_mode()
    def predict(self, image: np.ndarray) -> np.ndarray:
        """Class indices (H, W) of one uint8 (H, W, 3) RGB image, at its size, as ``cli.py predict`` computes
        them (same rescale, normalisation and inference mode)."""
        if self._task is None:
            self._task = SegmentationTask(self.model, inference=self.inference)
        task = self._task.eval()
        device = next(self.model.parameters()).device
        x = image_to_tensor(self.transform()(image=image)["image"])[None].to(device)  # (1, 3, h, w)
        return task(x, out_size=tuple(image.shape[:2])).argmax(dim=1)[0].cpu().numpy()


def save_pretrained(
    model: Segmentor,
    directory: str | os.PathLike[str],
    class_names: Sequence[str] | None = None,
    palette: np.ndarray | Sequence[Sequence[int]] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    test_scale: Sequence[int] = DEFAULT_TEST_SCALE,
    inference: InferenceConfig | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` of ``model`` into ``directory``.

    Args:
        model: the segmentor.
        directory: output folder (created if missing).
        class_names: one name per class; default the ADE20K names for a model of ADE20K's class count, else
            ``class_0``, ...
        palette: (K, 3) RGB colours; default ``make_palette(K)``, the colours the prediction writer uses.
        mean: per-channel RGB mean (8-bit pixel scale) of the training normalisation.
        std: per-channel RGB standard deviation (8-bit pixel scale).
        test_scale: (long, short) evaluation rescale box.
        inference: inference mode; default whole-image.

    Returns:
        The folder.
    """
    k = model.num_classes
    if class_names is None:
        class_names = list(ADE20K.class_names) if k == ADE20K.num_classes else [f"class_{i}" for i in range(k)]
    palette = make_palette(len(class_names)) if palette is None else np.asarray(palette)
    bundle = Pretrained(model, list(class_names), palette, tuple(mean), tuple(std), tuple(test_scale),
                        inference or InferenceConfig())
    return bundle.save(directory)


def load_pretrained(directory: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Pretrained:
    """Read a folder written by :func:`save_pretrained`; the model is in eval mode on ``map_location``.

    Raises:
        FileNotFoundError: the folder, ``config.json`` or ``model.safetensors`` is missing (named).
        ValueError: a file cannot be read, or the config and the weights do not match (both named).
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"pretrained folder {folder} does not exist (write one with save_pretrained or "
                                "`python -m seg.pretrained`)")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: a pretrained folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = _read_config(config_path)
    try:
        model = Segmentor(**config["model"])
    except Exception as err:
        raise ValueError(f"{config_path}: cannot build the segmentor from its 'model' entry: "
                         f"{type(err).__name__}: {err}") from err
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {err}") from err
    load_weights(model, state, f"{weights_path} does not match the model described by {config_path}")
    pre = config["preprocessing"]
    bundle = Pretrained(model.to(map_location).eval(), config["class_names"], np.asarray(config["palette"]),
                        tuple(pre["mean"]), tuple(pre["std"]), tuple(pre["test_scale"]), config["inference"])
    return bundle


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


def _read_config(path: Path) -> dict[str, Any]:
    """Parse and check ``config.json``; errors name the file and the entry."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} config (its 'format' entry is not {FORMAT!r})")
    if config.get("version") != VERSION:
        raise ValueError(f"{path} has version {config.get('version')!r}; this code reads version {VERSION}")
    for key in ("model", "class_names", "palette", "preprocessing", "inference"):
        if key not in config:
            raise ValueError(f"{path} has no {key!r} entry")
    model = config["model"]
    if not isinstance(model, dict) or not isinstance(model.get("num_classes"), int):
        raise ValueError(f"{path}: 'model' must hold the Segmentor arguments, with an integer 'num_classes'")
    pre = config["preprocessing"]
    if not isinstance(pre, dict) or {"mean", "std", "test_scale"} - set(pre) or len(pre["test_scale"]) != 2:
        raise ValueError(f"{path}: 'preprocessing' must hold 'mean', 'std' and 'test_scale' [long, short]")
    palette = np.asarray(config["palette"])
    problem = _check_metadata(model["num_classes"], config["class_names"], palette, pre["mean"], pre["std"])
    if problem:
        raise ValueError(f"{path}: {problem}")
    try:
        fields = {f.name for f in dataclasses.fields(InferenceConfig)}
        inference = {k: tuple(v) if isinstance(v, list) else v for k, v in config["inference"].items()}
        if set(inference) - fields:
            raise TypeError(f"unknown keys {sorted(set(inference) - fields)}")
        config["inference"] = InferenceConfig(**inference)
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: bad 'inference' entry: {err}") from err
    return config


def _check_metadata(num_classes: int, class_names: Any, palette: np.ndarray, mean: Any, std: Any) -> str:
    """What is wrong with the class names, palette and normalisation of a ``num_classes`` model ("" if nothing)."""
    if not isinstance(class_names, list | tuple) or len(class_names) != num_classes:
        count = len(class_names) if isinstance(class_names, list | tuple) else "no list of"
        return f"{count} class names for a model of {num_classes} classes"
    if palette.shape != (num_classes, 3) or not np.issubdtype(palette.dtype, np.integer) \
            or palette.min(initial=0) < 0 or palette.max(initial=0) > UINT8_MAX:
        return f"palette must be {num_classes} RGB triples of integers 0..{UINT8_MAX}, got shape {palette.shape}"
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        return f"mean and std must be 3 values per RGB channel (std > 0), got {list(mean)} and {list(std)}"
    return ""


def _json_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Encoder kwargs as JSON values (tuples become lists); a local weights file is dropped, the weights are
    in model.safetensors."""
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}
    try:
        return json.loads(json.dumps(kwargs))
    except (TypeError, ValueError) as err:
        raise ValueError(f"encoder_kwargs {kwargs} cannot be written to {CONFIG_FILE}: {err}") from err


def _replace(path: Path, content: bytes) -> None:
    """Write ``content`` to a temporary file beside ``path`` and rename it over ``path``: never half a file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _BuildOnlyCLI(SegmentationCLI):
    """The training CLI's parsing, links and instantiation of the data module and task, without a trainer (its
    accelerator may not exist on this machine)."""

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        return None


def from_checkpoint(cli_args: Sequence[str], ckpt_path: str | os.PathLike[str]) -> Pretrained:
    """Build the model as ``cli.py`` does from ``cli_args`` (``--config ...`` and overrides) and load the
    weights of a Lightning checkpoint (read with ``weights_only=True``)."""
    ckpt = Path(ckpt_path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    with warnings.catch_warnings():  # the arguments are this program's own, passed on: nothing to warn about
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = _BuildOnlyCLI(SegmentationTask, SegmentationDataModule, args=list(cli_args), run=False,
                            parser_class=SegmentationArgumentParser, seed_everything_default=0)
    task: SegmentationTask = cli.model
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {ckpt} (tensors only, weights_only=True): {err}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{ckpt} is not a Lightning checkpoint (no 'state_dict')")
    prefix = "model."  # SegmentationTask.model
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    configs = " ".join(a for a in cli_args if a.endswith((".yaml", ".yml"))) or "the command line"
    load_weights(task.model, state, f"{ckpt} does not match the model built from {configs}")
    spec = cli.datamodule.spec  # the data set's facts, as training read them
    return Pretrained(task.model.eval(), list(spec.class_names), spec.palette_array, spec.mean, spec.std,
                      spec.test_scale, inference=task.inference)


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m seg.pretrained --config <experiment>.yaml --ckpt_path <file>.ckpt --out <folder>``."""
    parser = argparse.ArgumentParser(
        prog="python -m seg.pretrained",
        description="Write a pretrained folder (model.safetensors + config.json) from a Lightning checkpoint. "
        "Every other argument (--config, --model..., --data...) is read as by `python cli.py`.",
    )
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint (.ckpt) of the run")
    parser.add_argument("--out", required=True, help="output folder")
    args, cli_args = parser.parse_known_args(argv)
    if not cli_args:
        parser.error("give the run's config: --config configs/<experiment>.yaml")
    folder = from_checkpoint(cli_args, args.ckpt_path).save(args.out)
    print(f"wrote {folder / WEIGHTS_FILE} and {folder / CONFIG_FILE}")
    return folder


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
