"""Export a trained segmentor for whole-image inference outside this project: ONNX or a ``torch.export`` program.

    python -m seg.serve.export --config configs/demo.yaml --ckpt_path logs/demo/checkpoints/best.ckpt \\
        --format onnx --out model.onnx

    python -m seg.serve.export --pretrained pretrained/demo --format onnx --out model.onnx   # or a saved model

The exported graph maps a normalised image (1, 3, H, W) to logits (1, K, H, W) with H and W dynamic. The
model is built from the config files exactly as ``cli.py`` builds it (same parser, same links), the
checkpoint is read with ``weights_only=True`` (by :func:`seg.model.checkpoint.load_checkpoint`, which lists the
names that do not match), and every attention is switched to the ``reference`` backend
(the ``cpu`` backend calls a private oneDNN operator that exporters cannot trace).

Both formats start from one strict ``torch.export.export`` with dynamic height and width; ONNX is then
written by the dynamo exporter (``onnxscript``, opset 18 or later); :func:`size_range` gives the sizes the
program accepts. Swin stages with shifted-window softmax attention (``S`` in ``attn_type``, the default
``LLSS``) build their window grid, padding and shift mask per size in Python: such models export at a fixed
size only (``--static``, traced at ``--height`` x ``--width``).

Two parts trace a different arrangement of the same sums when exporting (:func:`seg.kernels.tracing.exporting`),
to spare the graph layout changes the maths does not need: focused linear attention's DWC runs as one
depthwise conv over all C channels of the token map (the d filters repeated per head, no per-head transposes;
:func:`seg.kernels.focused_linear.rank_restoration`), and the ``segformer`` head's per-level products as 1x1
convs on the level maps, which ONNX Runtime keeps in its blocked NCHWc layout through the resizes and adds up
to the classifier (:class:`seg.model.heads.segformer.SegFormerHead`; BENCHMARKS.md, "Against smp's SegFormer-B0").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg.kernels import set_backend
from seg.model.layers import WindowAttention
from seg.model.segmentor import Segmentor
from seg.serve.predictor import Predictor
from seg.train.pretrained import from_config

__all__ = ["ExportFormat", "WholeImage", "export_onnx", "export_program", "load_predictor", "load_segmentor", "main",
           "preprocessing"]

ExportFormat = Literal["onnx", "torch_export"]
MIN_OPSET = 18


class WholeImage(nn.Module):
    """Whole-image inference of a segmentor: normalised image (B, 3, H, W) -> logits (B, K, H, W)."""

    def __init__(self, model: Segmentor) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return self.model(image)["out"]


def load_predictor(
    configs: Sequence[str] = (),
    ckpt_path: str | None = None,
    overrides: Sequence[str] = (),
    pretrained: str | None = None,
) -> Predictor:
    """The model to export with its preprocessing, the segmentor in eval mode on the ``reference`` attention backend.

    Args:
        configs: config files, composed in order as ``cli.py --config a --config b`` does; the model is built
            as ``cli.py`` builds it (:func:`seg.train.pretrained.from_config`).
        ckpt_path: a Lightning checkpoint of :class:`~seg.train.task.SegmentationTask`, or a plain state dict of the
            segmentor, read by :func:`seg.model.checkpoint.load_checkpoint` (``weights_only=True``; a mismatch lists
            the names); None keeps the initial weights.
        overrides: extra command-line style arguments, e.g. ``["--data.spec.num_classes", "5"]``.
        pretrained: instead of configs: a saved model (a folder or a Hub id, ``Predictor.from_pretrained``).
    """
    if pretrained is not None:
        if configs or ckpt_path or overrides:
            raise ValueError("give either a saved model (pretrained) or configs with a checkpoint, not both")
        predictor = Predictor.from_pretrained(pretrained)
    else:
        args = [arg for path in configs for arg in ("--config", str(path))] + list(overrides)
        predictor = from_config(args, ckpt_path)
    set_backend(predictor.model, "reference")
    predictor.model.eval()
    return predictor


def load_segmentor(
    configs: Sequence[str] = (),
    ckpt_path: str | None = None,
    overrides: Sequence[str] = (),
    pretrained: str | None = None,
) -> Segmentor:
    """The segmentor of :func:`load_predictor` (same arguments)."""
    return load_predictor(configs, ckpt_path, overrides, pretrained).model


def preprocessing(predictor: Predictor) -> str:
    """What the exported graph expects of its input, in words: the predictor's evaluation preprocessing."""
    long, short = predictor.test_scale
    mean = ", ".join(f"{v:g}" for v in predictor.mean)
    std = ", ".join(f"{v:g}" for v in predictor.std)
    return (f"input: an RGB photo rescaled to fit {long} x {short} (long x short side, keeping its aspect ratio), "
            f"then (x - mean) / std per channel on the 8-bit pixel scale, mean ({mean}), std ({std})")


