"""One benchmark across attention families at the tiny size: encoder inference and a training step against
resolution, with peak memory, every case side by side in one run.

    python benchmarks/families.py                                   # 512 / 1024 / 2048, inference + training
    python benchmarks/families.py --sizes 512 1024 --modes encoder  # a quicker subset
    python benchmarks/families.py --plot docs/benchmarks/families.png

Models: FLatten-PVT-T and FLatten-Swin-T, SOFT-Tiny, Agent-PVT-T and Agent-Swin-T, MLLA-T, RAVLT-T, MALA-T,
PolaFormer-PVT-T and PolaFormer-Swin-T, and the softmax baselines PVT-T (SDPA) and Swin-T (7 x 7 windows).
``encoder``: features only, batch 1, inference.
``train``: the encoder with the Semantic FPN head and the auxiliary FCN head (the same decoders for every
family), forward, cross-entropy, backward and an AdamW step, batch 1. Every case runs in its own process
(``_measure.py``); a case that needs more memory than ``--memory-limit-gb`` is reported as out of memory
instead of stopping the run. Ratios are against FLatten-PVT-T at the same size and mode, from the same run.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import configure_allocator, in_child_phase, machine, measure_cases, median_time, peak_memory_mb  # noqa: E402
from encoder_scaling import Model, build, step_fn  # noqa: E402

import seg  # noqa: E402,F401  (registers the encoders)

MODELS = [
    Model("FLatten-PVT-T", "flatten_pvt_tiny"),
    Model("FLatten-Swin-T", "flatten_swin_tiny"),
    Model("SOFT-Tiny", "soft_tiny"),
    Model("Agent-PVT-T", "agent_pvt_tiny"),
    Model("Agent-Swin-T", "agent_swin_tiny"),
    Model("MLLA-T", "mlla_tiny"),
    Model("RAVLT-T", "ravlt_tiny"),
    Model("MALA-T", "mala_tiny"),
    Model("Pola-PVT-T", "pola_pvt_tiny"),
    Model("Pola-Swin-T", "pola_swin_tiny"),
    Model("PVT-T (softmax, SDPA)", "flatten_pvt_tiny", {"attn_type": "SSSS"}),
    Model("Swin-T (softmax windows)", "flatten_swin_tiny", {"attn_type": "SSSS"}),
]
DECODER = "semantic_fpn"


def _available(models: list[Model]) -> list[Model]:
    """The models whose encoder this installation registers."""
    names = set(timm.list_models())
    return [m for m in models if m.encoder in names]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--modes", nargs="+", choices=["encoder", "train"], default=["encoder", "train"])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (2048^2 cases: at most 2)")
    parser.add_argument("--models", nargs="+", default=None, help="labels to run (default: all)")
    parser.add_argument("--memory-limit-gb", type=float, default=20.0,
                        help="address-space limit of each measuring process (CPU): beyond it a case is OOM")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of time and memory against size per mode")
    args = parser.parse_args(argv)
    configure_allocator()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if in_child_phase() and device.type == "cpu":
        limit = int(args.memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    models = [m for m in _available(MODELS) if args.models is None or m.label in args.models]
    cases = [(mode, size, m) for mode in args.modes for size in args.sizes for m in models]

    def run_case(mode: str, size: int, model: Model, memory: bool) -> float:
        torch.manual_seed(0)
        try:
            net = build(model, mode, DECODER, size, device)
            fn = step_fn(net, mode, size, 1, torch.float32, device)
            if memory:
                fn()
                return peak_memory_mb(fn)
            return median_time(fn, min(args.repeats, 2) if size >= 2048 else args.repeats)
        except (RuntimeError, MemoryError) as err:
            if "memory" not in str(err).lower() and "allocate" not in str(err).lower():
                raise
            return math.nan

    results = measure_cases(cases, lambda mode, s, m: f"{mode}|{s}|{m.label}", run_case, device)
    if results is None:
        return
    times, peaks = results
    print(f"# tiny models, batch 1, float32, median of {args.repeats}; train = Semantic FPN + aux FCN heads + AdamW; "
          f"{machine()}")
    missing = [m.label for m in MODELS if m not in models and args.models is None]
    if missing:
        print(f"# not registered here: {', '.join(missing)}")
    for mode in args.modes:
        title = "encoder inference" if mode == "encoder" else "training step"
        print(f"\n## {title}\n")
        print("| model | input | time (s) | vs FLatten-PVT-T | peak memory (MiB) | vs FLatten-PVT-T |")
        print("|---|---|---|---|---|---|")
        for size in args.sizes:
            base = f"{mode}|{size}|{models[0].label}"
            for model in models:
                key = f"{mode}|{size}|{model.label}"
                t, mem = times[key], peaks[key]
                if isinstance(t, float) and math.isnan(t):
                    print(f"| {model.label} | {size}x{size} | out of memory (> {args.memory_limit_gb:g} GB) | | | |")
                    continue
                print(f"| {model.label} | {size}x{size} | {t:.3f} | {t / times[base]:.2f} | {max(mem, 0):.0f} | "
                      f"{max(mem, 0) / max(peaks[base], 1e-9):.2f} |")
    if args.plot is not None:
        from encoder_scaling import plot

        for mode in args.modes:
            series_t = {m.label: [times[f"{mode}|{s}|{m.label}"] for s in args.sizes] for m in models}
            series_m = {m.label: [max(peaks[f"{mode}|{s}|{m.label}"], 0.0) for s in args.sizes] for m in models}
            path = args.plot.with_name(f"{args.plot.stem}_{mode}{args.plot.suffix}")
            plot(path, f"attention families, {mode}, batch 1, float32", args.sizes, series_t, series_m, machine())


if __name__ == "__main__":
    main()
