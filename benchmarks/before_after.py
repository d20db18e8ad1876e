"""CPU speed of two revisions side by side in one run: the headline cases, alternating trees per round.

    python benchmarks/before_after.py --base 5584839            # base revision vs the working tree
    python benchmarks/before_after.py --base HEAD~3 --rounds 5

Each measurement runs in its own process that imports ``seg`` from one source tree (the base revision is
checked out into a temporary git worktree), so both trees meet the same machine state; each round measures
both trees back to back, the first of the pair alternating between rounds, and the table reports the median
over rounds of each process's median. Every case runs under glibc's default allocator and under the tuned
setting of the other benchmarks (no heap trimming, no mmap), so both columns come from the same run.
Cases: focused linear attention (ours: the default backend) and the published formulation, forward + backward
at 128^2 tokens, C = d = 64, float32; FLatten-PVT-T and softmax PVT-T (SDPA) encoders, inference at 512^2;
FLatten-PVT-T encoder forward + backward at 512^2 (features, mean of squares), ours and with every attention
layer replaced by the published formulation. On request (``--cases "encoder flatten_swin_tiny" ...``): one encoder
per family (``FAMILY_ENCODERS``), inference at 512^2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAMILY_ENCODERS = ("flatten_pvt_v2_b0", "flatten_swin_tiny", "agent_pvt_tiny", "agent_swin_tiny", "mlla_tiny",
                   "ravlt_tiny", "soft_tiny")  # one encoder per family on the staged skeleton (besides PVT-T)
CASES = ("attention ours", "attention published", "encoder FLatten-PVT-T", "encoder PVT-T (SDPA)",
         "train FLatten-PVT-T", "train FLatten-PVT-T published", *(f"encoder {n}" for n in FAMILY_ENCODERS))
DEFAULT_CASES = CASES[:6]
ALLOCATORS = {
    "default": {},
    "tuned": {"MALLOC_TRIM_THRESHOLD_": str(2**40), "MALLOC_MMAP_MAX_": "0"},
}
REPO = Path(__file__).resolve().parent.parent


def _child(tree: str, case: str, repeats: int) -> None:
    """Measure one case with ``seg`` imported from ``tree``; print {"seconds": median}."""
    sys.path.insert(0, tree)
    sys.path.insert(0, str(Path(tree) / "benchmarks"))
    import timm
    import torch

    import seg  # noqa: F401  (registers the encoders)
    try:
        from seg.model.layers import FocusedLinearAttention
    except ImportError:  # a base revision from before the seg/model layout
        from seg.layers import FocusedLinearAttention

    try:
        from seg.kernels import set_backend
    except ImportError:  # a revision before the backend switch: its module is its fast path
        set_backend = lambda module, backend: module  # noqa: E731
    from published_flatten import published_like

    torch.manual_seed(0)
    if case.startswith("attention"):
        attn = FocusedLinearAttention(64, 1, grid_size=(56, 56))
        module = published_like(attn) if case == "attention published" else set_backend(attn, "auto")
        x = torch.randn(1, 128 * 128, 64, requires_grad=True)

        def run() -> None:
            module(x, (128, 128)).square().mean().backward()
            module.zero_grad(set_to_none=True)
    elif case.startswith("train"):
        model = timm.create_model("flatten_pvt_tiny", features_only=True)
        if case.endswith("published"):
            for parent in list(model.modules()):
                for name, child in parent.named_children():
                    if type(child) is FocusedLinearAttention:
                        setattr(parent, name, published_like(child))
        image = torch.randn(1, 3, 512, 512)

        def run() -> None:
            sum(f.square().mean() for f in model(image)).backward()
            model.zero_grad(set_to_none=True)
    else:
        name = case.split(" ", 1)[1]
        if name in FAMILY_ENCODERS:  # a family's encoder at its defaults
            model = timm.create_model(name, features_only=True).eval()
        else:
            attn_type = "LLLL" if "FLatten" in case else "SSSS"
            model = timm.create_model("flatten_pvt_tiny", features_only=True, attn_type=attn_type).eval()
        image = torch.randn(1, 3, 512, 512)

        def run() -> None:
            with torch.no_grad():
                model(image)

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times)}))


def _measure(tree: Path, case: str, allocator: str, repeats: int) -> float:
    env = {**os.environ, **ALLOCATORS[allocator], "PYTHONPATH": str(tree)}
    for key in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_"):
        if key not in ALLOCATORS[allocator]:
            env.pop(key, None)
    out = subprocess.run([sys.executable, __file__, "--child", str(tree), "--case", case, "--repeats", str(repeats)],
                         env=env, cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats inside each process")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(DEFAULT_CASES),
                        help="default: the first six (the PVT-T cases); the families' encoders on request")
    parser.add_argument("--allocators", nargs="+", choices=list(ALLOCATORS), default=list(ALLOCATORS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.case, args.repeats)
        return
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base_tree), args.base],
                       check=True)
        try:
            trees = {"before": base_tree, "after": REPO}
            samples: dict[tuple[str, str, str], list[float]] = {}
            for round_ in range(args.rounds):
                order = list(trees.items())[:: 1 if round_ % 2 == 0 else -1]  # who goes first alternates too
                for case in args.cases:
                    for allocator in args.allocators:
                        for label, tree in order:
                            seconds = _measure(tree, case, allocator, args.repeats)
                            samples.setdefault((case, allocator, label), []).append(seconds)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)], check=True)
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _measure import machine

    med = {key: statistics.median(values) * 1e3 for key, values in samples.items()}
    print(f"# before = {args.base}, after = working tree; median over {args.rounds} alternating rounds of "
          f"per-process medians of {args.repeats}; torch threads {torch.get_num_threads()}; {machine()}")
    print("| case | allocator | before (ms) | after (ms) | after / before |")
    print("|---|---|---|---|---|")
    for case in args.cases:
        for allocator in args.allocators:
            b, a = med[(case, allocator, "before")], med[(case, allocator, "after")]
            print(f"| {case} | {allocator} | {b:.1f} | {a:.1f} | {a / b:.2f} |")
    print("\n| ratio | allocator | before | after |")
    print("|---|---|---|---|")
    for allocator in args.allocators:
        for title, num, den in (("published / ours (attention, fwd+bwd 128^2)", "attention published",
                                 "attention ours"),
                                ("FLatten-PVT-T / PVT-T SDPA (encoder 512^2)", "encoder FLatten-PVT-T",
                                 "encoder PVT-T (SDPA)"),
                                ("published / ours (FLatten-PVT-T fwd+bwd 512^2)", "train FLatten-PVT-T published",
                                 "train FLatten-PVT-T")):
            if (num, allocator, "after") not in med or (den, allocator, "after") not in med:
                continue
            ratios = [med[(num, allocator, label)] / med[(den, allocator, label)] for label in ("before", "after")]
            print(f"| {title} | {allocator} | {ratios[0]:.2f}x | {ratios[1]:.2f}x |")


if __name__ == "__main__":
    main()
