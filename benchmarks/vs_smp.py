"""CPU inference against the segmenter a practitioner would otherwise pick: smp's MiT-B0 and SegFormer-B0.

    python benchmarks/vs_smp.py                                   # both sizes, eager and ONNX Runtime
    python benchmarks/vs_smp.py --sizes 512 --runtimes eager --rounds 9

Pairs (ours / smp), each at every size, batch 1, 150 classes, random weights, inference only:

- ``encoder``: FLatten-PVTv2-B0 ``features_only`` against smp's ``mit_b0`` encoder (eager only).
- ``segmentor``: FLatten-PVTv2-B0 + ``segformer`` head (``Segmentor``, no auxiliary head) against
  ``smp.Segformer("mit_b0")``; both return full-size logits (B, 150, H, W).
- ``segmentor/ort``: the same two models exported (``torch.export`` at a fixed size, the dynamo ONNX exporter at
  opset 20; ours through :mod:`seg.serve.export`) and run in ONNX Runtime's CPU provider with the same thread count and
  graph optimization level (``--ort-levels``: ``all``, ONNX Runtime's default, which runs convolutions in its
  blocked NCHWc layout, and / or ``extended``, which does not; a level other than ``all`` names its rows).
- ``segmentor/ort floor`` (``--floor``): ours reduced to its products, convolutions and resizes, against the full
  smp model: every focused linear attention replaced by its products and DWC
  (:class:`products_only.ProductsOnly`), LayerNorms and GELUs by identities; the head, the patch embeddings and
  the residual adds as they are. No removal of element-wise or layout work takes ours below this ratio.

Each round times both models of a pair back to back, who goes first alternating, ``repeats`` calls each (the
round's time is their minimum, the least disturbed call on a shared machine); a ratio is the median over rounds
of the per-round ratio ours / smp, so drift of a shared machine reaches both alike. The header names the CPU,
its vector ISA and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import segmentation_models_pytorch as smp
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine  # noqa: E402
from products_only import products_only  # noqa: E402

from seg.model.segmentor import Segmentor  # noqa: E402
from seg.serve.export import export_onnx, export_program  # noqa: E402

Run = Callable[[], object]
CLASSES = 150
OPSET = 20  # both models at the exporter's default opset (ONNX's own Gelu op from 20 on; opset 18 spells it with Erf)


def _eager(model: torch.nn.Module, image: torch.Tensor) -> Run:
    def run() -> object:
        with torch.inference_mode():
            return model(image)

    return run


LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC"}


def session_options(threads: int, level: str = "all"):  # -> onnxruntime.SessionOptions
    """``threads`` intra-op threads, one inter-op thread, the graph optimization ``level`` (a key of LEVELS)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    return options


def _session(path: Path, threads: int, level: str = "all"):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads, level), providers=["CPUExecutionProvider"])


def _ort(session, image: torch.Tensor) -> Run:
    feed = {session.get_inputs()[0].name: image.numpy()}
    return lambda: session.run(None, feed)


def _export_smp(model: torch.nn.Module, image: torch.Tensor, path: Path) -> Path:
    """smp's segmentor through the same exporters (fixed size)."""
    with torch.no_grad():
        program = torch.export.export(model.eval(), (image,), strict=False)
    torch.onnx.export(program, (), str(path), dynamo=True, opset_version=OPSET, input_names=["image"],
                      output_names=["logits"], external_data=False, verbose=False)
    return path


def floor_model() -> torch.nn.Module:
    """FLatten-PVTv2-B0 + ``segformer`` reduced to its products, convolutions and resizes (the floor)."""
    model = products_only(Segmentor("flatten_pvt_v2_b0", decoder="segformer", num_classes=CLASSES, aux_head=False))
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) in (torch.nn.LayerNorm, torch.nn.GELU):
                setattr(parent, name, torch.nn.Identity())
    return model.eval()


def pairs(size: int, runtimes: list[str], threads: int, folder: Path, levels: tuple[str, ...] = ("all",),
          floor: bool = False) -> dict[str, tuple[Run, Run]]:
    """{name: (ours, smp)} at one image size."""
    torch.manual_seed(0)
    image = torch.randn(1, 3, size, size)
    ours_encoder = timm.create_model("flatten_pvt_v2_b0", features_only=True).eval()
    smp_encoder = smp.encoders.get_encoder("mit_b0", weights=None).eval()
    ours = Segmentor("flatten_pvt_v2_b0", decoder="segformer", num_classes=CLASSES, aux_head=False).eval()
    theirs = smp.Segformer("mit_b0", encoder_weights=None, classes=CLASSES).eval()
    out: dict[str, tuple[Run, Run]] = {}
    if "eager" in runtimes:
        out["encoder"] = (_eager(ours_encoder, image), _eager(smp_encoder, image))
        out["segmentor"] = (_eager(ours, image), _eager(theirs, image))
    if "ort" in runtimes:
        mine = export_onnx(export_program(ours, image, dynamic=False), folder / f"ours_{size}.onnx", OPSET)
        other = _export_smp(theirs, image, folder / f"smp_{size}.onnx")
        least = None
        if floor:
            least = export_onnx(export_program(floor_model(), image, dynamic=False), folder / f"floor_{size}.onnx",
                                OPSET)
        for level in levels:
            suffix = "" if level == "all" else f" ({level})"
            smp_run = _ort(_session(other, threads, level), image)
            out[f"segmentor/ort{suffix}"] = (_ort(_session(mine, threads, level), image), smp_run)
            if least is not None:
                out[f"segmentor/ort floor{suffix}"] = (_ort(_session(least, threads, level), image), smp_run)
    return out


def _time(run: Run, repeats: int) -> float:
    """The least disturbed of ``repeats`` calls (seconds): on a shared machine other work only adds time."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def compare(ours: Run, theirs: Run, rounds: int, repeats: int) -> tuple[float, float, float, list[float]]:
    """(median ours s, median smp s, median per-round ratio, the ratios), first model alternating."""
    ours(), theirs()  # warm-up
    mine, other, ratios = [], [], []
    for r in range(rounds):
        order = [(0, ours), (1, theirs)] if r % 2 == 0 else [(1, theirs), (0, ours)]
        got = {}
        for key, run in order:
            got[key] = _time(run, repeats)
        mine.append(got[0])
        other.append(got[1])
        ratios.append(got[0] / got[1])
    return statistics.median(mine), statistics.median(other), statistics.median(ratios), ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--runtimes", nargs="+", choices=["eager", "ort"], default=["eager", "ort"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ort-levels", nargs="+", choices=list(LEVELS), default=["all"],
                        help="ONNX Runtime graph optimization levels, one row per level (default: all)")
    parser.add_argument("--floor", action="store_true",
                        help="also ours reduced to its products, convolutions and resizes (ONNX Runtime)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {machine()}; smp {smp.__version__}")
    print(f"# load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"{args.rounds} rounds x {args.repeats} calls, first model alternating")
    print("| pair | size | ours (ms) | smp (ms) | ratio ours/smp (median of rounds) | per-round range |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for name, (ours, theirs) in pairs(size, args.runtimes, args.threads, Path(tmp), tuple(args.ort_levels),
                                                   args.floor).items():
                a, b, ratio, ratios = compare(ours, theirs, args.rounds, args.repeats)
                print(f"| {name} | {size}^2 | {a * 1e3:.0f} | {b * 1e3:.0f} | **{ratio:.2f}x** | "
                      f"{min(ratios):.2f}-{max(ratios):.2f} |", flush=True)
    print(f"# load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