def export_supported() -> bool:
    """Whether this torch's ``torch.export`` can trace the models: automatic dynamic sizes
    (``torch.export.Dim.AUTO``) and autocast regions inside the graph. torch 2.4 has neither."""
    return hasattr(torch.export.Dim, "AUTO")


def _dynamic_hw() -> dict[str, dict[int, Any]]:
    return {"image": {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}


class BinAveragePool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` written with sums over an integral image, so that an exported graph computes
    its bins from the input size at run time (the exporters' own decomposition fixes index tables at the
    traced size: UperNet's 6 x 6 pyramid pooling then fails at other sizes). Bin i of an axis of n cells
    covers [floor(i n / s), ceil((i + 1) n / s)), as PyTorch's."""

    def forward(self, x: Tensor) -> Tensor:
        size = self.output_size if isinstance(self.output_size, tuple) else (self.output_size,) * 2
        for axis, bins in zip((2, 3), size, strict=True):
            bins = x.shape[axis] if bins is None else bins
            n = x.shape[axis]
            i = torch.arange(bins, device=x.device)
            start, end = (i * n) // bins, ((i + 1) * n + bins - 1) // bins  # (bins,) cell ranges
            integral = F.pad(x.cumsum(axis), (0, 0, 1, 0) if axis == 2 else (1, 0))  # n + 1 along the axis
            width = (end - start).to(x.dtype)
            if axis == 2:
                x = (integral[:, :, end] - integral[:, :, start]) / width[:, None]  # (B, C, bins, W)
            else:
                x = (integral[..., end] - integral[..., start]) / width  # (B, C, H', bins)
        return x


def replace_adaptive_pooling(model: nn.Module) -> nn.Module:
    """Replace every ``nn.AdaptiveAvgPool2d`` of ``model`` by a :class:`BinAveragePool2d` of the same output
    size (same computation, bins computed from the traced size at run time). Returns ``model``."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.AdaptiveAvgPool2d:
                setattr(parent, name, BinAveragePool2d(child.output_size))
    return model


def export_program(model: Segmentor, example: Tensor, dynamic: bool = True) -> torch.export.ExportedProgram:
    """Strict ``torch.export`` of whole-image inference, traced at ``example``'s size.

    Args:
        model: the segmentor (switched to the ``reference`` attention backend here).
        example: a (1, 3, H, W) image.
        dynamic: dynamic H and W; False fixes the graph to ``example``'s size.

    Raises:
        ValueError: dynamic export of a model with shifted-window softmax attention, whose window grid,
            padding and shift mask are built per size in Python (export it with ``dynamic=False``).
        RuntimeError: a torch whose exporter cannot trace the models (torch 2.4), or a trace that fixed the
            height or width to the example's (a size-dependent branch).
    """
    if not export_supported():
        raise RuntimeError(f"torch {torch.__version__} cannot export these models (its torch.export lacks "
                           "Dim.AUTO and fails on autocast regions): upgrade torch to export")
    set_backend(model, "reference")
    replace_adaptive_pooling(model)
    if dynamic and any(isinstance(m, WindowAttention) for m in model.modules()):
        raise ValueError("window attention (Swin 'S' stages) builds its window grid and shift mask per size: "
                         "export it at a fixed size (dynamic=False, --static) or use attn_type without 'S'")
    wrapper = WholeImage(model).eval()
    with torch.no_grad():
        program = torch.export.export(wrapper, (example,), dynamic_shapes=_dynamic_hw() if dynamic else None,
                                      strict=True)
    if not dynamic:
        return program
    image = next(node for node in program.graph.nodes if node.op == "placeholder" and node.name == "image")
    fixed = [name for name, dim in zip("HW", image.meta["val"].shape[2:], strict=True) if isinstance(dim, int)]
    if fixed:
        raise RuntimeError(f"torch.export fixed {' and '.join(fixed)} to the example's size {tuple(example.shape)}")
    return program


def size_range(program: torch.export.ExportedProgram) -> dict[str, tuple[int, float]]:
    """{'H': (min, max), 'W': (min, max)} of the image sizes the program accepts (max may be inf)."""
    image = next(node for node in program.graph.nodes if node.op == "placeholder" and node.name == "image")
    ranges = {}
    for name, dim in zip("HW", image.meta["val"].shape[2:], strict=True):
        if isinstance(dim, int):
            ranges[name] = (dim, dim)
            continue
        bounds = program.range_constraints[dim.node.expr]
        ranges[name] = (int(bounds.lower), _bound(bounds.upper))
    return ranges


def _bound(value: Any) -> float:
    """A sympy upper bound as an int, or inf (sympy's and torch's integer infinities alike)."""
    try:
        return int(value)
    except (OverflowError, TypeError, ValueError, AttributeError):
        return float("inf")


def export_onnx(program: torch.export.ExportedProgram, path: str | Path, opset: int = MIN_OPSET) -> Path:
    """Write the program as ONNX with the dynamo exporter (inputs ``image``, outputs ``logits``)."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} < {MIN_OPSET}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(program, (), str(path), dynamo=True, opset_version=opset, input_names=["image"],
                      output_names=["logits"], external_data=False, verbose=False)
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m seg.serve.export", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", default=[], help="config file (repeat to compose)")
    parser.add_argument("--ckpt_path", default=None, help="Lightning checkpoint (weights_only); none: initial weights")
    parser.add_argument("--pretrained", default=None, help="instead of --config: a saved model (folder or Hub id)")
    parser.add_argument("--format", choices=["onnx", "torch_export"], default="onnx")
    parser.add_argument("--out", required=True, help="output file (.onnx, or .pt2 for torch_export)")
    parser.add_argument("--height", type=int, default=512, help="example image height the graph is traced at")
    parser.add_argument("--width", type=int, default=512, help="example image width the graph is traced at")
    parser.add_argument("--opset", type=int, default=MIN_OPSET)
    parser.add_argument("--static", action="store_true", help="fix H x W to --height x --width")
    args, overrides = parser.parse_known_args(argv)
    if bool(args.config) == bool(args.pretrained):
        parser.error("give either --config <experiment>.yaml [--ckpt_path FILE] or --pretrained DIR")
    predictor = load_predictor(args.config, args.ckpt_path, overrides, args.pretrained)
    model = predictor.model
    program = export_program(model, torch.randn(1, 3, args.height, args.width), dynamic=not args.static)
    sizes = ", ".join(f"{k} in [{lo}, {hi}]" for k, (lo, hi) in size_range(program).items())
    if args.format == "onnx":
        out = export_onnx(program, args.out, args.opset)
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(out))
    print(f"wrote {out} ({args.format}; image (1, 3, H, W) -> logits (1, {model.num_classes}, H, W), {sizes})")
    print(preprocessing(predictor))
    return out


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
