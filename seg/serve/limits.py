"""Bounded inference on photos: a pixel limit, and the full-resolution resize + argmax done in row stripes so that
memory grows with H x W, not with classes x H x W.

The logits of a model of ADE20K's classes for a 6000 x 4000 photo take 13.4 GiB of float32 at full resolution;
:func:`labels_at` never holds more than ``max_elements`` of them at once (16 MiB of float32 by default: below
glibc's 32 MiB mmap ceiling, so each stripe reuses the heap instead of faulting in fresh pages, which made
64 MiB stripes 1.3-1.6x slower, ``benchmarks/labels_at.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from seg.data.safety import DEFAULT_MAX_PIXELS, ImageTooLargeError, check_pixels
from seg.model.inference import InferenceConfig, Model, run_inference

__all__ = ["DEFAULT_MAX_PIXELS", "ImageTooLargeError", "check_pixels", "labels_at", "predict_labels"]

STRIPE_ELEMENTS = 1 << 22  # logits held at once by labels_at: 16 MiB of float32


def _row_weights(size_in: int, size_out: int, rows: range, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Source rows and weights of bilinear resizing (``align_corners=False``, as ``F.interpolate`` with a size)."""
    scale = size_in / size_out
    dst = torch.arange(rows.start, rows.stop, device=device, dtype=torch.float64)
    src = ((dst + 0.5) * scale - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=size_in - 1)
    high = torch.where(low < size_in - 1, low + 1, low)
    return low, high, (src - low).float()


def labels_at(logits: Tensor, out_size: tuple[int, int], max_elements: int = STRIPE_ELEMENTS) -> Tensor:
    """``argmax`` over classes of the logits bilinearly resized to ``out_size``, computed in row stripes.

    Equal to ``F.interpolate(logits, out_size, mode="bilinear", align_corners=False).argmax(1)`` up to float
    rounding, while holding at most ``max_elements`` resized logits at a time.

    Args:
        logits: (B, K, h, w) at the network's resolution.
        out_size: (H, W), the photo's size.
        max_elements: resized logits per stripe (B x K x rows x W).

    Returns:
        (B, H, W) int64 class indices.
    """
    B, K, h, w = logits.shape
    H, W = out_size
    labels = torch.empty((B, H, W), dtype=torch.int64, device=logits.device)
    rows = max(1, min(H, max_elements // max(1, B * K * W)))
    for start in range(0, H, rows):
        span = range(start, min(H, start + rows))
        if h == H:
            stripe = logits[:, :, span.start:span.stop]  # (B, K, r, w)
        else:
            low, high, weight = _row_weights(h, H, span, logits.device)
            first, last = int(low[0]), int(high[-1]) + 1  # the source rows this stripe reads
            blend = logits.new_zeros((len(span), last - first))  # (r, n): two weights per output row
            rows_out = torch.arange(len(span), device=logits.device)
            blend.index_put_((rows_out, low - first), 1 - weight.to(logits.dtype), accumulate=True)
            blend.index_put_((rows_out, high - first), weight.to(logits.dtype), accumulate=True)
            stripe = torch.matmul(blend, logits[:, :, first:last])  # (r, n) @ (B, K, n, w) -> (B, K, r, w)
        if w != W:
            stripe = F.interpolate(stripe, size=(len(span), W), mode="bilinear", align_corners=False)  # (B, K, r, W)
        labels[:, span.start:span.stop] = stripe.argmax(dim=1)
    return labels


def predict_labels(
    model: Model,
    image: Tensor,
    cfg: InferenceConfig,
    out_size: tuple[int, int],
    image_scale: tuple[int, int] | None = None,
) -> Tensor:
    """Class indices (B, H, W) at ``out_size`` for a normalised batch (B, 3, h, w), as ``run_inference(...)
    .argmax(1)`` computes them. Whole-image and sliding-window logits stay at the network's resolution and
    :func:`labels_at` resizes them in stripes; multi-scale and flip average probabilities at full resolution
    (classes x H x W floats, see README "Limits")."""
    if cfg.mode == "multiscale" or cfg.flip:
        return run_inference(model, image, cfg, out_size, image_scale).argmax(dim=1)
    return labels_at(run_inference(model, image, cfg, None, image_scale), out_size)
