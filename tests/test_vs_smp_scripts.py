"""``benchmarks/vs_smp.py``, ``ort_nodes.py`` and ``profile_stages.py`` run at tiny sizes, so the tables they
print cannot rot: a ratio row per pair and runtime, operator rows and the floor, a stage and an operation table
per model."""

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


@pytest.mark.slow
def test_ort_nodes_prints_operators_and_the_floor() -> None:
    out = _run(str(BENCHMARKS / "ort_nodes.py"), "--size", "64", "--runs", "1")
    assert re.search(r"^\| Gemm \| \d+ \| \d+\.\d \| \d+ \| \d+\.\d \|", out, re.M), out
    assert re.search(r"^\| all nodes \| \d+ \|", out, re.M)
    floor = re.search(r"floor \(.+\): (\d+\.\d\d)x$", out, re.M)
    total = re.search(r"node time ours / smp: (\d+\.\d\d)x", out)
    assert floor and total and 0 < float(floor.group(1)) <= float(total.group(1)), out
