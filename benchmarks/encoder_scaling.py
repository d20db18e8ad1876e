"""Encoder inference time and peak memory against resolution: FLatten vs the softmax baselines.

    python benchmarks/encoder_scaling.py                       # PVT family, 512 / 1024 / 2048
    python benchmarks/encoder_scaling.py --family swin --sizes 512 1024

Each model runs features-only at batch 1 under ``torch.inference_mode``. Time is the median of
``--repeats`` runs after a warm-up; peak memory is measured on a separate run (CUDA allocator peak, or the
process's resident high-water mark on CPU). Ratios compare against the first model of the family, measured
side by side in the same process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine, median_time, peak_memory_mb, track_cpu_memory  # noqa: E402

import seg  # noqa: E402,F401  (registers the encoders)

FAMILIES: dict[str, list[tuple[str, str, dict]]] = {
    "pvt": [
        ("FLatten-PVT-T", "flatten_pvt_tiny", {}),
        ("PVT-T (softmax, attn_type=SSSS)", "flatten_pvt_tiny", {"attn_type": "SSSS"}),
        ("timm pvt_v2_b0 (softmax)", "pvt_v2_b0", {}),
    ],
    "swin": [
        ("FLatten-Swin-T", "flatten_swin_tiny", {}),
        ("Swin-T (softmax, attn_type=SSSS)", "flatten_swin_tiny", {"attn_type": "SSSS"}),
        ("timm swin_tiny (softmax)", "swin_tiny_patch4_window7_224", {"strict_img_size": False}),
    ],
}


def build(name: str, kwargs: dict, size: int, device: torch.device) -> torch.nn.Module:
    if name.startswith("swin_"):
        kwargs = dict(kwargs, img_size=size)
    model = timm.create_model(name, features_only=True, **kwargs)
    return model.eval().to(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="pvt")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    track_cpu_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"# {args.family} encoders, batch 1, inference; {machine()}")
    print("| model | input | time (s) | time ratio | peak memory (MiB) | memory ratio |")
    print("|---|---|---|---|---|---|")
    memory: dict[str, list[float]] = {}
    for size in args.sizes:
        x = torch.randn(1, 3, size, size, device=device)
        base_time = base_mem = None
        for label, name, kwargs in FAMILIES[args.family]:
            model = build(name, kwargs, size, device)
            run = lambda: model(x)  # noqa: B023
            with torch.inference_mode():
                seconds = median_time(run, args.repeats)
                mem = peak_memory_mb(run)
            base_time = base_time or seconds
            base_mem = base_mem or mem
            memory.setdefault(label, []).append(mem)
            print(f"| {label} | {size}x{size} | {seconds:.3f} | {seconds / base_time:.2f} | {mem:.0f} "
                  f"| {mem / base_mem:.2f} |", flush=True)
    pixels = (args.sizes[-1] / args.sizes[0]) ** 2
    print(f"\nPeak memory growth from {args.sizes[0]}^2 to {args.sizes[-1]}^2 ({pixels:.0f}x the pixels):")
    for label, mems in memory.items():
        print(f"- {label}: {mems[-1] / mems[0]:.1f}x")

if __name__ == "__main__":
    main()
