"""Test-time inference: whole image, sliding window, multi-scale + flip (mmsegmentation semantics).

Every function takes ``model``, any callable mapping an image batch (B, 3, h, w) to logits
(B, K, h', w') (normally h' = h, w' = w; other sizes are resized bilinearly to the input size), and
returns (B, K, H_out, W_out), where ``(H_out, W_out)`` is ``out_size`` when given (e.g. the original
label size) and the input size otherwise.

- :func:`whole_inference` and :func:`slide_inference` return raw logits.
- :func:`multiscale_inference` follows mmseg's test-time augmentation: it averages the **softmax
  probabilities** of all views (each view's logits first resized to the output size) and returns their
  logarithm, so that ``softmax(output)`` is exactly that average and ``argmax(output)`` is mmseg's prediction.
  Given the test pipeline's ``image_scale`` (the (long, short) box, (2048, 512) for ADE20K), view sizes follow
  mmseg's rule from the **original** image size: scale s fits the original into (long * s, short * s), keeping
  its aspect ratio (:func:`multiscale_sizes`).

All resizes are bilinear with ``align_corners=False``. Call these under ``torch.no_grad()`` / inference mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from seg.data.spec import ADE20K_CROP, ADE20K_STRIDE
from seg.data.transforms import fit_size

__all__ = [
    "InferenceConfig",
    "SettingError",
    "multiscale_inference",
    "multiscale_sizes",
    "run_inference",
    "slide_inference",
    "slide_windows",
    "whole_inference",
]

Model = Callable[[Tensor], Tensor]
Size = int | tuple[int, int]


def _pair(size: Size) -> tuple[int, int]:
    """(h, w) from an int or a pair."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _resize(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (B, K, h, w) to (B, K, *size); a no-op when the size already matches."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def whole_inference(model: Model, image: Tensor, out_size: Size | None = None) -> Tensor:
    """One forward pass over the whole image.

    Args:
        model: image batch (B, 3, H, W) -> logits (B, K, H, W).
        image: normalised image batch (B, 3, H, W).
        out_size: (H_out, W_out) to resize the logits to; the input size when None.

    Returns:
        Logits (B, K, H_out, W_out).
    """
    size = _pair(out_size) if out_size is not None else tuple(image.shape[-2:])
    return _resize(model(image), size)


def slide_windows(
    height: int, width: int, crop_size: Size = ADE20K_CROP, stride: Size = ADE20K_STRIDE
) -> list[tuple[int, int, int, int]]:
    """Window boxes ``(y1, y2, x1, x2)`` of mmseg's sliding-window inference, row by row.

    ``h_grids = max(ceil((H - crop_h) / stride_h), 0) + 1`` (same for w); window i starts at
    ``max(min(i * stride, H - crop), 0)``, so the last window touches the border and windows are at most
    ``crop`` pixels, all of the same size ``min(crop, H) x min(crop, W)``.
    """
    crop_h, crop_w = _pair(crop_size)
    stride_h, stride_w = _pair(stride)
    if min(crop_h, crop_w, stride_h, stride_w) < 1:
        raise ValueError(f"crop_size {crop_size} and stride {stride} must be positive")
    h_grids = max(math.ceil((height - crop_h) / stride_h), 0) + 1
    w_grids = max(math.ceil((width - crop_w) / stride_w), 0) + 1
    boxes = []
    for i in range(h_grids):
        y1 = max(min(i * stride_h, height - crop_h), 0)
        y2 = min(y1 + crop_h, height)
        for j in range(w_grids):
            x1 = max(min(j * stride_w, width - crop_w), 0)
            x2 = min(x1 + crop_w, width)
            boxes.append((y1, y2, x1, x2))
    return boxes


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def slide_inference(
    model: Model,
    image: Tensor,
    crop_size: Size = ADE20K_CROP,
    stride: Size = ADE20K_STRIDE,
    num_classes: int | None = None,
    out_size: Size | None = None,
    batch_windows: int = 1,
) -> Tensor:
    """Sliding-window inference: overlapping crops, logits averaged where windows overlap.

    Memory stays bounded: window logits are added into one (B, K, H, W) sum as they come, ``batch_windows``
    windows (of every image in the batch) at a time.

    Args:
        model: image batch (b, 3, h, w) -> logits (b, K, h, w).
        image: normalised image batch (B, 3, H, W).
        crop_size: window size (h, w) in pixels, or one int for both.
        stride: window step (h, w) in pixels, or one int for both.
        num_classes: expected K; checked against the model output when given.
        out_size: (H_out, W_out) to resize the averaged logits to; the input size when None.
        batch_windows: number of windows stacked into one forward pass.

    Returns:
        Logits (B, K, H_out, W_out).
    """
    if batch_windows < 1:
        raise ValueError(f"batch_windows must be positive, got {batch_windows}")
    batch, _, height, width = image.shape
    boxes = slide_windows(height, width, crop_size, stride)
    crop_hw = (boxes[0][1] - boxes[0][0], boxes[0][3] - boxes[0][2])  # every window has this size
    summed: Tensor | None = None
    count = torch.zeros(1, 1, height, width, device=image.device)
    for group in _chunks(boxes, batch_windows):
        crops = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in group])  # (n*B, 3, h, w)
        logits = _resize(model(crops), crop_hw)  # (n*B, K, h, w)
        if summed is None:
            if num_classes is not None and logits.shape[1] != num_classes:
                raise ValueError(f"model returned {logits.shape[1]} classes, expected {num_classes}")
            dtype = torch.promote_types(logits.dtype, torch.float32)  # sum low-precision logits in fp32
            summed = logits.new_zeros(batch, logits.shape[1], height, width, dtype=dtype)
        for (y1, y2, x1, x2), window in zip(group, logits.split(batch), strict=True):
            summed[:, :, y1:y2, x1:x2] += window
            count[:, :, y1:y2, x1:x2] += 1
    assert summed is not None  # at least one window always exists
    logits = summed / count.to(summed.dtype)
    size = _pair(out_size) if out_size is not None else (height, width)
    return _resize(logits, size)


