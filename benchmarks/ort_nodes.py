"""ONNX Runtime's own profile of the two exported segmentors of ``vs_smp.py``: node time per operator type.

    python benchmarks/ort_nodes.py --size 512 --runs 3

FLatten-PVTv2-B0 + ``segformer`` and ``smp.Segformer("mit_b0")`` (150 classes, random weights) are exported as
``vs_smp.py`` exports them and run ``runs`` times with ONNX Runtime's profiler on (after one warm-up run). The
table gives, per operator type, the nodes per run and their time per run (ms), so layout changes
(``Transpose``, ``ReorderInput`` / ``ReorderOutput`` around NCHWc convolutions) show beside the products. The
last line is a floor: the node time of ours in matrix products, convolutions and resizes alone (``Gemm``,
``MatMul``, ``FusedMatMul``, ``Conv``, ``Upsample``, ``Resize``) against smp's total, the ratio that no
removal of element-wise or layout work can take ours below.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import segmentation_models_pytorch as smp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine  # noqa: E402
from vs_smp import CLASSES, OPSET, _export_smp  # noqa: E402

from seg.model.segmentor import Segmentor  # noqa: E402
from seg.serve.export import export_onnx, export_program  # noqa: E402

PRODUCTS = {"Gemm", "MatMul", "FusedMatMul", "Conv", "FusedConv", "Upsample", "Resize"}


def node_times(path: Path, image: torch.Tensor, runs: int, threads: int, folder: Path) -> tuple[Counter, Counter]:
    """(ms per run, nodes per run) per operator type, from ONNX Runtime's profiler."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
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
    times, counts = Counter(), Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            times[op] += event["dur"] / 1e3 / (runs + 1)
            counts[op] += 1 / (runs + 1)
    return times, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
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
        result = {k: node_times(p, image, args.runs, args.threads, folder) for k, p in paths.items()}
    print(f"# {machine()}; ONNX Runtime node time per run at {args.size}^2, {args.runs} profiled runs")
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


if __name__ == "__main__":
    main()
