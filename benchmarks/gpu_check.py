"""One-command GPU check: backends equal, kernel resources, attention speed, training steps and a short fit,
printed as markdown tables.

    python benchmarks/gpu_check.py                 # on a CUDA machine, meant to finish within 8 minutes
    python benchmarks/gpu_check.py --device cpu    # tiny sizes on CPU (what the test suite runs)

1. Equality: focused linear attention through the reference, the ``triton`` backend and the published
   formulation, each in float32 / bfloat16 / float16 (autocast), against the reference in float64, with
   activations up to |50| (the published fp16 NaN cases); relative error and whether the output is finite.
2. Gradients: the Triton path's bf16 / fp16 output and gradients at each paper model's attention shapes
   (FLatten-PVT-T, FLatten-Swin-T at 512^2) against float64.
3. The compiled kernels' registers, spills and shared memory on the device (after the runs above).
4. Attention forward + backward time at 128^2 and 256^2 tokens (C = 64, one head: d = 64), bfloat16 autocast:
   reference, triton, the published formulation and softmax attention (SDPA).
5. A training step (forward + backward + AdamW, bf16-mixed, 512 x 512 crops, batch 8) of FLatten-PVT-T +
   Semantic FPN and FLatten-Swin-T + UperNet, reference vs triton vs their softmax baselines (``attn_type``
   SSSS): images / s and peak memory above the model's own. On CPU: the ``test_*`` encoders, 64 x 64, batch 2.
6. ``cli.py fit`` of the demo model on generated data, bf16-mixed, 60 steps (GPU only by default).

Stops with an error when the ``triton`` backend falls back to the reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_parts import PAPER_SHAPES, SoftmaxAttention, fit_run, gradient_table, kernel_resources_table  # noqa: E402
from _measure import machine  # noqa: E402
from published_flatten import published_like  # noqa: E402

import seg  # noqa: E402,F401  (registers the encoders)
from seg.data.spec import ADE20K  # noqa: E402
from seg.kernels import set_backend  # noqa: E402
from seg.model.layers import FocusedLinearAttention  # noqa: E402
from seg.model.segmentor import Segmentor  # noqa: E402
from seg.train.weight_decay import param_groups, plan_weight_decay  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    fn()  # warm-up (kernel compilation, autotuning, allocator)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _peak_mib(fn: Callable[[], None], device: torch.device) -> str:
    if device.type != "cuda":
        return "-"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    _sync(device)
    return f"{torch.cuda.max_memory_allocated() / 2**20:.0f}"


def _triton_usable(device: torch.device) -> bool:
    from seg.kernels.focused_linear.triton.launch import triton_available

    return (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1") and triton_available()


def _attention_step(module: torch.nn.Module, x: torch.Tensor, side: int, device: torch.device) -> Callable[[], None]:
    """Forward + backward of one attention layer under bfloat16 autocast."""

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = module(x, (side, side))
        out.float().square().mean().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    return step


def _train_step(model: Segmentor, optimizer: torch.optim.Optimizer, image: torch.Tensor, mask: torch.Tensor,
                device: torch.device) -> Callable[[], None]:
    """Forward + backward + AdamW of a segmentor (main + auxiliary loss) under bf16-mixed."""

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            outputs = model(image)
            loss = F.cross_entropy(outputs["out"], mask) + 0.4 * F.cross_entropy(outputs["aux"], mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _attention(dim: int, heads: int, device: torch.device) -> FocusedLinearAttention:
    torch.manual_seed(0)
    attn = FocusedLinearAttention(dim, heads, grid_size=(56, 56))
    with torch.no_grad():  # exercise the learned temperature and positional encoding too
        attn.scale.normal_(0, 0.5)
        attn.positional_encoding.normal_(0, 0.5)
    return attn.to(device)


def _variants(attn: FocusedLinearAttention, device: torch.device) -> dict[str, torch.nn.Module]:
    """reference / triton / published twins holding the same parameters."""
    import copy

    out = {"reference": set_backend(copy.deepcopy(attn), "reference")}
    if _triton_usable(device):
        out["triton"] = set_backend(copy.deepcopy(attn), "triton")
    out["published"] = published_like(attn)
    torch.manual_seed(0)
    out["sdpa softmax"] = SoftmaxAttention(attn.scale.shape[-1], attn.num_heads).to(next(attn.parameters()).device)
    return out


def equality_table(side: int, dim: int, heads: int, device: torch.device) -> list[str]:
    attn = _attention(dim, heads, device)
    x = (torch.rand(2, side * side, dim, device=device) * 100 - 50)  # activations up to |50|
    with torch.no_grad():
        exact = set_backend(_attention(dim, heads, device).double(), "reference")(x.double(), (side, side))
    variants = _variants(attn, device)
    variants.pop("sdpa softmax")  # another function: not compared
    rows = [f"| dtype | {' | '.join(variants)} |", "|---" * (len(variants) + 1) + "|"]
    for name, dtype in DTYPES.items():
        cells = []
        for module in variants.values():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = module(x, (side, side)).double()
            rel = ((out - exact).norm() / exact.norm()).item()
            cells.append(f"{rel:.1e}" + ("" if torch.isfinite(out).all() else " (non-finite)"))
        rows.append(f"| {name} | {' | '.join(cells)} |")
    return rows


def attention_table(sides: list[int], dim: int, heads: int, repeats: int, device: torch.device) -> list[str]:
    variants = _variants(_attention(dim, heads, device), device)
    names = list(variants)
    rows = ["| tokens | " + " | ".join(f"{k} fwd+bwd (ms)" for k in names) + " | "
            + " | ".join(f"{k} peak (MiB)" for k in names) + " |", "|---" * (2 * len(names) + 1) + "|"]
    for side in sides:
        x = torch.randn(1, side * side, dim, device=device, requires_grad=True)
        steps = [_attention_step(module, x, side, device) for module in variants.values()]
        times = [f"{_median_ms(step, repeats, device):.2f}" for step in steps]
        peaks = [_peak_mib(step, device) for step in steps]
        rows.append(f"| {side}^2 = {side * side} | {' | '.join(times)} | {' | '.join(peaks)} |")
    return rows


def training_table(cases: list[tuple[str, str, str, str]], crop: int, batch: int, repeats: int,
                   device: torch.device) -> list[str]:
    rows = ["| model | attn_type | attn_backend | step (ms) | images / s | peak above the model (MiB) |",
            "|---|---|---|---|---|---|"]
    for encoder, decoder, attn_type, backend in cases:
        torch.manual_seed(0)
        kwargs = dict(attn_type=attn_type, attn_backend=backend)
        model = Segmentor(encoder, decoder, num_classes=ADE20K.num_classes, encoder_kwargs=kwargs).to(device)
        groups = param_groups(model.train().named_parameters(), plan_weight_decay(model, "norms_biases_tables"))
        optimizer = torch.optim.AdamW(groups, lr=6e-5, weight_decay=0.01)
        image = torch.randn(batch, 3, crop, crop, device=device)
        mask = torch.randint(0, 150, (batch, crop, crop), device=device)
        step = _train_step(model, optimizer, image, mask, device)
        ms = _median_ms(step, repeats, device)  # the warm-up step also creates AdamW's state
        own = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        peak = _peak_mib(step, device)
        above = peak if peak == "-" else f"{float(peak) - own / 2**20:.0f}"
        rows.append(f"| {encoder} + {decoder} | {attn_type} | {backend} | {ms:.0f} | {batch / ms * 1e3:.1f} "
                    f"| {above} |")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default: 20 on GPU, 2 on CPU)")
    parser.add_argument("--fit-steps", type=int, default=None, help="cli.py fit steps (default: 60 on GPU, 0 on CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    # the check measures the kernels: a backend that falls back to the reference must stop it, not be reported
    warnings.filterwarnings("error", message="attn_backend 'triton'")
    warnings.filterwarnings("error", message="triton requested but unavailable")
    repeats = args.repeats or (20 if gpu else 2)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # equality is checked in true float32
        sides, crop, batch = [128, 256], 512, 8
        models = [("flatten_pvt_tiny", "semantic_fpn", "LLLL"), ("flatten_swin_tiny", "upernet", "LLSS")]
        shapes, shape_batch = PAPER_SHAPES, 2
    else:
        sides, crop, batch = [16, 24], 64, 2
        models = [("test_flatten_pvt", "semantic_fpn", "LLLL"), ("test_flatten_swin", "upernet", "LLSS")]
        shapes, shape_batch = [("tiny", 1, 64, 2, 64, 16), ("tiny", 2, 96, 3, 49, 49)], 1
    backends = ["reference", "triton"] if _triton_usable(device) else ["reference"]
    cases = [(enc, dec, attn, backend) for enc, dec, attn in models for backend in backends
             if gpu or backend == "reference" or enc == "test_flatten_pvt"]  # interpreter: one triton model
    cases += [(enc, dec, "SSSS", "reference") for enc, dec, _ in models]
    fit_steps = args.fit_steps if args.fit_steps is not None else (60 if gpu else 0)
    dim, heads = 64, 1
    print(f"# gpu_check on {machine() if gpu else device}")
    if not _triton_usable(device):
        print("# triton backend: not usable here (needs CUDA, or TRITON_INTERPRET=1 on CPU); left out")
    print(f"\n## Backends equal (relative error against the float64 reference, {sides[0]}^2 tokens, "
          f"d = {dim // heads}, activations up to |50|)\n")
    print("\n".join(equality_table(sides[0], dim, heads, device)))
    if _triton_usable(device):
        print(f"\n## Triton gradients at the paper models' attention shapes (relative error against float64, "
              f"batch {shape_batch})\n")
        print("\n".join(gradient_table(shapes, shape_batch, device)))
    print(f"\n## Attention forward + backward, bfloat16 autocast, batch 1, d = {dim // heads}, median of {repeats}\n")
    print("\n".join(attention_table(sides, dim, heads, repeats, device)))
    print(f"\n## Training step: forward + backward + AdamW, bf16-mixed, {crop} x {crop} crops, batch {batch}, "
          f"median of {repeats}\n")
    print("\n".join(training_table(cases, crop, batch, repeats, device)))
    print("\n## Compiled Triton kernels on this device\n")
    print("\n".join(kernel_resources_table(device)))
    print("\n## cli.py fit on generated data, bf16-mixed\n")
    print("\n".join(fit_run(fit_steps, device)))


if __name__ == "__main__":
    main()
