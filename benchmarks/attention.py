"""Attention layers alone: time and peak memory against token count, SOFT vs focused linear vs softmax.

    python benchmarks/attention.py                              # N = 56^2, 128^2, 256^2; C = 64; heads 1, 2
    python benchmarks/attention.py --sizes 16 24 --repeats 1    # smoke test

Every entry of ``ENTRIES`` is a module called as ``attn(x, (H, W))`` on x of shape (1, H*W, C). Time is the
median of ``--repeats`` runs after a warm-up, for the forward pass under ``torch.inference_mode`` and for
forward + backward (of the mean square of the output, gradients for the input and all parameters). Peak memory
is measured on a separate run: CUDA allocator peak above the memory held before, or the process's resident
high-water mark on CPU. Quadratic entries (softmax) are skipped above ``--max-quadratic-tokens`` and an
out-of-memory error is reported as such instead of ending the run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine, median_time, peak_memory_mb, track_cpu_memory  # noqa: E402
from published_flatten import published_like  # noqa: E402

from seg.layers import FocusedLinearAttention, SpatialReductionAttention  # noqa: E402
from seg.layers.soft import SoftAttention  # noqa: E402


@dataclass(frozen=True)
class Entry:
    """One attention to measure: ``build(dim, heads)`` returns a module called as ``attn(x, (H, W))``."""

    build: Callable[[int, int], nn.Module]
    quadratic: bool = False  # cost grows with N^2: skipped above --max-quadratic-tokens


SOFT_SR = 8  # SOFT's stage-1 bottleneck reduction: m = N / 64 landmarks

OURS, PUBLISHED = "focused linear (FLatten, ours)", "focused linear (published formulation)"

# label -> entry
ENTRIES: dict[str, Entry] = {
    OURS: Entry(lambda c, h: FocusedLinearAttention(c, h, grid_size=(56, 56))),
    PUBLISHED: Entry(lambda c, h: published_like(FocusedLinearAttention(c, h, grid_size=(56, 56)))),
    f"SOFT (sr {SOFT_SR})": Entry(lambda c, h: SoftAttention(c, h, sr_ratio=SOFT_SR)),
    f"SOFT-Norm (sr {SOFT_SR})": Entry(lambda c, h: SoftAttention(c, h, sr_ratio=SOFT_SR, normalize=True)),
    "softmax (SDPA, sr 1)": Entry(lambda c, h: SpatialReductionAttention(c, h, sr_ratio=1), quadratic=True),
}


def check_published_equal(side: int, dim: int, heads: int, device: torch.device) -> float:
    """Relative difference of ours and the published formulation on the same parameters (fp32), checked
    before any timing; raises when above 1e-5."""
    torch.manual_seed(0)
    ours = FocusedLinearAttention(dim, heads, grid_size=(56, 56))
    with torch.no_grad():  # exercise the learned temperature and positional encoding too
        ours.scale.normal_(0, 0.5)
        ours.positional_encoding.normal_(0, 0.5)
    ours = ours.to(device).eval()
    twin = published_like(ours)
    x = torch.randn(1, side * side, dim, device=device)
    with torch.inference_mode():
        a, b = ours(x, (side, side)), twin(x, (side, side))
    rel = ((a - b).norm() / b.norm()).item()
    if rel > 1e-5:
        raise AssertionError(f"ours and the published formulation differ: relative {rel:.2e} at {side}^2")
    return rel


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def measure(module: nn.Module, side: int, dim: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Forward / forward+backward median time (s) and peak memory (MiB) on a side x side grid."""
    size = (side, side)
    x = torch.randn(1, side * side, dim, device=device)

    def forward() -> None:
        with torch.inference_mode():
            module(x, size)

    def forward_backward() -> None:
        xg = x.detach().requires_grad_()
        module(xg, size).square().mean().backward()
        module.zero_grad(set_to_none=True)

    results = {}
    for key, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
        results[f"{key} time"] = median_time(fn, repeats)
        results[f"{key} peak"] = peak_memory_mb(fn)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[56, 128, 256], help="grid sides (N = side^2)")
    parser.add_argument("--dim", type=int, default=64, help="channels C")
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--max-quadratic-tokens", type=int, default=0,
                        help="largest N for softmax entries (0: 256^2 on GPU, 128^2 on CPU)")
    parser.add_argument("--only", nargs="+", default=None, help="labels of ENTRIES to run (default: all)")
    args = parser.parse_args(argv)
    track_cpu_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    max_quadratic = args.max_quadratic_tokens or (256**2 if device.type == "cuda" else 128**2)
    entries = {k: v for k, v in ENTRIES.items() if args.only is None or k in args.only}
    if OURS in entries and PUBLISHED in entries:
        for side in args.sizes:
            for heads in args.heads:
                rel = check_published_equal(side, args.dim, heads, device)
                print(f"# ours == published formulation at {side}^2, {heads} heads: relative difference {rel:.1e}")
    print(f"# attention layers, batch 1, C = {args.dim}, float32, median of {args.repeats}; {machine()}")
    print("| attention | tokens | heads | fwd (ms) | fwd peak (MiB) | fwd+bwd (ms) | fwd+bwd peak (MiB) |")
    print("|---|---|---|---|---|---|---|")
    times: dict[tuple[str, int, int], dict[str, float]] = {}
    for side in args.sizes:
        for heads in args.heads:
            for label, entry in entries.items():
                row = f"| {label} | {side}^2 = {side * side} | {heads} |"
                if entry.quadratic and side * side > max_quadratic:
                    print(f"{row} skipped: quadratic, N > {max_quadratic} (--max-quadratic-tokens) | | | |")
                    continue
                torch.manual_seed(0)
                module = entry.build(args.dim, heads).to(device).eval()
                try:
                    r = measure(module, side, args.dim, args.repeats, device)
                except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
                    if not _is_oom(error):
                        raise
                    print(f"{row} out of memory | | | |")
                    continue
                finally:
                    del module
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                times[label, side, heads] = r
                print(f"{row} {r['fwd time'] * 1e3:.1f} | {r['fwd peak']:.0f} | {r['fwd+bwd time'] * 1e3:.1f} | "
                      f"{r['fwd+bwd peak']:.0f} |", flush=True)
    pairs = [(k[1], k[2]) for k in times if k[0] == OURS and (PUBLISHED, k[1], k[2]) in times]
    if pairs:
        print("\nSpeed-up of ours over the published formulation (published time / ours):")
        for side, heads in pairs:
            ours, pub = times[OURS, side, heads], times[PUBLISHED, side, heads]
            print(f"- {side}^2 tokens, {heads} heads: forward {pub['fwd time'] / ours['fwd time']:.2f}x, "
                  f"forward+backward {pub['fwd+bwd time'] / ours['fwd+bwd time']:.2f}x")


if __name__ == "__main__":
    main()
