"""Cityscapes sizes: whole-image inference at 1024 x 2048 and a training step at a 512 x 1024 crop, side by side.

    python benchmarks/cityscapes.py                                   # 5 rounds, table to stdout
    python benchmarks/cityscapes.py --rounds 7 --plot docs/benchmarks/cityscapes.png
    python benchmarks/cityscapes.py --modes inference --allocator tuned
    python benchmarks/cityscapes.py --scale 0.125 --rounds 1 --no-memory          # a smoke run at 128 x 256

Models (19 classes, float32, batch 1 for inference, batch 2 for training, random weights):

- ``pvt``: FLatten-PVT-T + Semantic FPN, PVT-T (softmax) + Semantic FPN, smp's SegFormer-B0
  (``smp.Segformer("mit_b0")``); ratios against FLatten-PVT-T + Semantic FPN.
- ``swin``: FLatten-Swin-T + UperNet, Swin-T (window softmax) + UperNet; ratios against FLatten-Swin-T + UperNet.

``--modes floor`` shows how low the FLatten-PVT-T + Semantic FPN ratios can go without touching the head: beside
the three ``pvt`` models it times the same segmentor with its attention reduced to the matrix products and DWC
alone (``benchmarks/products_only.py``: not attention, a bound for any element-wise fusion), and the Semantic FPN
head with its upsampling to the full frame alone, on precomputed features (the time left if the encoder were free).

Inference is what a user runs: ``model.eval()``, ``torch.inference_mode()``, logits at the full 1024 x 2048;
our segmentors through ``seg.model.inference.whole_inference``. A training step is forward, cross-entropy (plus 0.4 x
the auxiliary head's for UperNet, as the recipe), backward and an AdamW step. All models of a family live in one
process and are timed round by round, who goes first rotating, so drift of a shared machine reaches all alike;
a time is the median over rounds of per-round medians, a ratio the median of the per-round ratios. Peak memory
comes from one more run of this script (see ``_measure.py``): the resident high-water mark above the size
before the call on CPU, the allocator's peak on CUDA. ``--allocator default`` (the default) leaves glibc as a
user has it; ``tuned`` serves every block from the heap, as BENCHMARKS.md explains.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import (  # noqa: E402
    configure_allocator,
    is_memory_phase,
    machine,
    memory_from_child,
    peak_memory_mb,
    report_child,
)
from products_only import products_only  # noqa: E402

import seg  # noqa: E402,F401  (registers the encoders)
from seg.data.spec import CITYSCAPES  # noqa: E402
from seg.model.inference import whole_inference  # noqa: E402
from seg.model.segmentor import Segmentor  # noqa: E402

NUM_CLASSES = CITYSCAPES.num_classes
FRAME_HW = (CITYSCAPES.test_scale[1], CITYSCAPES.test_scale[0])  # (1024, 2048): the whole frame
RECIPE_CROP_HW = (512, 1024)  # the recipes' training crop
TRAIN_BATCH = 2  # per device, as the configs

Builder = Callable[[bool], torch.nn.Module]  # aux head wanted -> model
FAMILIES: dict[str, list[tuple[str, Builder]]] = {
    "pvt": [
        ("FLatten-PVT-T + Semantic FPN", lambda aux: Segmentor("flatten_pvt_tiny", "semantic_fpn", NUM_CLASSES,
                                                               aux_head=False)),
        ("PVT-T (softmax) + Semantic FPN", lambda aux: Segmentor("flatten_pvt_tiny", "semantic_fpn", NUM_CLASSES,
                                                                 aux_head=False,
                                                                 encoder_kwargs={"attn_type": "SSSS"})),
        ("SegFormer-B0 (smp)", lambda aux: smp.Segformer("mit_b0", encoder_weights=None, classes=NUM_CLASSES)),
    ],
    "swin": [
        ("FLatten-Swin-T + UperNet", lambda aux: Segmentor("flatten_swin_tiny", "upernet", NUM_CLASSES, aux_head=aux)),
        ("Swin-T (softmax windows) + UperNet", lambda aux: Segmentor("flatten_swin_tiny", "upernet", NUM_CLASSES,
                                                                     aux_head=aux,
                                                                     encoder_kwargs={"attn_type": "SSSS"})),
    ],
}
Step = Callable[[], None]


def _logits(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our segmentors return {'out', 'aux'}; smp's a tensor."""
    out = model(x)
    return out if isinstance(out, dict) else {"out": out}


def inference_step(build: Builder, device: torch.device, hw: tuple[int, int]) -> Step:
    """Whole-image inference on one normalised frame of size ``hw``."""
    model = build(False).to(device).eval()
    x = torch.randn(1, 3, *hw, device=device)

    def run() -> None:
        with torch.inference_mode():
            logits = whole_inference(lambda t: _logits(model, t)["out"], x)
            assert logits.shape == (1, NUM_CLASSES, *hw)

    return run


