"""Benchmark scripts without a test of their own run at tiny sizes, so the tables they print cannot rot:
``paired.py`` (the CPU target ratios and the products-only bound), ``labels_at.py`` (photo-size labels),
``attention_macs.py`` (multiply-adds from layer shapes), ``module_times.py`` (per-module hook timings),
``param_counts.py`` (parameters of every registered encoder) and ``cityscapes.py`` (the Cityscapes-size
segmentors and their floor)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import seg  # noqa: F401  (registers the encoders)
from seg.model.backbones._registry import encoder_names
from seg.model.layers import FocusedLinearAttention

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
    rows = re.findall(r"^\| (forward \+ backward|encoder inference) \| (.+?) [\d.]+ \| (.+?) [\d.]+ \| "
                      r"\*\*([\d.]+)x\*\*", run.stdout, flags=re.M)
    bound = "FLatten-PVT-T, products + DWC only"
    assert [(group, a, b) for group, a, b, _ in rows] == [
        ("forward + backward", "published formulation", "ours"),
        ("forward + backward", "published formulation", bound),
        ("encoder inference", "FLatten-PVT-T", "PVT-T (softmax, SDPA)"),
        ("encoder inference", bound, "PVT-T (softmax, SDPA)"),
    ], run.stdout
    assert all(float(ratio) > 0 for *_, ratio in rows)


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


def _benchmark_module(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_attention_macs_count_the_layer_shapes() -> None:
    """The multiply-add counts of ``attention_macs.py`` against counts written out by hand for one layer of each
    kind, and the script's table at a small size."""
    from seg.model.layers import SpatialReductionAttention

    macs = _benchmark_module("attention_macs")
    N, C, d = 4096, 128, 64  # PVT-T stage 2 at 512^2: 2 heads, sr 4 -> n = 256
    focused = FocusedLinearAttention(C, 2, grid_size=(8, 8))
    assert macs.layer_macs(focused, N) == 4 * N * C * C + 2 * N * C * d
    softmax = SpatialReductionAttention(C, 2, sr_ratio=4)
    n = N // 16
    assert macs.layer_macs(softmax, N) == 2 * N * C * C + n * C * C * 16 + 2 * n * C * C + 2 * N * n * C
    run = subprocess.run([sys.executable, str(BENCHMARKS / "attention_macs.py"), "--size", "64"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = re.findall(r"^\| (\d|all) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", run.stdout, flags=re.M)
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "all"], run.stdout


def test_module_times_split_the_forward_by_kind() -> None:
    times = _benchmark_module("module_times")
    model = timm.create_model("test_flatten_pvt", features_only=True).eval()
    run = times.timed_forward(model)
    spent = run(torch.randn(1, 3, 64, 96))
    assert set(spent) == {"attention", "MLP", "total"}
    assert 0 < spent["attention"] and 0 < spent["MLP"] and spent["attention"] + spent["MLP"] < spent["total"]
    assert run(torch.randn(1, 3, 64, 96)).keys() == spent.keys()  # a second pass starts from zero


def test_param_counts_cover_every_family() -> None:
    counts = _benchmark_module("param_counts")
    names = counts.project_models()
    for prefix in counts.FAMILY_PREFIXES:
        assert any(name.startswith(prefix) for name in names), prefix
    assert not any(name.startswith("test_") for name in names)
    assert set(names) == {name for name in encoder_names() if not name.startswith("test_")}  # no family missed
    assert round(counts.parameter_count("flatten_pvt_tiny") / 1e6, 2) == 12.15  # the README's 12.2M


@pytest.mark.slow
def test_cityscapes_benchmark_prints_every_model_and_the_floor(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(BENCHMARKS.parent))  # this checkout's seg, not an installed one
    run = subprocess.run([sys.executable, str(BENCHMARKS / "cityscapes.py"), "--scale", "0.0625", "--rounds", "1",
                          "--plot", str(tmp_path / "plot.png")], capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^# inference 1x3x64x128 whole image, training 2x3x32x64; 19 classes.*\((AVX|DEFAULT|NO AVX)",
                     run.stdout, flags=re.M), run.stdout
    rows = re.findall(r"^\| (inference|train) \| (.+?) \| ([\d.]+) \| .+ \| (\d+) \|$", run.stdout, flags=re.M)
    models = ["FLatten-PVT-T + Semantic FPN", "PVT-T (softmax) + Semantic FPN", "SegFormer-B0 (smp)",
              "FLatten-Swin-T + UperNet", "Swin-T (softmax windows) + UperNet"]
    assert [(mode, name) for mode, name, _, _ in rows] == [(m, n) for m in ("inference", "train") for n in models]
    floor = re.findall(r"^\| (.+?) \| [\d.]+ \| ([\d.]+)x \(.+\) \| ([\d.]+)x \(.+\) \|$", run.stdout, flags=re.M)
    assert [name for name, _, _ in floor] == [models[0], "FLatten-PVT-T, attention as products + DWC only, + "
                                             "Semantic FPN", "Semantic FPN head + upsampling alone (encoder free)",
                                             models[1], models[2]]
    assert floor[3][1] == "1.00" and floor[4][2] == "1.00"  # each reference against itself
    assert (tmp_path / "plot.png").stat().st_size > 1000
