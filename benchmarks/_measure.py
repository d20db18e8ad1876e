"""Shared helpers of the benchmark scripts: wall time (median of repeats), peak memory, machine facts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "configure_allocator",
    "in_child_phase",
    "is_memory_phase",
    "machine",
    "measure_cases",
    "median_time",
    "memory_from_child",
    "peak_memory_mb",
    "report_child",
]


def machine() -> str:
    """CPU / GPU model, core count and library versions, for the results table."""
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    isa = torch.backends.cpu.get_cpu_capability()  # the vector ISA torch's CPU kernels use: AVX2, AVX512, ...
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu} ({isa}), {os.cpu_count()} cores"
    import timm

    return (f"{dev}; python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
            f"threads {torch.get_num_threads()}")


_PHASE = "SEG_BENCH_PHASE"  # "time" / "memory" in the child processes that measure
_CASE = "SEG_BENCH_CASE"  # the case a "time" child measures
# glibc settings per phase. Timing serves every block from the heap and never hands freed memory back to the
# OS, as a caching allocator would: with glibc's defaults, blocks >= 32 MiB are mmapped and every pass faults
# them in again (at 2048^2 the 2.4 GB of logits cost seconds of page faults, more than computing them), and
# the heap is trimmed after large frees, which adds +-30 % of noise. The memory phase serves every block
# >= 64 KiB by mmap so that freed tensors leave the resident set.
_TIMING_ENV = {"MALLOC_TRIM_THRESHOLD_": str(2**40), "MALLOC_MMAP_MAX_": "0"}
_MEMORY_ENV = {"MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_MMAP_MAX_": "65536"}


def configure_allocator() -> None:
    """Re-run this process with the glibc settings of its phase (CPU only); call first thing in ``main``."""
    if torch.cuda.is_available():
        return
    env = _MEMORY_ENV if is_memory_phase() else _TIMING_ENV
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, **env))


def is_memory_phase() -> bool:
    """True in the child process started by :func:`memory_from_child`."""
    return os.environ.get(_PHASE) == "memory"


def in_child_phase() -> bool:
    """True in the child processes that time one case or measure peak memory."""
    return os.environ.get(_PHASE) in ("time", "memory")


def _run_child(phase: str, env: dict[str, str], case: int | None = None) -> dict[str, object]:
    """Re-run this script in ``phase``; the child prints one JSON object {case: value} as its last line."""
    env = dict(os.environ, **env, **{_PHASE: phase, _CASE: "" if case is None else str(case)})
    done = subprocess.run([sys.executable, *sys.argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        what = f"case {case}" if case is not None else "all cases"
        raise RuntimeError(f"{phase} phase ({what}) failed with exit code {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_from_child() -> dict[str, object]:
    """Peak memory per case, measured by this script re-run as a separate process in its memory phase."""
    return _run_child("memory", _MEMORY_ENV)


def report_child(peaks: dict[str, object]) -> None:
    """Print a child phase's result for the parent (see :func:`_run_child`)."""
    print(json.dumps(peaks), flush=True)


def measure_cases(
    cases: list[tuple], key: Callable[..., str], run: Callable[..., object], device: torch.device
) -> tuple[dict[str, object], dict[str, object]] | None:
    """Times and peak memories of every case, keyed by ``key(*case)``; ``run(*case, memory=...)`` measures one.

    On CPU every case is timed in its own run of this script (a heap that never hands memory back would
    otherwise carry one model's blocks into the next, up to running out of memory), and the peaks come
    from one more run in the memory phase; in those child processes this reports and returns None, and the
    caller should stop.
    """
    phase = os.environ.get(_PHASE)
    if phase == "memory":
        report_child({key(*c): run(*c, memory=True) for c in cases})
        return None
    if phase == "time":
        case = cases[int(os.environ[_CASE])]
        report_child({key(*case): run(*case, memory=False)})
        return None
    if device.type == "cpu":
        times: dict[str, object] = {}
        for i in range(len(cases)):
            times.update(_run_child("time", _TIMING_ENV, i))
        return times, memory_from_child()
    times = {key(*c): run(*c, memory=False) for c in cases}
    return times, {key(*c): run(*c, memory=True) for c in cases}


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
