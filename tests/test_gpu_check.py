"""``benchmarks/gpu_check.py`` runs on CPU at tiny sizes, so the one-command GPU check cannot rot."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow  # minutes on 2 cores: the Triton probe runs interpreted for every configuration
def test_gpu_check_runs_on_cpu_and_backends_agree() -> None:
    """With Triton installed the check runs its kernels through the interpreter, so the ``triton`` column is
    the kernels' own result: the script stops rather than report a fallback to the reference."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--repeats", "1"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    for title in ("## Backends equal", "## Attention forward + backward", "## Training step",
                  "## Compiled Triton kernels", "## cli.py fit"):
        assert title in out, out
    header = next(line for line in out.splitlines() if line.startswith("| dtype |"))
    triton = importlib.util.find_spec("triton") is not None
    expected = ["reference", "triton", "published"] if triton else ["reference", "published"]
    assert [cell.strip() for cell in header.strip("|").split("|")[1:]] == expected, header
    float32 = next(line for line in out.splitlines() if line.startswith("| float32 |"))
    errors = [float(cell.split()[0]) for cell in float32.strip("|").split("|")[1:]]
    assert len(errors) == len(expected) and max(errors) < 1e-5, float32  # every backend agrees with float64
    bf16 = next(line for line in out.splitlines() if line.startswith("| bfloat16 |"))
    assert "non-finite" not in bf16.split("|")[2], bf16  # the reference stays finite under bf16 autocast
    steps = re.findall(r"^\| test_flatten_\w+ \+ \w+ \| [LS]+ \| (reference|triton) \| (\d+) \|", out, flags=re.M)
    assert [backend for backend, _ in steps].count("triton") == (1 if triton else 0), out  # one under the interpreter
    assert len(steps) == (5 if triton else 4), out
    if triton:  # the kernels' bf16 / fp16 output and gradients at two small shapes, against float64
        grads = re.findall(r"^\| tiny \| \d \| .* \| (bfloat16|float16) \|(.*)\|$", out, flags=re.M)
        assert len(grads) == 4, out
        assert all(float(e) < 3e-2 for _, cells in grads for e in cells.split("|")), grads
    attention = next(line for line in out.splitlines() if line.startswith("| tokens |"))
    assert "sdpa softmax fwd+bwd (ms)" in attention, attention
