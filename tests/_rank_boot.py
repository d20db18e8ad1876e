"""The ranks of tests/_ranks.py:run_ranks, started as a script:

    python tests/_rank_boot.py TIMEOUT FOLDER module:function RANK WORLD_SIZE STORE [ARGS...]

Rank 0, a fresh interpreter, imports the worker's module once and, verified free of other threads (Linux:
/proc/self/task), forks the other ranks, as multiprocessing's fork server does; with another thread present it
starts them as fresh interpreters instead. Each rank writes FOLDER/rank<r>.log, arms the stack dump (faulthandler:
after TIMEOUT seconds the stack of each thread is printed and the rank exits), runs
``function(rank, world_size, store, *args)`` and marks success with FOLDER/rank<r>.ok; rank 0 then waits for the
others.
"""

from __future__ import annotations

import faulthandler
import importlib
import os
import subprocess
import sys
from pathlib import Path


def _only_thread() -> bool:
    tasks = Path("/proc/self/task")
    return tasks.is_dir() and len(list(tasks.iterdir())) == 1


def main(timeout: str, folder: str, target: str, rank: str, world_size: str, store: str, *args: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    module, function = target.split(":")
    worker = getattr(importlib.import_module(module), function)
    me, n, others = int(rank), int(world_size), []
    if me == 0:
        sys.stdout.flush()
        sys.stderr.flush()
        fork = _only_thread()
        for other in range(1, n):
            if not fork:
                others.append(subprocess.Popen([sys.executable, __file__, timeout, folder, target, str(other),
                                                world_size, store, *args]).pid)
                continue
            pid = os.fork()
            if pid == 0:
                me, others = other, []
                break
            others.append(pid)
    log = os.open(Path(folder) / f"rank{me}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    faulthandler.dump_traceback_later(float(timeout), exit=True)
    worker(me, n, store, *args)
    (Path(folder) / f"rank{me}.ok").touch()
    for pid in others:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main(*sys.argv[1:])
