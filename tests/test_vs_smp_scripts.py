"""``benchmarks/vs_smp.py`` and ``benchmarks/profile_stages.py`` run at tiny sizes, so the tables they print cannot
rot: every pair and runtime gets a ratio row, every model a stage table and an operation table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.mark.slow
def test_vs_smp_prints_a_ratio_per_pair_and_runtime() -> None:
    out = _run(str(BENCHMARKS / "vs_smp.py"), "--sizes", "64", "--rounds", "2", "--repeats", "1")
    assert re.search(r"\(AVX[0-9A-Z_]*\)|\(DEFAULT\)|\(ZVECTOR\)|\(VSX\)|\(SVE", out), out
    for pair in ("encoder", "segmentor", "segmentor/ort"):
        assert re.search(rf"^\| {re.escape(pair)} \| 64\^2 \| \d+ \| \d+ \| \*\*\d+\.\d\dx\*\* \|", out, re.M), out


@pytest.mark.slow
def test_profile_stages_prints_stages_and_operations() -> None:
    out = _run(str(BENCHMARKS / "profile_stages.py"), "--size", "64", "--repeats", "1", "--top", "5")
    for name in ("pvt_v2_b0_segformer", "pvt_tiny_fpn", "swin_tiny_upernet"):
        assert f"## {name}:" in out
    assert re.search(r"^\| block1\.0 \| \d+\.\d \|", out, re.M) and re.search(r"^\| layers\.3\.blocks\.1 \|", out, re.M)
    assert out.count("| decode_head |") == 3 and out.count("aten::copy_ in all:") == 3
