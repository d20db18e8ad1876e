"""A child Python process started with ``TRITON_INTERPRET=1`` that runs the ``check_*`` functions of a test file
(or, with ``hide_triton``, one where ``import triton`` fails, as on a CPU-only torch wheel).

Triton reads ``TRITON_INTERPRET`` when a kernel is defined, and its own library functions are defined when triton is
first imported, which in a pytest process may happen long before a test file runs. So the Triton checks run in one
child process per test file; each test asks it to run one check and fails with the child's traceback. The test
process itself never switches triton to the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REPLY = "@@check-reply "
HIDE_TRITON = "import sys; sys.modules['triton'] = None  # import triton now raises ImportError\n"
WORKER_LOOP = """
import json, sys, traceback
sys.path.insert(0, {tests!r})
checks = __import__({module!r})
for line in sys.stdin:
    request = json.loads(line)
    try:
        getattr(checks, request["check"])(*request["args"])
        reply = {{"ok": True}}
    except BaseException:
        reply = {{"ok": False, "error": traceback.format_exc()}}
    sys.stdout.write({reply!r} + json.dumps(reply) + "\\n")
    sys.stdout.flush()
"""


class Worker:
    """The process running the checks of test module ``module`` (a file stem in tests/): Triton's interpreter,
    or no Triton at all (``hide_triton``)."""

    def __init__(self, module: str, hide_triton: bool = False) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1")
        if hide_triton:
            env.pop("TRITON_INTERPRET")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        loop = WORKER_LOOP.format(tests=str(Path(__file__).resolve().parent), module=module, reply=REPLY)
        if hide_triton:
            loop = HIDE_TRITON + loop
        self.process = subprocess.Popen(
            [sys.executable, "-c", loop], cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def __call__(self, check: str, *args: object) -> None:
        """Run ``check(*args)`` in the child; fail the calling test with the child's traceback if it raises."""
        self.process.stdin.write(json.dumps({"check": check, "args": args}) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:  # anything else the child prints is skipped
            if line.startswith(REPLY):
                reply = json.loads(line[len(REPLY):])
                if not reply["ok"]:
                    pytest.fail(f"{check}{args} failed in the child process:\n{reply['error']}", pytrace=False)
                return
        pytest.fail(f"the child process exited with code {self.process.wait()}", pytrace=False)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
