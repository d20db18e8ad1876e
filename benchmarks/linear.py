"""CPU inference linears: ``F.linear`` (MKL's sgemm) against the project's oneDNN path, on the encoders' shapes.

    python benchmarks/linear.py --repeats 20

Shapes are the token x channel products of FLatten-PVT-T at a 512 x 512 input (stage 1-4 grids of 128^2 ...
16^2 tokens): attention projections, the stacked q / k projection of the focused linear inference path and the
MLP's fc1 (with and without its GELU fused) and fc2. Both paths are timed side by side in one process under
``torch.inference_mode``, after checking that they agree.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import configure_allocator, machine, median_time  # noqa: E402

from seg.kernels.onednn import linear, linear_gelu, onednn_linear_available, set_onednn_linear  # noqa: E402

# (stage, tokens, channels, MLP ratio) of FLatten-PVT-T at 512 x 512
STAGES = [(1, 128 * 128, 64, 8), (2, 64 * 64, 128, 8), (3, 32 * 32, 320, 4), (4, 16 * 16, 512, 4)]


def cases() -> list[tuple[str, int, int, int, bool]]:
    """(label, tokens, C_in, C_out, GELU fused) per measured product."""
    out = []
    for stage, n, c, r in STAGES:
        out += [
            (f"stage {stage} q / v / proj", n, c, c, False),
            (f"stage {stage} q + k stacked", n, c, 2 * c, False),
            (f"stage {stage} mlp fc1 + GELU", n, c, r * c, True),
            (f"stage {stage} mlp fc2", n, r * c, c, False),
        ]
    return out


def main(argv: list[str] | None = None) -> None:
    configure_allocator()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if not onednn_linear_available():
        raise SystemExit("this torch build has no oneDNN linear operator")
    print(f"# CPU inference linears, batch 1, float32, median of {args.repeats}; {machine()}")
    print("| product | tokens | C_in -> C_out | F.linear (ms) | oneDNN (ms) | speed-up |")
    print("|---|---|---|---|---|---|")
    for label, n, c_in, c_out, gelu in cases():
        x, w, b = torch.randn(1, n, c_in), torch.randn(c_out, c_in) / c_in**0.5, torch.randn(c_out)
        fn = partial(linear_gelu if gelu else linear, x, w, b)
        with torch.inference_mode():
            set_onednn_linear(False)
            ref = fn()
            t_ref = median_time(fn, args.repeats)
            set_onednn_linear(True)
            torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-4)
            t_new = median_time(fn, args.repeats)
        print(f"| {label} | {n} | {c_in} -> {c_out} | {t_ref * 1e3:.2f} | {t_new * 1e3:.2f} | {t_ref / t_new:.2f}x |")


if __name__ == "__main__":
    main()
