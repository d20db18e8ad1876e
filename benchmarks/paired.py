"""The two FLatten-PVT-T ratios of the CPU targets and their bounds, the models of a group timed in turn in one process.

    python benchmarks/paired.py                       # both groups, 8 rounds of 3 repeats
    python benchmarks/paired.py --groups train --rounds 12

``train``: forward + backward of the FLatten-PVT-T encoder at 512^2 (features only, batch 1), ours against
its published-formulation twin (``benchmarks/published_flatten.py``: the same parameters and linear layers,
the attention written as the published code computes it), and the twin against a bound: the same encoder with
its attention reduced to the matrix products and DWC alone (``benchmarks/products_only.py``, under autograd),
the highest ratio any work on the element-wise steps (kernel, norms, power, normaliser, positional encoding
and their backward) could reach with these products. ``inference``: the FLatten-PVT-T encoder against
softmax PVT-T (SDPA) at 512^2 without autograd, beside the same bound: how low the inference ratio can go on
this machine whatever the element-wise steps cost. Each round times every model of a group back to back (who
goes first rotates), so drift of a shared machine reaches all alike; a ratio is the median of the per-round
ratios of a pair, beside each model's median time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine  # noqa: E402
from products_only import products_only  # noqa: E402
from published_flatten import published_like, replace_attention  # noqa: E402

import seg  # noqa: E402,F401  (registers the encoders)

Step = Callable[[], None]
Group = list[tuple[str, Step]]  # the models timed together
Pairs = list[tuple[str, str]]  # (A, B): the ratios A / B a group reports

PUBLISHED, OURS = "published formulation", "ours"
FLATTEN, SOFTMAX = "FLatten-PVT-T", "PVT-T (softmax, SDPA)"
BOUND = "FLatten-PVT-T, products + DWC only"


def _published_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose focused linear attention layers compute the published formulation."""
    return replace_attention(copy.deepcopy(model), published_like)


def train_group(size: int) -> tuple[Group, Pairs]:
    """[published twin, products-only bound, ours]: one forward + backward of the encoder each."""
    torch.manual_seed(0)
    ours = timm.create_model("flatten_pvt_tiny", features_only=True)
    published = _published_twin(ours)
    bound = products_only(copy.deepcopy(ours))
    image = torch.randn(1, 3, size, size)

    def step(model: torch.nn.Module) -> Step:
        def run() -> None:
            sum(f.square().mean() for f in model(image)).backward()
            model.zero_grad(set_to_none=True)

        return run

    group = [(PUBLISHED, step(published)), (BOUND, step(bound)), (OURS, step(ours))]
    return group, [(PUBLISHED, OURS), (PUBLISHED, BOUND)]


def inference_group(size: int) -> tuple[Group, Pairs]:
    """[FLatten-PVT-T, its products-only bound, softmax PVT-T with SDPA]: one encoder forward each."""
    torch.manual_seed(0)
    image = torch.randn(1, 3, size, size)

    def step(model: torch.nn.Module) -> Step:
        model.eval()

        def run() -> None:
            with torch.no_grad():
                model(image)

        return run

    encoder = lambda attn_type: timm.create_model("flatten_pvt_tiny", features_only=True, attn_type=attn_type)  # noqa: E731
    group = [
        (FLATTEN, step(encoder("LLLL"))),
        (BOUND, step(products_only(encoder("LLLL")))),
        (SOFTMAX, step(encoder("SSSS"))),
    ]
    return group, [(FLATTEN, SOFTMAX), (BOUND, SOFTMAX)]


def _median_time(run: Step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(group: Group, rounds: int, repeats: int) -> dict[str, list[float]]:
    """Per-round median seconds of every model of ``group``, rotating which goes first."""
    for _, run in group:
        run()  # warm-up: first-call allocations and probes
    times: dict[str, list[float]] = {name: [] for name, _ in group}
    for round_ in range(rounds):
        shift = round_ % len(group)
        for name, run in group[shift:] + group[:shift]:
            times[name].append(_median_time(run, repeats))
    return times


GROUPS = {
    "train": ("forward + backward", train_group),
    "inference": ("encoder inference", inference_group),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per model per round")
    args = parser.parse_args(argv)
    print(f"# FLatten-PVT-T at {args.size}^2, batch 1, float32; {args.rounds} rounds of {args.repeats} repeats "
          f"per model, models of a group rotating in one process; {machine()}")
    print("| group | model A (ms) | model B (ms) | A / B, median of per-round ratios | range over rounds |")
    print("|---|---|---|---|---|")
    for key in args.groups:
        title, build = GROUPS[key]
        group, pairs = build(args.size)
        times = measure(group, args.rounds, args.repeats)
        for name_a, name_b in pairs:
            ratios = [a / b for a, b in zip(times[name_a], times[name_b], strict=True)]
            print(f"| {title} | {name_a} {statistics.median(times[name_a]) * 1e3:.1f} | "
                  f"{name_b} {statistics.median(times[name_b]) * 1e3:.1f} | **{statistics.median(ratios):.2f}x** | "
                  f"{min(ratios):.2f}-{max(ratios):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
