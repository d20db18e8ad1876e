"""Exported vs eager CPU inference of the demo model: onnxruntime against PyTorch, one process, same input.

    python benchmarks/export.py --size 512 --repeats 10

The demo config's segmentor (FLatten-PVTv2-B0 + smp FPN, 12 classes, random weights) is exported with
:mod:`seg.serve.export` (strict ``torch.export`` with dynamic H x W, then the dynamo ONNX exporter) and timed on a
(1, 3, size, size) image: median wall time of ``repeats`` runs after one warm-up, eager under
``torch.inference_mode`` with the ``reference`` attention backend (what is exported) and the ``auto`` backend
(the default CPU fast path), and onnxruntime's CPU provider with as many threads as torch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine, median_time  # noqa: E402

from seg.kernels import set_backend  # noqa: E402
from seg.serve.export import export_onnx, export_program, load_segmentor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    import onnxruntime as ort

    torch.manual_seed(0)
    model = load_segmentor([args.config])
    image = torch.randn(1, 3, args.size, args.size)
    start = time.perf_counter()
    program = export_program(model, image)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(program, Path(tmp) / "model.onnx")
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"image": image.numpy()}
    rows = []
    with torch.inference_mode():
        expected = model(image)["out"]
        rows.append(("PyTorch eager, reference backend", median_time(lambda: model(image), args.repeats)))
        set_backend(model, "auto")
        rows.append(("PyTorch eager, auto backend (CPU fast path)", median_time(lambda: model(image), args.repeats)))
    (got,) = session.run(None, feed)
    diff = float(np.abs(got - expected.numpy()).max())
    rows.append(("onnxruntime (CPU provider)", median_time(lambda: session.run(None, feed), args.repeats)))
    base = rows[0][1]
    print(f"{machine()}; torch {torch.__version__}, onnxruntime {ort.__version__}, {torch.get_num_threads()} threads")
    print(f"demo model at {args.size} x {args.size}, batch 1; export {export_s:.0f} s; ONNX vs eager max |diff| "
          f"{diff:.1e}\n")
    print("| runtime | median ms | vs eager reference |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1e3:.0f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
