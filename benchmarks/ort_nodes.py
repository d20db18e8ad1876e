"""ONNX Runtime's own profile of the two exported segmentors of ``vs_smp.py``: node time per operator type.

    python benchmarks/ort_nodes.py --size 512 --runs 3
    python benchmarks/ort_nodes.py --size 1024 --runs 3 --level extended --floor

FLatten-PVTv2-B0 + ``segformer`` and ``smp.Segformer("mit_b0")`` (150 classes, random weights) are exported as
``vs_smp.py`` exports them and run ``runs`` times with ONNX Runtime's profiler on (after one warm-up run), at
graph optimization ``level`` (``all``: ONNX Runtime's default, convolutions in its blocked NCHWc layout). The
table gives, per operator type, the nodes per run and their time per run (ms): each node's least disturbed run,
summed, which a shared machine disturbs less than a mean. Layout changes (``Transpose``, ``ReorderInput`` /
``ReorderOutput`` around NCHWc convolutions) show beside the products. The last lines are floors: the node time
of ours in matrix products, convolutions and resizes alone (``Gemm``, ``MatMul``, ``FusedMatMul``, ``Conv``,
``Upsample``, ``Resize``) against smp's total, the ratio that no removal of element-wise or layout work can take
ours below; with ``--floor`` also the whole node time of ours reduced to those operations
(``vs_smp.floor_model``: what its graph still needs around them, reorders included) against smp's total.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import segmentation_models_pytorch as smp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine  # noqa: E402
from vs_smp import CLASSES, LEVELS, OPSET, _export_smp, floor_model, session_options  # noqa: E402

from seg.model.segmentor import Segmentor  # noqa: E402
from seg.serve.export import export_onnx, export_program  # noqa: E402

PRODUCTS = {"Gemm", "MatMul", "FusedMatMul", "Conv", "FusedConv", "Upsample", "Resize"}


def node_times(path: Path, image: torch.Tensor, runs: int, threads: int, folder: Path,
               level: str = "all") -> tuple[Counter, Counter]:
    """(ms per run, nodes per run) per operator type from ONNX Runtime's profiler, each node at its fastest run."""
    import onnxruntime as ort

    options = session_options(threads, level)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: image.numpy()}
    session.run(None, feed)  # warm-up, not profiled
    session.end_profiling()
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / path.stem)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    fastest: dict[tuple[str, str], float] = {}  # (operator, node) -> ms of its least disturbed run
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            key = (event["args"]["op_name"], event["name"])
            fastest[key] = min(fastest.get(key, float("inf")), event["dur"] / 1e3)
    times, counts = Counter(), Counter()
    for (op, _), ms in fastest.items():
        times[op] += ms
        counts[op] += 1
    return times, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--level", choices=list(LEVELS), default="all", help="ONNX Runtime graph optimization")
    parser.add_argument("--floor", action="store_true", help="also profile ours reduced to the floor operations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    image = torch.randn(1, 3, args.size, args.size)
    ours = Segmentor("flatten_pvt_v2_b0", decoder="segformer", num_classes=CLASSES, aux_head=False).eval()
    theirs = smp.Segformer("mit_b0", encoder_weights=None, classes=CLASSES).eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = {
            "ours": export_onnx(export_program(ours, image, dynamic=False), folder / "ours.onnx", OPSET),
            "smp": _export_smp(theirs, image, folder / "smp.onnx"),
        }
        if args.floor:
            paths["floor"] = export_onnx(export_program(floor_model(), image, dynamic=False), folder / "floor.onnx",
                                         OPSET)
        result = {k: node_times(p, image, args.runs, args.threads, folder, args.level) for k, p in paths.items()}
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"# {machine()}; ONNX Runtime node time per run at {args.size}^2 (graph optimization {args.level}), "
          f"fastest of {args.runs} profiled runs per node; load average {load}")
    print("| operator | ours nodes | ours ms | smp nodes | smp ms |\n|---|---|---|---|---|")
    (t_ours, n_ours), (t_smp, n_smp) = result["ours"], result["smp"]
    for op in sorted(set(t_ours) | set(t_smp), key=lambda o: -(t_ours[o] + t_smp[o])):
        print(f"| {op} | {n_ours[op]:.0f} | {t_ours[op]:.1f} | {n_smp[op]:.0f} | {t_smp[op]:.1f} |")
    total_ours, total_smp = sum(t_ours.values()), sum(t_smp.values())
    products = sum(v for k, v in t_ours.items() if k in PRODUCTS)
    print(f"| all nodes | {sum(n_ours.values()):.0f} | {total_ours:.1f} | {sum(n_smp.values()):.0f} | "
          f"{total_smp:.1f} |")
    print(f"# node time ours / smp: {total_ours / total_smp:.2f}x; floor (ours' products, convolutions and "
          f"resizes alone / smp's total): {products / total_smp:.2f}x")
    if args.floor:
        t_floor, n_floor = result["floor"]
        print(f"# ours reduced to its products, convolutions and resizes ({sum(n_floor.values()):.0f} nodes): "
              f"{sum(t_floor.values()):.1f} ms, {sum(t_floor.values()) / total_smp:.2f}x smp's node time")


if __name__ == "__main__":
    main()
