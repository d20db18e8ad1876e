"""Parts of ``benchmarks/gpu_check.py``: kernel gradients at the paper models' attention shapes, the compiled
kernels' resources on the device, a softmax (SDPA) attention to time against, and a short ``cli.py fit``."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]

# (model, stage, C, h, N, n) at a 512 x 512 crop: FLatten-PVT-T (sr 8, 4, 2, 1: n < N, then n == N) and
# FLatten-Swin-T's linear-attention stages (7 x 7 windows, n == N; head dim 32)
PAPER_SHAPES = [
    ("FLatten-PVT-T", 1, 64, 1, 128 * 128, 16 * 16), ("FLatten-PVT-T", 2, 128, 2, 64 * 64, 16 * 16),
    ("FLatten-PVT-T", 3, 320, 5, 32 * 32, 16 * 16), ("FLatten-PVT-T", 4, 512, 8, 16 * 16, 16 * 16),
    ("FLatten-Swin-T", 1, 96, 3, 49, 49), ("FLatten-Swin-T", 2, 192, 6, 49, 49),
]


def gradient_table(shapes: list[tuple], batch: int, device: torch.device) -> list[str]:
    """bf16 / fp16 output and gradients of the checked Triton path against the float64 closed-form reference:
    largest absolute error over the largest magnitude, per tensor. Raises if the path falls back (the caller
    turns its warning into an error)."""
    from seg.kernels.focused_linear.triton import focused_linear_attention
    from seg.kernels.focused_linear.triton.reference_grads import reference_with_grads

    rows = ["| model | stage | C, h | N, n | dtype | out | dq | dk | dv | dscale |", "|---" * 10 + "|"]
    for model, stage, C, h, N, n in shapes:
        gen = torch.Generator().manual_seed(stage)
        q, k, v = (torch.randn(batch, t, C, generator=gen).to(device) for t in (N, n, n))
        scale = (torch.randn(1, 1, C, generator=gen) * 0.5).to(device)
        grad = torch.randn(batch, N, C, generator=gen).to(device)
        for dtype in (torch.bfloat16, torch.float16):
            leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)] + [scale.clone().requires_grad_()]
            out = focused_linear_attention(*leaves, h, 3.0)
            out.backward(grad.to(dtype))
            got = [out.detach()] + [t.grad for t in leaves]
            want = reference_with_grads(grad.to(dtype).double(), *(t.detach().double() for t in leaves), h, 3.0)
            errs = [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want, strict=True)]
            rows.append(f"| {model} | {stage} | {C}, {h} | {N}, {n} | {str(dtype)[6:]} | "
                        + " | ".join(f"{e:.1e}" for e in errs) + " |")
    return rows


def kernel_resources_table(device: torch.device) -> list[str]:
    """Registers, spills and shared memory of every kernel the run compiled, as the driver loaded them."""
    from seg.kernels.focused_linear.triton import kernels as triton_kernels
    from seg.kernels.focused_linear.triton.tiles import device_shared_limit

    if device.type != "cuda":
        return ["(Triton's interpreter compiles nothing; `python -m seg.kernels.compile_check` compiles every "
                "launch for real targets on CPU)"]
    limit = device_shared_limit(device)
    rows = ["| kernel | configuration | shared (B) | limit (B) | registers | spills |", "|---|---|---|---|---|---|"]
    for name in triton_kernels.__all__:
        fn = getattr(triton_kernels, name)
        for cache in getattr(fn, "device_caches", {}).values():
            for compiled in cache[0].values():
                compiled._init_handles()  # loads the binary: registers and spills as the driver reports them
                config = _configuration(fn, compiled)
                rows.append(f"| {name} | {config} | {compiled.metadata.shared} | {limit} | {compiled.n_regs} "
                            f"| {compiled.n_spills} |")
    return rows


def _configuration(fn, compiled) -> str:
    """The tile parameters a compiled kernel was specialised for, plus its warps and stages."""
    shown = {"BLOCK", "D_PAD", "DC", "BLOCK_R", "BLOCK_C", "IS_QUERY", "DOT_PRECISION"}
    constants = getattr(getattr(compiled, "src", None), "constants", None) or {}
    parts = []
    for key, value in constants.items():
        name = fn.arg_names[key[0]] if isinstance(key, tuple) else key
        if name in shown:
            parts.append(f"{name} {value}")
    meta = compiled.metadata
    return ", ".join(sorted(parts) + [f"{meta.num_warps} warps, {meta.num_stages} stages"])


class SoftmaxAttention(nn.Module):
    """Multi-head softmax attention through ``F.scaled_dot_product_attention`` (the softmax baseline)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


def fit_run(steps: int, device: torch.device) -> list[str]:
    """``cli.py fit`` of the demo model (FLatten-PVTv2-B0 + FPN) on generated data for ``steps`` steps with
    bf16-mixed precision on the GPU: wall time and exit code."""
    if steps <= 0:
        return ["(skipped: --fit-steps 0)"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "cli.py", "fit", "--config", "configs/demo.yaml",
               "--trainer.accelerator", "gpu" if device.type == "cuda" else "cpu",
               "--trainer.precision", "bf16-mixed", "--trainer.max_steps", str(steps),
               "--trainer.val_check_interval", str(steps), "--trainer.num_sanity_val_steps", "0",
               "--trainer.logger", "false", "--checkpoint.dirpath", f"{tmp}/ckpt", "--data.root", f"{tmp}/demo"]
        start = time.perf_counter()
        run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"cli.py fit failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return ["| command | steps | wall (s) | exit |", "|---|---|---|---|",
            f"| cli.py fit --config configs/demo.yaml --trainer.precision bf16-mixed | {steps} | {seconds:.0f} | 0 |"]
