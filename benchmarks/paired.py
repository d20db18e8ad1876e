"""The two FLatten-PVT-T ratios of the CPU targets, each pair of models timed alternately in one process.

    python benchmarks/paired.py                       # both pairs, 8 rounds of 3 repeats
    python benchmarks/paired.py --pairs train --rounds 12

``train``: forward + backward of the FLatten-PVT-T encoder at 512^2 (features only, batch 1), ours against
its published-formulation twin (``benchmarks/published_flatten.py``: the same parameters and linear layers,
the attention written as the published code computes it). ``inference``: the FLatten-PVT-T encoder against
softmax PVT-T (SDPA) at 512^2 without autograd. Each round times both models back to back (who goes first
alternates), so drift of a shared machine reaches both alike; the ratio reported is the median of the
per-round ratios, beside each model's median time.
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
from published_flatten import published_like  # noqa: E402

import seg  # noqa: E402,F401  (registers the encoders)
from seg.layers import FocusedLinearAttention  # noqa: E402

Step = Callable[[], None]


def _published_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose focused linear attention layers compute the published formulation."""
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in parent.named_children():
            if type(child) is FocusedLinearAttention:
                setattr(parent, name, published_like(child))
    return twin


def train_pair(size: int) -> tuple[tuple[str, Step], tuple[str, Step]]:
    """(published twin, ours): one forward + backward of the encoder each."""
    torch.manual_seed(0)
    ours = timm.create_model("flatten_pvt_tiny", features_only=True)
    published = _published_twin(ours)
    image = torch.randn(1, 3, size, size)

    def step(model: torch.nn.Module) -> Step:
        def run() -> None:
            sum(f.square().mean() for f in model(image)).backward()
            model.zero_grad(set_to_none=True)

        return run

    return ("published formulation", step(published)), ("ours", step(ours))


def inference_pair(size: int) -> tuple[tuple[str, Step], tuple[str, Step]]:
    """(FLatten-PVT-T, softmax PVT-T with SDPA): one encoder forward each, without autograd."""
    torch.manual_seed(0)
    image = torch.randn(1, 3, size, size)

    def step(attn_type: str) -> Step:
        model = timm.create_model("flatten_pvt_tiny", features_only=True, attn_type=attn_type).eval()

        def run() -> None:
            with torch.no_grad():
                model(image)

        return run

    return ("FLatten-PVT-T", step("LLLL")), ("PVT-T (softmax, SDPA)", step("SSSS"))


def _median_time(run: Step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(pair: tuple[tuple[str, Step], tuple[str, Step]], rounds: int, repeats: int) -> dict[str, list[float]]:
    """Per-round median seconds of both models, alternating which goes first."""
    (name_a, run_a), (name_b, run_b) = pair
    run_a(), run_b()  # warm-up: first-call allocations and probes
    times: dict[str, list[float]] = {name_a: [], name_b: []}
    for round_ in range(rounds):
        order = [(name_a, run_a), (name_b, run_b)][:: 1 if round_ % 2 == 0 else -1]
        for name, run in order:
            times[name].append(_median_time(run, repeats))
    return times


PAIRS = {
    "train": ("forward + backward, published / ours", train_pair),
    "inference": ("encoder inference, FLatten / softmax", inference_pair),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per model per round")
    args = parser.parse_args(argv)
    print(f"# FLatten-PVT-T at {args.size}^2, batch 1, float32; {args.rounds} alternating rounds of "
          f"{args.repeats} repeats per model, one process per pair; {machine()}")
    print("| pair | model A (ms) | model B (ms) | A / B, median of per-round ratios | range over rounds |")
    print("|---|---|---|---|---|")
    for key in args.pairs:
        title, build = PAIRS[key]
        pair = build(args.size)
        times = measure(pair, args.rounds, args.repeats)
        (name_a, _), (name_b, _) = pair
        ratios = [a / b for a, b in zip(times[name_a], times[name_b], strict=True)]
        print(f"| {title} | {name_a} {statistics.median(times[name_a]) * 1e3:.1f} | "
              f"{name_b} {statistics.median(times[name_b]) * 1e3:.1f} | **{statistics.median(ratios):.2f}x** | "
              f"{min(ratios):.2f}-{max(ratios):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