def multiscale_sizes(
    orig_size: tuple[int, int], scales: Sequence[float], image_scale: tuple[int, int]
) -> list[tuple[int, int]]:
    """View sizes (h, w) of mmseg's multi-scale test, from the original image size.

    For each scale s the original (H0, W0) is rescaled, keeping its aspect ratio, to fit the box
    ``(int(long * s), int(short * s))`` with ``image_scale = (long, short)``: factor
    ``min(box_long / max(H0, W0), box_short / min(H0, W0))``, sizes rounded half up (the test pipeline's own
    resize is the s = 1 case).
    """
    long_side, short_side = image_scale
    return [fit_size(orig_size[0], orig_size[1], (int(long_side * s), int(short_side * s))) for s in scales]


def multiscale_inference(
    model: Model,
    image: Tensor,
    scales: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
    flip: bool = True,
    mode: Literal["whole", "slide"] = "whole",
    out_size: Size | None = None,
    image_scale: tuple[int, int] | None = None,
    **slide_kwargs,
) -> Tensor:
    """Multi-scale (+ horizontal flip) test-time augmentation, averaging softmax probabilities like mmseg.

    Each view resizes the input (bilinear) to its scale's size, runs ``mode`` inference, un-flips its
    logits, resizes them to the output size and adds their softmax to a running sum (views are never held
    together). View sizes: with ``image_scale``, mmseg's rule from the original size (``out_size``, else the
    input size; see :func:`multiscale_sizes`); without, ``int(H * scale + 0.5) x int(W * scale + 0.5)`` of the
    input. The pixels are resampled from ``image`` (the test-resized image), not from the original file.

    Args:
        model: image batch -> logits at the input size.
        image: normalised image batch (B, 3, H, W).
        scales: scale factors (of ``image_scale`` when given, else of the input size).
        flip: also run each scale on the horizontally flipped image.
        mode: per-view inference, ``"whole"`` or ``"slide"``.
        out_size: (H_out, W_out) of the result, the original image size; the input size when None.
        image_scale: (long, short) box of the test pipeline's keep-ratio resize, e.g. (2048, 512).
        **slide_kwargs: ``crop_size``, ``stride``, ``num_classes``, ``batch_windows`` for ``mode="slide"``.

    Returns:
        Log of the mean probability (B, K, H_out, W_out): ``softmax`` of it is the mean probability.
    """
    if not scales:
        raise ValueError("scales must not be empty")
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    height, width = image.shape[-2:]
    size = _pair(out_size) if out_size is not None else (height, width)
    if image_scale is not None:
        view_sizes = multiscale_sizes(size, scales, _pair(image_scale))
    else:
        view_sizes = [(int(height * scale + 0.5), int(width * scale + 0.5)) for scale in scales]
    prob_sum: Tensor | None = None
    views = 0
    for scaled_hw in view_sizes:
        scaled = _resize(image, scaled_hw)
        for flipped in (False, True) if flip else (False,):
            view = scaled.flip(-1) if flipped else scaled
            if mode == "whole":
                logits = whole_inference(model, view)
            else:
                logits = slide_inference(model, view, **slide_kwargs)
            if flipped:
                logits = logits.flip(-1)
            prob = _resize(logits, size).softmax(dim=1)  # (B, K, H_out, W_out)
            prob_sum = prob if prob_sum is None else prob_sum + prob
            views += 1
    assert prob_sum is not None
    mean_prob = prob_sum / views
    return mean_prob.clamp_min(torch.finfo(mean_prob.dtype).tiny).log()


class SettingError(ValueError):
    """A setting out of range; the message starts with the field's name."""


