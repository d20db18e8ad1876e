"""Full-resolution labels of a photo: the striped resize + argmax of ``seg.serve.limits.labels_at`` against the
full-size ``F.interpolate(...).argmax(1)``, time and peak memory.

    python benchmarks/labels_at.py
    python benchmarks/labels_at.py --classes 150 --logits 512 768 --photos 1000x1500 4000x6000 --stripes 20 22 24

Logits of ``--classes`` classes at the network's resolution (``--logits`` h w) go to each photo size. The cases
of one photo are timed rotating in one process (median of ``--rounds``) under glibc's default allocator, as
a user's process runs them (blocks >= 32 MiB are mmapped and faulted in on every use); peak memory comes from a
separate run of this script that serves every block >= 64 KiB by mmap, so that freed tensors leave the resident
set. The full-size path is skipped where its logits alone would exceed ``--max-full-gib``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import is_memory_phase, machine, memory_from_child, peak_memory_mb, report_child  # noqa: E402

from seg.serve.limits import labels_at  # noqa: E402

Case = tuple[str, Callable[[], torch.Tensor]]


def cases(logits: torch.Tensor, photo: tuple[int, int], stripes: list[int], max_full_gib: float) -> list[Case]:
    """(label, run) of the full-size path (where it fits) and of each stripe budget 2^e."""
    full_gib = logits.shape[0] * logits.shape[1] * photo[0] * photo[1] * 4 / 2**30
    out: list[Case] = []
    if full_gib <= max_full_gib:
        out.append(("full size", lambda: F.interpolate(logits, size=photo, mode="bilinear",
                                                        align_corners=False).argmax(dim=1)))
    out += [(f"stripes of 2^{e} logits", lambda e=e: labels_at(logits, photo, 1 << e)) for e in stripes]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--logits", type=int, nargs=2, default=[512, 768], metavar=("H", "W"))
    parser.add_argument("--photos", nargs="+", default=["1000x1500", "4000x6000"])
    parser.add_argument("--stripes", type=int, nargs="+", default=[22, 24], help="exponents e of 2^e logits")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-full-gib", type=float, default=4.0)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    logits = torch.randn(1, args.classes, *args.logits)
    groups = [  # the cases of one photo, keyed "photo | path"
        [(f"{photo} | {label}", run) for label, run in
         cases(logits, tuple(int(v) for v in photo.split("x")), args.stripes, args.max_full_gib)]
        for photo in args.photos
    ]
    every = dict(case for group in groups for case in group)
    if is_memory_phase():
        report_child({key: peak_memory_mb(run) for key, run in every.items()})
        return
    times: dict[str, list[float]] = {key: [] for key in every}
    for group in groups:
        for round_ in range(args.rounds):
            shift = round_ % len(group)
            for key, run in group[shift:] + group[:shift]:
                start = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - start)
    peaks = memory_from_child()
    print(f"# {args.classes} classes, logits {args.logits[0]} x {args.logits[1]}, float32; median of "
          f"{args.rounds} rotating rounds, default allocator; {machine()}")
    print("| photo | path | time (s) | peak memory above the logits (MiB) |")
    print("|---|---|---|---|")
    for key in every:
        print(f"| {key} | {statistics.median(times[key]):.2f} | {peaks[key]:.0f} |")


if __name__ == "__main__":
    main()