def train_step(build: Builder, device: torch.device, hw: tuple[int, int]) -> Step:
    """Forward, loss, backward and AdamW on a batch of crops of size ``hw``."""
    torch.manual_seed(0)
    model = build(True).to(device).train()
    x = torch.randn(TRAIN_BATCH, 3, *hw, device=device)
    target = torch.randint(0, NUM_CLASSES, (TRAIN_BATCH, *hw), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def run() -> None:
        out = _logits(model, x)
        loss = F.cross_entropy(out["out"], target)
        if "aux" in out:
            loss = loss + 0.4 * F.cross_entropy(out["aux"], target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


MODES: dict[str, Callable[[Builder, torch.device, tuple[int, int]], Step]] = {
    "inference": inference_step, "train": train_step}


FLATTEN_FPN, PVT_FPN, SEGFORMER = (name for name, _ in FAMILIES["pvt"])
PRODUCTS_FPN = "FLatten-PVT-T, attention as products + DWC only, + Semantic FPN"
HEAD_ONLY = "Semantic FPN head + upsampling alone (encoder free)"


def floor_steps(device: torch.device, hw: tuple[int, int]) -> list[tuple[str, Step]]:
    """The ``pvt`` models' inference beside the products-only segmentor and the head alone."""
    steps = [(name, inference_step(build, device, hw)) for name, build in FAMILIES["pvt"]]
    flatten = FAMILIES["pvt"][0][1]
    steps.insert(1, (PRODUCTS_FPN, inference_step(lambda aux: products_only(flatten(aux)), device, hw)))
    model = flatten(False).to(device).eval()
    x = torch.randn(1, 3, *hw, device=device)
    with torch.inference_mode():
        features = model.encoder(x)

    def head() -> None:
        with torch.inference_mode():
            whole_inference(lambda _: model.decode_head(features), x)

    steps.insert(2, (HEAD_ONLY, head))
    return steps


def sizes(scale: float) -> dict[str, tuple[int, int]]:
    """(H, W) per mode: the frame for inference, the recipe's crop for training, times ``scale`` (multiples of
    32)."""
    frame = (max(32, round(FRAME_HW[0] * scale / 32) * 32), max(32, round(FRAME_HW[1] * scale / 32) * 32))
    crop = (max(32, round(RECIPE_CROP_HW[0] * scale / 32) * 32), max(32, round(RECIPE_CROP_HW[1] * scale / 32) * 32))
    return {"inference": frame, "floor": frame, "train": crop}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rotate(steps: list[tuple[str, Step]], rounds: int, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Per-round median seconds of every step, the first of a round rotating; one warm-up call each first."""
    for _, run in steps:
        run()
    times: dict[str, list[float]] = {name: [] for name, _ in steps}
    for r in range(rounds):
        shift = r % len(steps)
        for name, run in steps[shift:] + steps[:shift]:
            samples = []
            for _ in range(repeats):
                _sync(device)
                start = time.perf_counter()
                run()
                _sync(device)
                samples.append(time.perf_counter() - start)
            times[name].append(statistics.median(samples))
    return times


def peaks(groups: list[str], modes: list[str], device: torch.device, scale: float) -> dict[str, float]:
    """Peak memory (MiB) of one call of every model and mode, one model alive at a time."""
    found: dict[str, float] = {}
    for mode in modes:
        for family in groups:
            for name, build in FAMILIES[family]:
                run = MODES[mode](build, device, sizes(scale)[mode])
                run()  # first-call allocations are not the model's working set
                found[f"{mode}|{name}"] = peak_memory_mb(run)
                del run
    return found


def table(mode: str, family: str, times: dict[str, list[float]], memory: dict[str, object]) -> list[str]:
    """Markdown rows of one family: median time, ratio to the family's first model, range, peak memory."""
    names = list(times)
    ref = names[0]
    rows = []
    for name in names:
        ratios = [a / b for a, b in zip(times[ref], times[name], strict=True)]  # ours / this model, per round
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if name != ref else "-"
        ratio = f"**{statistics.median(ratios):.2f}x**" if name != ref else "1.00"
        peak = memory.get(f"{mode}|{name}")
        peak_text = f"{peak:.0f}" if isinstance(peak, float) else "-"
        rows.append(f"| {mode} | {name} | {statistics.median(times[name]):.3f} | {ratio} | {spread} | {peak_text} |")
    return rows


def floor_rows(times: dict[str, list[float]]) -> list[str]:
    """Markdown rows of the floor group: each time against PVT-T + Semantic FPN and SegFormer-B0."""
    rows = []
    for name, own in times.items():
        cells = [f"{statistics.median(own):.3f}"]
        for ref in (PVT_FPN, SEGFORMER):
            ratios = [a / b for a, b in zip(own, times[ref], strict=True)]
            cells.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def plot(path: Path, results: dict[str, dict[str, list[float]]], memory: dict[str, object], title: str,
         hw: dict[str, tuple[int, int]], names: list[str]) -> None:
    """Bar charts of the models ``names``: median time for each mode, and inference peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results)
    fig, axes = plt.subplots(1, len(modes) + 1, figsize=(5.2 * (len(modes) + 1), 4.2))
    colours = ["tab:blue" if n.startswith("FLatten") else "tab:gray" for n in names]
    for ax, mode in zip(axes, modes, strict=False):
        medians = [statistics.median(results[mode][n]) for n in names]
        ax.barh(names, medians, color=colours)
        for y, value in enumerate(medians):
            ax.text(value, y, f" {value:.2f}", va="center", fontsize=8)
        ax.margins(x=0.15)
        ax.set_xlabel("seconds (median)")
        what = "whole image" if mode == "inference" else f"crop, batch {TRAIN_BATCH}"
        ax.set_title(f"{mode}: {hw[mode][0]}x{hw[mode][1]} {what}")
        ax.invert_yaxis()
    mem = [m if isinstance(m := memory.get(f"inference|{n}"), float) else 0.0 for n in names]
    axes[-1].barh(names, mem, color=colours)
    for y, value in enumerate(mem):
        axes[-1].text(value, y, f" {value:.0f}", va="center", fontsize=8)
    axes[-1].margins(x=0.15)
    axes[-1].set_xlabel("peak memory, inference (MiB)")
    axes[-1].invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--modes", nargs="+", choices=[*MODES, "floor"], default=[*MODES, "floor"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per model per round")
    parser.add_argument("--allocator", choices=["default", "tuned"], default="default")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory run")
    parser.add_argument("--plot", type=Path, help="write a PNG of the results here")
    parser.add_argument("--scale", type=float, default=1.0, help="sizes x this (smoke runs: 0.125)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.allocator == "tuned" or is_memory_phase():
        configure_allocator()
    if is_memory_phase():
        report_child(peaks(args.families, [m for m in args.modes if m in MODES], device, args.scale))
        return
    hw = sizes(args.scale)
    header = (f"# inference 1x3x{hw['inference'][0]}x{hw['inference'][1]} whole image, training {TRAIN_BATCH}x3x"
              f"{hw['train'][0]}x{hw['train'][1]}; {NUM_CLASSES} classes, float32; {args.rounds} rotating rounds of "
              f"{args.repeats}; allocator {args.allocator}; {machine()}")
    print(header, flush=True)
    results: dict[str, dict[str, list[float]]] = {}
    floor: dict[str, list[float]] = {}
    for mode in [m for m in args.modes if m in MODES]:
        for family in args.families:
            if mode == "inference" and family == "pvt" and "floor" in args.modes:
                continue  # timed inside the floor group, in the same rounds
            steps = [(name, MODES[mode](build, device, hw[mode])) for name, build in FAMILIES[family]]
            results.setdefault(mode, {}).update(rotate(steps, args.rounds, args.repeats, device))
            del steps
    if "floor" in args.modes:
        floor = rotate(floor_steps(device, hw["floor"]), args.rounds, args.repeats, device)
        if "inference" in args.modes and "pvt" in args.families:
            results.setdefault("inference", {}).update({name: floor[name] for name, _ in FAMILIES["pvt"]})
    memory = {} if args.no_memory or not results else memory_from_child()
    if results:
        columns = ["mode", "model", "time (s)", "ours / this model (median of rounds)", "range over rounds",
                   "peak memory (MiB)"]
        print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for mode, times in results.items():
        for family in args.families:
            names = [name for name, _ in FAMILIES[family]]
            print("\n".join(table(mode, family, {n: times[n] for n in names}, memory)))
    if floor:
        print(f"\nFloor of the FLatten-PVT-T + Semantic FPN ratios at {hw['floor'][0]}x{hw['floor'][1]} (same rounds):")
        print("| model | time (s) | / PVT-T + Semantic FPN (range) | / SegFormer-B0 (range) |")
        print("|---|---|---|---|")
        print("\n".join(floor_rows(floor)))
    if args.plot and results:
        names = [name for family in args.families for name, _ in FAMILIES[family]]
        plot(args.plot, results, memory, header.lstrip("# "), hw, names)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
