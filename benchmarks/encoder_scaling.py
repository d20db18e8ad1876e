"""Time and peak memory against resolution: FLatten vs softmax encoders, whole segmentors and training steps.

    python benchmarks/encoder_scaling.py --family pvt                      # encoders at 512 / 1024 / 2048
    python benchmarks/encoder_scaling.py --family pvt --mode segmentor --plot docs/benchmarks/pvt_segmentor.png
    python benchmarks/encoder_scaling.py --family swin --mode train        # one training step, batch 2, 512

Modes:

- ``encoder``: features only, batch 1, inference.
- ``segmentor``: encoder + the paper's decode head (Semantic FPN for PVT, UperNet for Swin), whole image,
  batch 1, inference, logits at full resolution (150 classes).
- ``train``: the segmentor with its auxiliary head; forward, cross-entropy (aux weight 0.4), backward and an
  AdamW step, batch 2 (``--sizes`` defaults to 512 here).

Time is the median of ``--repeats`` runs after a warm-up; peak memory comes from a separate run (CUDA allocator
peak, or on CPU the resident high-water mark of a separate process, see ``_measure.py``). Ratios compare with
the first model of the family, measured side by side in the same process.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import configure_allocator, machine, measure_cases, median_time, peak_memory_mb  # noqa: E402

import seg  # noqa: E402,F401  (registers the encoders)
from seg.kernels.onednn import set_onednn_linear  # noqa: E402
from seg.model.layers import SpatialReductionAttention  # noqa: E402
from seg.model.segmentor import Segmentor  # noqa: E402

NUM_CLASSES = 150


@dataclass(frozen=True)
class Model:
    """One model of a family: a timm encoder name and its keyword arguments."""

    label: str
    encoder: str
    kwargs: dict = field(default_factory=dict)
    explicit_softmax: bool = False  # softmax through the materialised N x n matrix, as the published PVT code
    modes: tuple[str, ...] = ("encoder", "segmentor", "train")


FAMILIES: dict[str, tuple[str, list[Model]]] = {  # family -> (decoder of the paper's recipe, models)
    "pvt": ("semantic_fpn", [
        Model("FLatten-PVT-T", "flatten_pvt_tiny"),
        Model("PVT-T (softmax, SDPA)", "flatten_pvt_tiny", {"attn_type": "SSSS"}),
        Model("PVT-T (softmax, explicit matrix as published)", "flatten_pvt_tiny", {"attn_type": "SSSS"},
              explicit_softmax=True, modes=("encoder", "segmentor")),
        Model("timm pvt_v2_b0 (softmax)", "pvt_v2_b0", modes=("encoder",)),
    ]),
    "swin": ("upernet", [
        Model("FLatten-Swin-T", "flatten_swin_tiny"),
        Model("Swin-T (softmax windows)", "flatten_swin_tiny", {"attn_type": "SSSS"}),
        Model("timm swin_tiny (softmax windows)", "swin_tiny_patch4_window7_224", {"strict_img_size": False},
              modes=("encoder",)),
    ]),
}


def build(model: Model, mode: str, decoder: str, size: int, device: torch.device) -> torch.nn.Module:
    """The encoder (features only) or the whole segmentor, fp32, on ``device``."""
    kwargs = dict(model.kwargs, img_size=size) if model.encoder.startswith("swin_") else model.kwargs
    if mode == "encoder":
        net = timm.create_model(model.encoder, features_only=True, **kwargs)
    else:
        net = Segmentor(model.encoder, decoder, NUM_CLASSES, aux_head=mode == "train", encoder_kwargs=kwargs)
    for module in net.modules():
        if isinstance(module, SpatialReductionAttention):
            module.fused = not model.explicit_softmax
    return net.to(device)


def step_fn(net: torch.nn.Module, mode: str, size: int, batch: int, dtype: torch.dtype,
            device: torch.device) -> Callable[[], None]:
    """One measured call: an inference pass, or a full training step."""
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    x = torch.randn(batch, 3, size, size, device=device)
    if mode != "train":
        net.eval()

        def infer() -> None:
            with torch.inference_mode(), amp:
                net(x)

        return infer
    net.train()
    target = torch.randint(0, NUM_CLASSES, (batch, size, size), device=device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01)

    def train_step() -> None:
        with amp:
            out = net(x)
            loss = F.cross_entropy(out["out"].float(), target) + 0.4 * F.cross_entropy(out["aux"].float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train_step


def plot(path: Path, title: str, sizes: list[int], times: dict[str, list[float]], peaks: dict[str, list[float]],
         footer: str) -> None:
    """Time and peak memory against input side, one line per model, log-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, values, ylabel in ((axes[0], times, "time (s)"), (axes[1], peaks, "peak memory (MiB)")):
        for label, ys in values.items():
            xs = sizes[: len(ys)]
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [f"{s}^2" for s in sizes])
        ax.set_xlabel("input (pixels)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.005, footer, ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="pvt")
    parser.add_argument("--mode", choices=["encoder", "segmentor", "train"], default="encoder")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="input sides (default: 512 1024 2048; 512 for --mode train)")
    parser.add_argument("--batch", type=int, default=None, help="default: 1, or 2 for --mode train")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="half precision runs under autocast")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=None, help="labels to run (default: all of the family)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--linear", choices=["onednn", "torch"], default="onednn",
                        help="CPU inference linears: oneDNN (the project's default) or F.linear (MKL)")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of time and memory against size")
    args = parser.parse_args(argv)
    configure_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    set_onednn_linear(args.linear == "onednn")
    sizes = args.sizes or ([512] if args.mode == "train" else [512, 1024, 2048])
    batch = args.batch or (2 if args.mode == "train" else 1)
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    decoder, family = FAMILIES[args.family]
    models = [m for m in family if args.mode in m.modes and (args.models is None or m.label in args.models)]
    cases = [(m, s) for s in sizes for m in models]

    def run_case(model: Model, size: int, memory: bool) -> float:
        torch.manual_seed(0)
        net = build(model, args.mode, decoder, size, device)
        fn = step_fn(net, args.mode, size, batch, dtype, device)
        if memory:
            fn()  # warm-up: optimizer state, cached positional encodings
            return peak_memory_mb(fn)
        return median_time(fn, args.repeats)

    results = measure_cases(cases, lambda m, s: f"{m.label}|{s}", run_case, device)
    if results is None:
        return
    times, peaks = results
    what = {"encoder": "encoders, features only", "segmentor": f"encoder + {decoder} head, whole image",
            "train": f"training step (fwd + bwd + AdamW), {decoder} + aux head"}[args.mode]
    linears = "" if args.mode == "train" else f", linears: {args.linear}"
    header = f"{args.family} {what}, batch {batch}, {args.dtype}{linears}, median of {args.repeats}; {machine()}"
    print(f"# {header}")
    unit = "time per step (s)" if args.mode == "train" else "time (s)"
    print(f"| model | input | {unit} | time ratio | peak memory (MiB) | memory ratio |")
    print("|---|---|---|---|---|---|")
    series_t: dict[str, list[float]] = {}
    series_m: dict[str, list[float]] = {}
    for size in sizes:
        base = f"{models[0].label}|{size}"
        for model in models:
            key = f"{model.label}|{size}"
            seconds, mem = times[key], max(peaks[key], 0.0)
            series_t.setdefault(model.label, []).append(seconds)
            series_m.setdefault(model.label, []).append(mem)
            print(f"| {model.label} | {size}x{size} | {seconds:.3f} | {seconds / times[base]:.2f} | {mem:.0f} "
                  f"| {mem / max(peaks[base], 1e-9):.2f} |")
    if len(sizes) > 1:
        pixels = (sizes[-1] / sizes[0]) ** 2
        print(f"\nPeak memory growth from {sizes[0]}^2 to {sizes[-1]}^2 ({pixels:.0f}x the pixels):")
        for label, mems in series_m.items():
            print(f"- {label}: {mems[-1] / mems[0]:.1f}x")
    print(f"\nSpeed-up of {models[0].label} (other model's time / its time, same run):")
    for model in models[1:]:
        ratios = ", ".join(f"{s}^2 {times[f'{model.label}|{s}'] / times[f'{models[0].label}|{s}']:.2f}x"
                           for s in sizes)
        print(f"- vs {model.label}: {ratios}")
    if args.plot is not None:
        plot(args.plot, f"{args.family}: {what}, batch {batch}, {args.dtype}", sizes, series_t, series_m, machine())


if __name__ == "__main__":
    main()
