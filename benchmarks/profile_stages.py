"""Where CPU inference time goes: per-stage and per-operation tables of three segmentors.

    python benchmarks/profile_stages.py                         # all three at 512^2
    python benchmarks/profile_stages.py --models pvt_v2_b0_segformer --size 1024 --top 25

Models (random weights, 150 classes, batch 1, no auxiliary head, eval, ``torch.inference_mode``):
``pvt_v2_b0_segformer`` (FLatten-PVTv2-B0 + ``segformer``), ``pvt_tiny_fpn`` (FLatten-PVT-T + ``semantic_fpn``),
``swin_tiny_upernet`` (FLatten-Swin-T + ``upernet``).

Per stage: wall time of every top-level module of the encoder trunk (each block of a ModuleList on its own),
the decode head, and the rest of the forward (the full-size resize of the logits), medians over ``repeats``
forwards. Per operation: ``torch.profiler`` over one forward, grouped by input shapes, the ``top`` operations by
self time, and the time in ``aten::copy_`` (layout conversions and ``.contiguous()``) in total.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine  # noqa: E402

from seg.model.segmentor import Segmentor  # noqa: E402

MODELS = {
    "pvt_v2_b0_segformer": ("flatten_pvt_v2_b0", "segformer"),
    "pvt_tiny_fpn": ("flatten_pvt_tiny", "semantic_fpn"),
    "swin_tiny_upernet": ("flatten_swin_tiny", "upernet"),
}


def stage_modules(model: Segmentor) -> dict[str, nn.Module]:
    """The modules timed one by one: the trunk's children (a ModuleList's elements each, and the children of a
    stage that holds one: Swin's ``layers.<i>.blocks.<j>`` / ``.downsample``), then the head."""
    trunk = getattr(model.encoder, "model", model.encoder)
    trunk = getattr(trunk, "model", trunk)  # smp's timm wrapper holds timm's feature wrapper, which holds the trunk
    out: dict[str, nn.Module] = {}

    def add(name: str, module: nn.Module) -> None:  # a stage holding a ModuleList is entered, not called
        children = list(module.named_children())
        if isinstance(module, nn.ModuleList) or any(isinstance(c, nn.ModuleList) for _, c in children):
            for child_name, child in children:
                add(f"{name}.{child_name}", child)
        else:
            out[name] = module

    for name, child in trunk.named_children():
        add(name, child)
    out["decode_head"] = model.decode_head
    return out


def stage_times(model: Segmentor, image: torch.Tensor, repeats: int) -> tuple[dict[str, float], float]:
    """Median seconds per stage module and of the whole forward."""
    spans: dict[str, list[float]] = defaultdict(list)
    starts: dict[str, float] = {}
    handles = []
    for name, module in stage_modules(model).items():
        handles.append(module.register_forward_pre_hook(
            lambda m, a, n=name: starts.__setitem__(n, time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, a, o, n=name: spans[n].append(time.perf_counter() - starts[n])))
    totals = []
    with torch.inference_mode():
        model(image)  # warm-up
        spans.clear()
        for _ in range(repeats):
            start = time.perf_counter()
            model(image)
            totals.append(time.perf_counter() - start)
    for h in handles:
        h.remove()
    per_call = {n: statistics.median(t) * len(t) / repeats for n, t in spans.items()}  # calls per forward
    return per_call, statistics.median(totals)


def op_table(model: Segmentor, image: torch.Tensor, top: int) -> str:
    """The ``top`` operations of one forward by self CPU time, and the total in ``aten::copy_``."""
    with torch.inference_mode():
        model(image)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(image)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    copies = sum(e.self_cpu_time_total for e in events if e.key == "aten::copy_")
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    lines = ["| operation | input shapes | calls | self ms | share |", "|---|---|---|---|---|"]
    for e in rows:
        shapes = str(e.input_shapes)[:90]
        lines.append(f"| {e.key} | {shapes} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | "
                     f"{e.self_cpu_time_total / total:.0%} |")
    lines.append(f"\naten::copy_ in all: {copies / 1e3:.1f} ms of {total / 1e3:.1f} ms ({copies / total:.0%})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {machine()}; image {args.size}^2, batch 1, 150 classes")
    image = torch.randn(1, 3, args.size, args.size)
    for key in args.models:
        encoder, decoder = MODELS[key]
        torch.manual_seed(0)
        model = Segmentor(encoder, decoder=decoder, num_classes=150, aux_head=False).eval()
        stages, total = stage_times(model, image, args.repeats)
        print(f"\n## {key}: {encoder} + {decoder}, forward {total * 1e3:.0f} ms\n")
        print("| stage | ms | share |\n|---|---|---|")
        for name, seconds in stages.items():
            print(f"| {name} | {seconds * 1e3:.1f} | {seconds / total:.0%} |")
        rest = total - sum(stages.values())
        print(f"| rest (logit resize, glue) | {rest * 1e3:.1f} | {rest / total:.0%} |\n")
        print(op_table(model, image, args.top), flush=True)


if __name__ == "__main__":
    main()
