"""Benchmark scripts without a test of their own run at tiny sizes, so the tables they print cannot rot:
``paired.py`` (the CPU target ratios and the products-only bound) and ``labels_at.py`` (photo-size labels)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import seg  # noqa: F401  (registers the encoders)
from seg.layers import FocusedLinearAttention

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_products_only_replaces_every_attention_layer() -> None:
    """The bound keeps nothing of the element-wise attention: every focused linear layer is wrapped, the
    parameters are the model's own, and the encoder still gives its feature maps at an odd input size."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from products_only import ProductsOnly, products_only
    finally:
        sys.path.remove(str(BENCHMARKS))
    image = torch.randn(1, 3, 70, 90)
    model = timm.create_model("test_flatten_pvt", features_only=True).eval()
    with torch.no_grad():
        shapes = [f.shape for f in model(image)]
    layers = sum(type(m) is FocusedLinearAttention for m in model.modules())
    count = sum(p.numel() for p in model.parameters())
    bound = products_only(model)
    parents = [type(parent) for parent in bound.modules() for child in parent.children()
               if type(child) is FocusedLinearAttention]
    assert parents == [ProductsOnly] * layers and layers > 0
    assert sum(p.numel() for p in bound.parameters()) == count
    with torch.no_grad():
        assert [f.shape for f in bound(image)] == shapes


@pytest.mark.slow
def test_paired_benchmark_prints_every_ratio() -> None:
    run = subprocess.run([sys.executable, str(BENCHMARKS / "paired.py"), "--size", "64", "--rounds", "1",
                          "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = re.findall(r"^\| (forward \+ backward|encoder inference) \| (.+?) [\d.]+ \| .+ \*\*([\d.]+)x\*\*",
                      run.stdout, flags=re.M)
    assert [(group, name) for group, name, _ in rows] == [
        ("forward + backward", "published formulation"),
        ("encoder inference", "FLatten-PVT-T"),
        ("encoder inference", "FLatten-PVT-T, products + DWC only"),
    ], run.stdout
    assert all(float(ratio) > 0 for _, _, ratio in rows)


@pytest.mark.slow
def test_labels_at_benchmark_prints_every_path() -> None:
    run = subprocess.run([sys.executable, str(BENCHMARKS / "labels_at.py"), "--photos", "100x150", "2000x3000",
                          "--logits", "32", "48", "--classes", "20", "--rounds", "1", "--max-full-gib", "0.1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = re.findall(r"^\| (\d+x\d+) \| (.+?) \| ([\d.]+) \| (\d+) \|$", run.stdout, flags=re.M)
    assert [(photo, path) for photo, path, _, _ in rows] == [
        ("100x150", "full size"), ("100x150", "stripes of 2^22 logits"), ("100x150", "stripes of 2^24 logits"),
        ("2000x3000", "stripes of 2^22 logits"), ("2000x3000", "stripes of 2^24 logits"),  # full size: 0.45 GiB
    ], run.stdout