@dataclass
class InferenceConfig:
    """How validation, test and predict turn an image into logits (selectable from YAML).

    Args:
        mode: ``"whole"`` (one pass), ``"slide"`` (sliding window) or ``"multiscale"`` (scales (+ flip)).
        crop_size: sliding-window size in pixels (int or (h, w)); used by ``"slide"`` and by
            ``"multiscale"`` with ``multiscale_mode="slide"``.
        stride: sliding-window step in pixels (int or (h, w)).
        scales: image scale factors for ``"multiscale"``, of the test resize box (the data set spec's
            ``test_scale``): mmseg's ``img_ratios``.
        flip: add horizontally flipped views; with ``"whole"`` or ``"slide"`` this is single-scale + flip.
        multiscale_mode: per-view inference of ``"multiscale"``: ``"whole"`` or ``"slide"``.
        batch_windows: sliding windows per forward pass.
    """

    mode: Literal["whole", "slide", "multiscale"] = "whole"
    crop_size: int | tuple[int, int] = ADE20K_CROP
    stride: int | tuple[int, int] = ADE20K_STRIDE
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    flip: bool = False
    multiscale_mode: Literal["whole", "slide"] = "whole"
    batch_windows: int = 1

    def __post_init__(self) -> None:
        self.validate()
        self.scales = tuple(float(s) for s in self.scales)

    def validate(self) -> None:
        """Raise a :class:`SettingError` naming the first field out of range. Construction runs it; a config unpickled
        from a checkpoint skips ``__post_init__``, so whoever loads one calls it (:mod:`seg.model.checkpoint`)."""
        if self.mode not in ("whole", "slide", "multiscale"):
            raise SettingError(f"mode must be 'whole', 'slide' or 'multiscale', got {self.mode!r}")
        if self.multiscale_mode not in ("whole", "slide"):
            raise SettingError(f"multiscale_mode must be 'whole' or 'slide', got {self.multiscale_mode!r}")
        if not _positive_numbers(self.scales, float):
            raise SettingError(f"scales must be positive and non-empty, got {self.scales!r}")
        for name in ("crop_size", "stride"):
            value = getattr(self, name)
            if not _positive_numbers(value if isinstance(value, tuple | list) else (value,), int, sizes=(1, 2)):
                raise SettingError(f"{name} must be a positive int or (h, w) pair of them, got {value!r}")
        if not _positive_numbers((self.batch_windows,), int):
            raise SettingError(f"batch_windows must be a positive int, got {self.batch_windows!r}")
        if not isinstance(self.flip, bool):
            raise SettingError(f"flip must be true or false, got {self.flip!r}")


def _positive_numbers(values: object, kind: type, sizes: tuple[int, ...] | None = None) -> bool:
    """Whether ``values`` is a non-empty tuple / list (of one of ``sizes`` lengths) of positive ``kind``
    numbers (ints count as floats; bools count as neither)."""
    if not isinstance(values, tuple | list) or not values or (sizes is not None and len(values) not in sizes):
        return False
    kinds = (int, float) if kind is float else (int,)
    return all(isinstance(v, kinds) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values)


# kept in checkpoint hparams: allowed in safe loads, also under the path checkpoints written before the package
# layout pickled (torch >= 2.6 takes a (class, path) pair; older torch loads only checkpoints written since)
torch.serialization.add_safe_globals([InferenceConfig])
if torch.torch_version.TorchVersion(torch.__version__) >= (2, 6):
    torch.serialization.add_safe_globals([(InferenceConfig, "seg.inference.InferenceConfig")])

def run_inference(
    model: Model,
    image: Tensor,
    cfg: InferenceConfig,
    out_size: Size | None = None,
    image_scale: tuple[int, int] | None = None,
) -> Tensor:
    """Dispatch to whole / slide / multi-scale inference as ``cfg`` says.

    ``out_size`` is the original image size and ``image_scale`` the test pipeline's (long, short) resize box:
    with both, ``"multiscale"`` sizes its views from the original image as mmseg does (see
    :func:`multiscale_sizes`). Single-scale modes (also with ``flip``) run on the input as it is.

    Returns:
        (B, K, H_out, W_out): logits for plain ``"whole"`` / ``"slide"``; log mean probabilities when
        views are averaged (``"multiscale"``, or ``flip=True``). Either way ``argmax`` over K predicts.
    """
    slide_kwargs = dict(crop_size=cfg.crop_size, stride=cfg.stride, batch_windows=cfg.batch_windows)
    if cfg.mode == "multiscale":
        base = cfg.multiscale_mode
        kwargs = slide_kwargs if base == "slide" else {}
        return multiscale_inference(model, image, cfg.scales, cfg.flip, base, out_size, image_scale, **kwargs)
    if cfg.flip:
        kwargs = slide_kwargs if cfg.mode == "slide" else {}
        return multiscale_inference(model, image, (1.0,), True, cfg.mode, out_size, **kwargs)
    if cfg.mode == "slide":
        return slide_inference(model, image, out_size=out_size, **slide_kwargs)
    return whole_inference(model, image, out_size)
