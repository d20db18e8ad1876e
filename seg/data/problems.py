"""The problems ``prepare`` and ``check`` find in a data set, each naming its file, and how they are printed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["Problem", "Report", "print_report", "run_jobs"]

R = TypeVar("R")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data set: a kind (e.g. ``missing label``), the file and what is wrong."""

    kind: str
    path: str
    detail: str


@dataclass
class Report:
    """Result of :func:`verify`: per-split counts and every problem found."""

    root: Path
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (images, label maps)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def kinds(self) -> Counter[str]:
        """Number of problems per kind."""
        return Counter(p.kind for p in self.problems)


def print_report(report: Report, max_per_kind: int = 50) -> None:
    """Print the counts, the problems (at most ``max_per_kind`` of each kind) and a summary."""
    print(f"data set: {report.root}")
    for split, (n_images, n_labels) in report.counts.items():
        print(f"  {split}: {n_images} images, {n_labels} label maps")
    shown: Counter[str] = Counter()
    for problem in report.problems:
        shown[problem.kind] += 1
        if shown[problem.kind] <= max_per_kind:
            print(f"  [{problem.kind}] {problem.path}: {problem.detail}")
    for kind, count in report.kinds().items():
        if count > max_per_kind:
            print(f"  [{kind}] ... and {count - max_per_kind} more")
    if report.ok:
        print("summary: OK, no problems found")
    else:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(report.kinds().items()))
        print(f"summary: {len(report.problems)} problems ({kinds})")


def run_jobs(fn: Callable[..., R], jobs: Sequence[tuple[Any, ...]], workers: int, min_parallel: int,
             chunksize: int) -> list[R]:
    """``fn(*job)`` for every job, in order: in ``workers`` processes when there are more than ``min_parallel``
    jobs (``fn`` must then be a module-level function), else in this process."""
    if workers > 1 and len(jobs) > min_parallel:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(fn, *zip(*jobs, strict=True), chunksize=chunksize))
    return [fn(*job) for job in jobs]
