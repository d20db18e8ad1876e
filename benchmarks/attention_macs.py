"""Multiply-adds of the attention layers of FLatten-PVT-T and softmax PVT-T, counted from their layer shapes.

    python benchmarks/attention_macs.py                  # 512^2, per stage and in all
    python benchmarks/attention_macs.py --size 1024

Each encoder is built (``attn_type`` ``LLLL`` and ``SSSS``), one forward pass at the given size records every
attention layer's token counts, and the products are counted from the layer's widths (C channels, h heads of
d = C / h, spatial reduction sr: n = N / sr^2 keys):

- focused linear: q, k, v and output projections (N C^2 each, k and v at n tokens), the per-head summaries
  phi(k)^T v (n C d) and the queries against them (N C d); the DWC and the element-wise steps are left out;
- softmax SRA: q and output projections (N C^2 each), the spatial-reduction conv (n C^2 sr^2), k and v
  (n C^2 each), q k^T and the weighted sum of v (N n C each).

Counts only: no timing, so the machine does not matter.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import timm
import torch
from torch import nn

import seg  # noqa: F401  (registers the encoders)
from seg.model.layers import FocusedLinearAttention, SpatialReductionAttention

__all__ = ["attention_macs", "layer_macs"]

MODELS = {"FLatten-PVT-T": "LLLL", "PVT-T (softmax)": "SSSS"}


def layer_macs(layer: nn.Module, N: int) -> int:
    """Multiply-adds of one attention layer over N query tokens (see the module docstring)."""
    C = layer.proj.in_features
    d, sr = C // layer.num_heads, layer.sr_ratio
    n = N // (sr * sr)
    reduction = n * C * C * sr * sr if sr > 1 else 0
    projections = 2 * N * C * C + 2 * n * C * C + reduction  # q, output; k, v; the reduction conv
    if isinstance(layer, FocusedLinearAttention):
        return projections + n * C * d + N * C * d  # summaries, queries against them
    if isinstance(layer, SpatialReductionAttention):
        return projections + 2 * N * n * C  # q k^T, weights times v
    raise TypeError(f"no count for {type(layer).__name__}")


def attention_macs(attn_type: str, size: int) -> dict[int, int]:
    """Multiply-adds of the attention layers of PVT-T with ``attn_type`` at size x size, per stage (1-4)."""
    model = timm.create_model("flatten_pvt_tiny", attn_type=attn_type, features_only=True, attn_backend="reference")
    stage_of = {}  # attention layer -> its stage (the `blockK` it sits in)
    for name, module in model.named_modules():
        if isinstance(module, FocusedLinearAttention | SpatialReductionAttention):
            stage_of[module] = int(re.search(r"block(\d)", name).group(1))
    counts: dict[int, int] = defaultdict(int)

    def record(module: nn.Module, args: tuple, output: object) -> None:
        counts[stage_of[module]] += layer_macs(module, args[0].shape[1])  # args[0]: tokens (B, N, C)

    hooks = [module.register_forward_hook(record) for module in stage_of]
    with torch.inference_mode():
        model.eval()(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return dict(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="square input side in pixels")
    args = parser.parse_args()
    counts = {label: attention_macs(attn_type, args.size) for label, attn_type in MODELS.items()}
    stages = sorted(set().union(*counts.values()))
    labels = list(MODELS)
    print(f"# multiply-adds of the attention layers at {args.size}^2, batch 1, counted from the layer shapes (G)")
    print("| stage | " + " | ".join(labels) + " | ratio |")
    print("|---|" + "---|" * (len(labels) + 1))
    for stage in [*stages, "all"]:
        values = [sum(c.values()) if stage == "all" else c.get(stage, 0) for c in counts.values()]
        print(f"| {stage} | " + " | ".join(f"{v / 1e9:.2f}" for v in values) + f" | {values[0] / values[1]:.2f} |")


if __name__ == "__main__":
    main()
