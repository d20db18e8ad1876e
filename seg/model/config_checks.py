"""A saved segmentor's ``config.json`` checked before anything is built: size and nesting of the JSON, the type
and a sane range of every value, and encoder names resolved only against the local timm registry.

A hostile or corrupted file must fail here with the file and the field named, never by exhausting memory while
a million-channel decoder is allocated, by retrying the network for an ``hf-hub:`` encoder, or by running
hundreds of thousands of sliding windows per photo later.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from seg.data.spec import ADE20K_CROP, ADE20K_STRIDE, UINT8_MAX

__all__ = [
    "LIMITS",
    "check_dataset_section",
    "check_inference_section",
    "check_model_arguments",
    "load_bounded_json",
]

LIMITS = {
    "config_bytes": 1 << 20,  # config.json of ADE20K's classes with names and palette: ~10 KB
    "json_depth": 16,
    "num_classes": 1024,
    "decoder_channels": 4096,
    "pad_multiple": 1024,
    "image_side": 8192,  # test_scale and crop_size sides
    "min_image_side": 16,
    "scales": 16,  # at most this many multi-scale views
    "scale": (0.1, 4.0),
    "batch_windows": 256,
    "class_name_chars": 256,
    "kwarg_int": 1 << 16,  # |int| in encoder_kwargs (depths, widths, image sizes)
}
_MODEL_KEYS = {"encoder", "decoder", "num_classes", "decoder_channels", "aux_head", "encoder_kwargs",
               "pad_multiple", "channels_last"}


def _max_depth(text: str) -> int:
    """Deepest nesting of ``[`` / ``{`` in JSON text (brackets inside strings not counted), iteratively."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def load_bounded_json(path: str | Path) -> Any:
    """Parse a JSON file of at most ``LIMITS['config_bytes']`` bytes and ``LIMITS['json_depth']`` levels.

    Raises:
        ValueError: too large, too deep, not UTF-8 or not JSON (the file named).
    """
    path = Path(path)
    size = path.stat().st_size
    if size > LIMITS["config_bytes"]:
        raise ValueError(f"{path} is {size} bytes; a config.json holds at most {LIMITS['config_bytes']}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from err
    depth = _max_depth(text)
    if depth > LIMITS["json_depth"]:
        raise ValueError(f"{path} nests {depth} levels deep; a config.json nests at most {LIMITS['json_depth']}")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _fail(path: Path, field: str, problem: str) -> ValueError:
    return ValueError(f"{path}: field '{field}' {problem}")


def _int(path: Path, field: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, field, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise _fail(path, field, f"must be in [{low}, {high}], got {value}")
    return value


def _number(path: Path, field: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(path, field, f"must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise _fail(path, field, f"must be in [{low}, {high}], got {value}")
    return float(value)


def _list(path: Path, field: str, value: Any, length: int | None = None, max_length: int = 4096) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(path, field, f"must be a list, got {type(value).__name__}")
    if (length is not None and len(value) != length) or len(value) > max_length:
        raise _fail(path, field, f"must hold {length if length is not None else f'at most {max_length}'} values, "
                    f"got {len(value)}")
    return value


def _side_pair(path: Path, field: str, value: Any) -> None:
    """An int or an [h, w] pair of image sides."""
    low, high = LIMITS["min_image_side"], LIMITS["image_side"]
    if isinstance(value, list):
        for i, side in enumerate(_list(path, field, value, length=2)):
            _int(path, f"{field}[{i}]", side, low, high)
    else:
        _int(path, field, value, low, high)


def _check_encoder_name(path: Path, name: Any) -> None:
    import timm

    import seg.model.backbones  # noqa: F401  (registers the project's encoders with timm)

    if not isinstance(name, str) or not name or len(name) > 128:
        raise _fail(path, "encoder", f"must be a model name, got {name!r}")
    if ":" in name or "/" in name:
        raise _fail(path, "encoder", f"{name!r} names a remote model; only locally registered encoders are built "
                    "from a config.json")
    if not timm.is_model(name):
        raise _fail(path, "encoder", f"{name!r} is not a registered timm or project encoder")


def _check_kwargs(path: Path, field: str, value: Any) -> None:
    """Encoder keyword arguments: string keys, scalar or short-list values with bounded integers."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise _fail(path, field, f"has a key {key!r} that is not an argument name")
            if key in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path"):
                raise _fail(path, f"{field}.{key}", "is not allowed: weights come from model.safetensors")
            _check_kwargs(path, f"{field}.{key}", item)
    elif isinstance(value, list):
        for i, item in enumerate(_list(path, field, value, max_length=64)):
            _check_kwargs(path, f"{field}[{i}]", item)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        _int(path, field, value, -LIMITS["kwarg_int"], LIMITS["kwarg_int"])
    elif isinstance(value, float):
        _number(path, field, value, -1e6, 1e6)
    elif isinstance(value, str):
        if len(value) > 128:
            raise _fail(path, field, f"is a string of {len(value)} characters (at most 128)")
    else:
        raise _fail(path, field, f"has an unsupported value {value!r}")


def check_model_arguments(path: Path, model: Mapping[str, Any], decoders: Collection[str] = ()) -> None:
    """The Segmentor arguments of a config.json: known keys, types and ranges, a local encoder, and a decoder
    among ``decoders`` (the segmentor's registry, passed in by the caller; empty: not checked here)."""
    unknown = sorted(set(model) - _MODEL_KEYS)
    if unknown:
        raise _fail(path, unknown[0], f"is not a Segmentor argument (known: {', '.join(sorted(_MODEL_KEYS))})")
    _check_encoder_name(path, model.get("encoder"))
    if decoders and model.get("decoder", "upernet") not in decoders:
        raise _fail(path, "decoder", f"must be one of {', '.join(decoders)}, got {model.get('decoder')!r}")
    _int(path, "num_classes", model.get("num_classes"), 1, LIMITS["num_classes"])
    if model.get("decoder_channels") is not None:
        _int(path, "decoder_channels", model["decoder_channels"], 1, LIMITS["decoder_channels"])
    if model.get("pad_multiple") is not None:
        _int(path, "pad_multiple", model["pad_multiple"], 1, LIMITS["pad_multiple"])
    for flag in ("aux_head", "channels_last"):
        if flag in model and not isinstance(model[flag], bool):
            raise _fail(path, flag, f"must be true or false, got {model[flag]!r}")
    kwargs = model.get("encoder_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise _fail(path, "encoder_kwargs", f"must be a mapping, got {type(kwargs).__name__}")
        _check_kwargs(path, "encoder_kwargs", kwargs)


def check_dataset_section(path: Path, dataset: Any, num_classes: int) -> None:
    """The ``dataset`` section: names and palette of ``num_classes`` classes, ignore index, mean / std,
    test_scale."""
    if dataset is None:
        return
    if not isinstance(dataset, dict):
        raise _fail(path, "dataset", "must be a mapping")
    name = dataset.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 256):
        raise _fail(path, "dataset.name", f"must be a short string, got {name!r}")
    if dataset.get("class_names") is not None:
        names = _list(path, "dataset.class_names", dataset["class_names"], length=num_classes)
        for i, item in enumerate(names):
            if not isinstance(item, str) or len(item) > LIMITS["class_name_chars"]:
                raise _fail(path, f"dataset.class_names[{i}]", f"must be a string of at most "
                            f"{LIMITS['class_name_chars']} characters")
    if dataset.get("palette") is not None:
        palette = _list(path, "dataset.palette", dataset["palette"], length=num_classes)
        for i, colour in enumerate(palette):
            for j, channel in enumerate(_list(path, f"dataset.palette[{i}]", colour, length=3)):
                _int(path, f"dataset.palette[{i}][{j}]", channel, 0, UINT8_MAX)
    for key, low in (("mean", 0.0), ("std", 1e-6)):
        if dataset.get(key) is not None:
            for i, value in enumerate(_list(path, f"dataset.{key}", dataset[key], length=3)):
                _number(path, f"dataset.{key}[{i}]", value, low, float(UINT8_MAX))
    if dataset.get("ignore_index") is not None:
        _int(path, "dataset.ignore_index", dataset["ignore_index"], num_classes, UINT8_MAX)
    if "reduce_zero_label" in dataset and not isinstance(dataset["reduce_zero_label"], bool):
        raise _fail(path, "dataset.reduce_zero_label", f"must be true or false, got {dataset['reduce_zero_label']!r}")
    if dataset.get("num_classes") is not None and dataset["num_classes"] != num_classes:
        raise _fail(path, "dataset.num_classes", f"must equal the model's {num_classes}, "
                    f"got {dataset['num_classes']!r}")
    if dataset.get("test_scale") is not None:
        scale = _list(path, "dataset.test_scale", dataset["test_scale"], length=2)
        for i, side in enumerate(scale):
            _int(path, f"dataset.test_scale[{i}]", side, LIMITS["min_image_side"], LIMITS["image_side"])


def check_inference_section(path: Path, inference: Any) -> None:
    """The ``inference`` section: mode, window sizes, a stride of at least a quarter window, scales, flip."""
    if inference is None:
        return
    if not isinstance(inference, dict):
        raise _fail(path, "inference", "must be a mapping")
    for key in ("mode", "multiscale_mode"):
        if key in inference and not isinstance(inference[key], str):
            raise _fail(path, f"inference.{key}", f"must be a string, got {inference[key]!r}")
    crop, stride = inference.get("crop_size", ADE20K_CROP), inference.get("stride", ADE20K_STRIDE)
    _side_pair(path, "inference.crop_size", crop)
    crops = crop if isinstance(crop, list) else [crop, crop]
    strides = stride if isinstance(stride, list) else [stride, stride]
    if isinstance(stride, list):
        _list(path, "inference.stride", stride, length=2)
    for i, (c, s) in enumerate(zip(crops, strides, strict=True)):
        _int(path, "inference.stride" + (f"[{i}]" if isinstance(stride, list) else ""), s, max(1, c // 4), c)
    if "scales" in inference:
        low, high = LIMITS["scale"]
        for i, value in enumerate(_list(path, "inference.scales", inference["scales"], max_length=LIMITS["scales"])):
            _number(path, f"inference.scales[{i}]", value, low, high)
    if "flip" in inference and not isinstance(inference["flip"], bool):
        raise _fail(path, "inference.flip", f"must be true or false, got {inference['flip']!r}")
    if "batch_windows" in inference:
        _int(path, "inference.batch_windows", inference["batch_windows"], 1, LIMITS["batch_windows"])
