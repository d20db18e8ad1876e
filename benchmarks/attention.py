"""Attention layers alone: time and peak memory against token count, SOFT vs focused linear vs softmax.

    python benchmarks/attention.py                          # N = 56^2, 128^2, 256^2; C = 64; d = 64, 32; fp32, bf16
    python benchmarks/attention.py --sizes 16 24 --repeats 1 --dtypes float32   # smoke test

Every entry of ``ENTRIES`` is a module called as ``attn(x, (H, W))`` on x of shape (1, H*W, C). Time is the
median of ``--repeats`` runs after a warm-up, for the forward pass under ``torch.inference_mode`` and for
forward + backward (of the mean square of the output, gradients for the input and all parameters); bfloat16 /
float16 run under autocast. Peak memory is measured on a separate run: CUDA allocator peak above the memory held
before, or on CPU the resident high-water mark of a separate process (see ``_measure.py``). Quadratic entries
(softmax) are skipped above ``--max-quadratic-tokens``; an out-of-memory error is reported, not fatal.
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
from _measure import (  # noqa: E402
    configure_allocator,
    in_child_phase,
    machine,
    measure_cases,
    median_time,
    peak_memory_mb,
)
from published_flatten import published_like  # noqa: E402

from seg.kernels import set_backend  # noqa: E402
from seg.model.layers import FocusedLinearAttention, SpatialReductionAttention  # noqa: E402
from seg.model.layers.soft import SoftAttention  # noqa: E402


@dataclass(frozen=True)
class Entry:
    """One attention to measure: ``build(dim, heads)`` returns a module called as ``attn(x, (H, W))``."""

    build: Callable[[int, int], nn.Module]
    quadratic: bool = False  # cost grows with N^2: skipped above --max-quadratic-tokens


SOFT_SR = 8  # SOFT's stage-1 bottleneck reduction: m = N / 64 landmarks

OURS, PUBLISHED = "focused linear (FLatten, ours)", "focused linear (published formulation)"
REFERENCE = "focused linear (ours, reference backend)"

# label -> entry; "ours" is the default ``attn_backend='auto'`` (cpu backend on CPU, triton on CUDA)
ENTRIES: dict[str, Entry] = {
    OURS: Entry(lambda c, h: set_backend(FocusedLinearAttention(c, h, grid_size=(56, 56)), "auto")),
    REFERENCE: Entry(lambda c, h: FocusedLinearAttention(c, h, grid_size=(56, 56))),
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
    twin = published_like(ours.to(device))
    ours = set_backend(ours, "auto").eval()
    x = torch.randn(1, side * side, dim, device=device)
    with torch.inference_mode():
        a, b = ours(x, (side, side)), twin(x, (side, side))
    rel = ((a - b).norm() / b.norm()).item()
    if rel > 1e-5:
        raise AssertionError(f"ours and the published formulation differ: relative {rel:.2e} at {side}^2")
    return rel


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _runs(module: nn.Module, side: int, dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, Callable]:
    """The forward and forward+backward passes to measure; half precision runs under autocast."""
    size = (side, side)
    x = torch.randn(1, side * side, dim, device=device)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def forward() -> None:
        with torch.inference_mode(), amp:
            module(x, size)

    def forward_backward() -> None:
        xg = x.detach().requires_grad_()
        with amp:
            out = module(xg, size)
        out.float().square().mean().backward()
        module.zero_grad(set_to_none=True)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[56, 128, 256], help="grid sides (N = side^2)")
    parser.add_argument("--dim", type=int, default=64, help="channels C")
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 2], help="heads h (head dim d = C / h)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES),
                        help="half precision runs under autocast")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--max-quadratic-tokens", type=int, default=0,
                        help="largest N for softmax entries (0: 256^2 on GPU, 128^2 on CPU)")
    parser.add_argument("--only", nargs="+", default=None, help="labels of ENTRIES to run (default: all)")
    parser.add_argument("--compile", action="store_true", help="run every module under torch.compile")
    args = parser.parse_args(argv)
    configure_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    max_quadratic = args.max_quadratic_tokens or (256**2 if device.type == "cuda" else 128**2)
    entries = {k: v for k, v in ENTRIES.items() if args.only is None or k in args.only}
    cases = [(label, side, heads, dtype) for side in args.sizes for heads in args.heads for dtype in args.dtypes
             for label in entries]

    def case_key(label: str, side: int, heads: int, dtype: str) -> str:
        return f"{label}|{side}|{heads}|{dtype}"

    def run_case(label: str, side: int, heads: int, dtype: str, memory: bool) -> dict[str, float] | str:
        if entries[label].quadratic and side * side > max_quadratic:
            return f"skipped: quadratic, N > {max_quadratic} (--max-quadratic-tokens)"
        torch.manual_seed(0)
        module = entries[label].build(args.dim, heads).to(device).eval()
        if args.compile:
            module.compile()
        try:
            runs = _runs(module, side, args.dim, DTYPES[dtype], device)
            if memory:
                return {key: peak_memory_mb(fn) for key, fn in runs.items()}
            return {key: median_time(fn, args.repeats) for key, fn in runs.items()}
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if not _is_oom(error):
                raise
            return "out of memory"
        finally:
            del module
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if OURS in entries and PUBLISHED in entries and not in_child_phase():
        for side in args.sizes:
            for heads in args.heads:
                rel = check_published_equal(side, args.dim, heads, device)
                print(f"# ours == published formulation at {side}^2, d = {args.dim // heads}: "
                      f"relative difference {rel:.1e} (float32)")
    results = measure_cases(cases, case_key, run_case, device)
    if results is None:
        return
    times, peaks = results
    compiled = ", torch.compile" if args.compile else ""
    print(f"# attention layers, batch 1, C = {args.dim}, median of {args.repeats}{compiled}; {machine()}")
    print("| attention | tokens | d | dtype | fwd (ms) | fwd peak (MiB) | fwd+bwd (ms) | fwd+bwd peak (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, side, heads, dtype in cases:
        key = case_key(label, side, heads, dtype)
        row = f"| {label} | {side}^2 = {side * side} | {args.dim // heads} | {dtype} |"
        t, m = times[key], peaks[key]
        if isinstance(t, str) or isinstance(m, str):
            print(f"{row} {t if isinstance(t, str) else m} | | | |")
            continue
        m = {key: max(value, 0.0) for key, value in m.items()}  # RSS noise can read a hair below zero
        print(f"{row} {t['fwd'] * 1e3:.1f} | {m['fwd']:.0f} | {t['fwd+bwd'] * 1e3:.1f} | {m['fwd+bwd']:.0f} |")
    pairs = [c[1:] for c in cases if c[0] == OURS and isinstance(times[case_key(*c)], dict)
             and isinstance(times.get(case_key(PUBLISHED, *c[1:])), dict)]
    if pairs:
        print("\nSpeed-up of ours over the published formulation (published time / ours, same run):")
        for side, heads, dtype in pairs:
            ours, pub = times[case_key(OURS, side, heads, dtype)], times[case_key(PUBLISHED, side, heads, dtype)]
            print(f"- {side}^2 tokens, d = {args.dim // heads}, {dtype}: forward {pub['fwd'] / ours['fwd']:.2f}x, "
                  f"forward+backward {pub['fwd+bwd'] / ours['fwd+bwd']:.2f}x")


if __name__ == "__main__":
    main()
