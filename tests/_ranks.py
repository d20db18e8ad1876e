"""Multi-process tests that cannot block CI: no process is a fork of the test process (ranks are forked by a fresh
interpreter before any other thread exists, or started fresh), ranks meet through a file (no port to race for), and
a process still running at the deadline prints the Python stack of each of its threads (faulthandler) before it is
stopped; the test then fails with those stacks.

Why not fork: by the time a distributed test runs, the pytest process holds other threads (the OpenMP pool of
earlier tests, TensorBoard writers, servers). A forked child keeps only the forking thread, and every lock another
thread held at the fork stays locked in the child forever (POSIX: after fork only async-signal-safe calls are safe);
GNU OpenMP in particular hangs in the child's next parallel region. Why not a free port: the port is released
before rank 0's store binds it, and on a shared machine another process may take it first; rank 1 then waits for a
store that never answers, for the process group's default 30 minutes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
GRACE = 20.0  # seconds between the stack dump and the kill

BOOT = TESTS / "_rank_boot.py"


def run_ranks(target: str, world_size: int, folder: Path, timeout: float, *args: str) -> list[str]:
    """Run ``target`` (``"module:function"``, a module in tests/) as ranks 0 .. world_size - 1, as
    ``function(rank, world_size, store_path, *args)``; ``store_path`` is a fresh file for
    ``torch.distributed.FileStore``. The module is imported once, in a fresh interpreter that forks the ranks
    before any other thread exists (tests/_rank_boot.py). Returns each rank's output.

    A rank still running after ``timeout`` seconds prints the stack of each of its threads and exits; the test
    fails naming the ranks that stalled or failed, with their output.
    """
    folder.mkdir(parents=True, exist_ok=True)
    store = folder / "store"
    for stale in [store, *folder.glob("rank*.ok"), *folder.glob("rank*.log")]:
        stale.unlink(missing_ok=True)
    command = [sys.executable, str(BOOT), str(timeout), str(folder), target, "0", str(world_size), str(store), *args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                               env=_one_thread_env(), text=True)
    try:
        _, errors = process.communicate(timeout=timeout + GRACE)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        _, errors = process.communicate()
    _signal_group(process.pid, signal.SIGKILL)  # ranks still running after rank 0 gave up on them
    outputs = [log.read_text(errors="replace") if log.exists() else "" for log in
               (folder / f"rank{rank}.log" for rank in range(world_size))]
    failed = [rank for rank in range(world_size) if not (folder / f"rank{rank}.ok").exists()]
    if failed:
        report = "\n".join(f"--- rank {rank}:\n{outputs[rank][-3000:]}" for rank in failed)
        pytest.fail(f"ranks {failed} of {world_size} failed or stalled (deadline {timeout:.0f} s):\n{report}\n"
                    f"{errors[-2000:]}", pytrace=False)
    return outputs


def run_commands(runs: list[tuple[list[str], Path, dict[str, str]]], timeout: float) -> list[str]:
    """Run each ``(command, cwd, env)`` at once, each in its own process group, and return their outputs (stdout
    and stderr); fail the test if one exits non-zero. At ``timeout`` seconds every Python process of a group still
    running (Lightning's DDP launcher starts the other ranks as its children) prints the stack of each thread
    (faulthandler, on SIGABRT) and the group is killed; the test fails with that output."""
    started = []
    for command, cwd, env in runs:
        cwd.mkdir(parents=True, exist_ok=True)
        with open(cwd / "output.log", "w") as out:
            started.append(subprocess.Popen(command, cwd=cwd, env=env | {"PYTHONFAULTHANDLER": "1"}, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout
    stalled = []
    for i, process in enumerate(started):
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stalled.append(i)
            _signal_group(process.pid, signal.SIGABRT)  # faulthandler: each process prints its stacks, then aborts
    for i in stalled:
        try:
            started[i].wait(timeout=GRACE)
        except subprocess.TimeoutExpired:
            pass
    if stalled:  # a launcher may abort before its children have printed their stacks: give them a moment
        time.sleep(2.0)
    for process in started:
        _signal_group(process.pid, signal.SIGKILL)  # processes a launcher left behind, if any
        process.wait()
    outputs = [(cwd / "output.log").read_text(errors="replace") for _, cwd, _ in runs]
    for i, (process, (command, _, _)) in enumerate(zip(started, runs, strict=True)):
        if i in stalled:
            pytest.fail(f"{' '.join(command[:3])} ... (run {i}) did not finish within {timeout:.0f} s; stacks of "
                        f"its processes:\n{outputs[i][-6000:]}", pytrace=False)
        if process.returncode != 0:
            pytest.fail(f"run {i} exited with status {process.returncode}:\n{outputs[i][-4000:]}", pytrace=False)
    return outputs


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _one_thread_env() -> dict[str, str]:
    """This environment without launcher variables, one thread per process."""
    launcher = {"LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    return env | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def wait_for_a_peer_that_never_comes(rank: int, world_size: int, store: str) -> None:
    """A worker of the tests of this module: rank 0 finishes, the others stall."""
    if rank > 0:
        time.sleep(3600)
