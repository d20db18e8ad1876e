"""Shared helpers of the benchmark scripts: wall time (median of repeats), peak memory, machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["machine", "median_time", "peak_memory_mb", "track_cpu_memory"]


def machine() -> str:
    """CPU / GPU model, core count and library versions, for the results table."""
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu}, {os.cpu_count()} cores"
    import timm

    return f"{dev}; torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}"


def track_cpu_memory() -> None:
    """Re-run this process with glibc serving large blocks by mmap, so freed tensors leave the resident set.

    Without it, memory freed by one forward pass stays in malloc's arena and the next pass's peak hides
    inside the resident size. Call first thing in ``main``.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and not torch.cuda.is_available():
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak extra memory (MiB) of one ``fn()``: CUDA allocator peak, or the process's resident high-water
    mark above its resident size before the call (Linux: the mark is reset through /proc/self/clear_refs)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kb("VmRSS:")
    fn()
    return (_rss_kb("VmHWM:") - before) / 1024
