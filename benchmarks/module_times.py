"""Where an encoder's inference time goes, per kind of module, timed with forward hooks.

    python benchmarks/module_times.py                    # FLatten-PVT-T and softmax PVT-T at 512^2
    python benchmarks/module_times.py --rounds 16 --size 1024

Both encoders (features only, batch 1, float32, no autograd, ``attn_backend`` ``auto``) run in one process,
alternating in every round. A pre- and a post-forward hook on each attention layer and each MLP time it;
a round's figure per kind is the sum over the encoder's layers of that kind, and the table reports the median
over rounds, beside the whole forward and each kind's share of it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine  # noqa: E402

import seg  # noqa: E402,F401  (registers the encoders)
from seg.model.layers import FocusedLinearAttention, SpatialReductionAttention  # noqa: E402
from seg.model.layers.mlp import Mlp  # noqa: E402

__all__ = ["kind_of", "timed_forward"]

MODELS = {"FLatten-PVT-T": "LLLL", "PVT-T (softmax, SDPA)": "SSSS"}
KINDS = ("attention", "MLP")


def kind_of(module: nn.Module) -> str | None:
    """The kind a module is timed as, or None."""
    if isinstance(module, FocusedLinearAttention | SpatialReductionAttention):
        return "attention"
    return "MLP" if isinstance(module, Mlp) else None


def timed_forward(model: nn.Module) -> Callable[[torch.Tensor], dict[str, float]]:
    """``run(x)``: one forward pass of ``model``; seconds per kind of module and in all (``total``)."""
    spent: dict[str, float] = defaultdict(float)
    started: dict[nn.Module, float] = {}

    def before(module: nn.Module, args: tuple) -> None:
        started[module] = time.perf_counter()

    def after(module: nn.Module, args: tuple, output: object) -> None:
        spent[kind_of(module)] += time.perf_counter() - started.pop(module)

    for module in model.modules():
        if kind_of(module) is not None:
            module.register_forward_pre_hook(before)
            module.register_forward_hook(after)

    def run(x: torch.Tensor) -> dict[str, float]:
        spent.clear()
        start = time.perf_counter()
        with torch.inference_mode():
            model(x)
        return {**spent, "total": time.perf_counter() - start}

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    x = torch.randn(1, 3, args.size, args.size)
    runs = {}
    for label, attn_type in MODELS.items():
        torch.manual_seed(0)
        runs[label] = timed_forward(timm.create_model("flatten_pvt_tiny", attn_type=attn_type,
                                                      features_only=True).eval())
        runs[label](x)  # warm-up
    samples: dict[str, list[dict[str, float]]] = defaultdict(list)
    for r in range(args.rounds):
        for label in list(MODELS)[:: 1 if r % 2 == 0 else -1]:  # who goes first alternates
            samples[label].append(runs[label](x))
    print(f"# encoders at {args.size}^2, batch 1, float32, inference; median of {args.rounds} alternating rounds, "
          f"forward hooks; {machine()}")
    print("| model | " + " | ".join(f"{k} (ms) | {k} share" for k in KINDS) + " | encoder (ms) |")
    print("|---|" + "---|---|" * len(KINDS) + "---|")
    for label, rounds in samples.items():
        total = statistics.median(s["total"] for s in rounds)
        cells = []
        for kind in KINDS:
            seconds = statistics.median(s.get(kind, 0.0) for s in rounds)
            cells.append(f"{seconds * 1e3:.1f} | {seconds / total:.0%}")
        print(f"| {label} | " + " | ".join(cells) + f" | {total * 1e3:.1f} |")


if __name__ == "__main__":
    main()
