"""Compile every Triton launch the focused-linear-attention plan can choose, for real GPU targets, on CPU.

    python -m seg.kernels.compile_check --arch 80 86 89 90
    python -m seg.kernels.compile_check --arch 89 --head-dims 32 64 --dtypes bfloat16

For each target (compute capability), padded head dim and input dtype, the tiles the launch plan chooses for
that target's shared memory (:func:`seg.kernels.focused_linear.triton.tiles.choose_tiles`) are compiled with
Triton's real compiler, ptxas included; no GPU is needed. Prints a markdown table (kernel, configuration,
dtype, shared memory, the target's limit, registers and stack frame from ``cuobjdump -res-usage``) and exits 1
when a launch fails to compile, needs more shared memory than the target offers, or more than its tile entry
states (the bound the plan chose it by). ``--tiles BLOCK,DC,WARPS,STAGES`` compiles one given configuration
instead of the plan's (to try a change). Run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from seg.kernels.focused_linear.triton.tiles import ARCH_SHARED_LIMIT, PAD_HEAD_DIMS, Tiles, choose_tiles

__all__ = ["Launch", "Result", "compile_launch", "launches", "main"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# pointer arguments holding token tensors in the input dtype; every other pointer is float32
_TOKEN_POINTERS = {"x_ptr", "q_ptr", "k_ptr", "v_ptr", "out_ptr", "grad_out_ptr", "other_ptr", "grad_x_ptr",
                   "grad_v_ptr"}
_ROW_STATS_TILES = Tiles(16, 256, 4, 1, 0)  # BLOCK_R, BLOCK_C of row_stats_kernel (see triton.launch._Plan)
KERNELS = ("row_stats_kernel", "summary_kernel", "apply_kernel", "query_grad_summary_kernel", "key_grad_kernel",
           "input_grad_kernel[queries]", "input_grad_kernel[keys]")


@dataclass(frozen=True)
class Launch:
    """One compile: a kernel with its tiles for a padded head dim, input dtype and target."""

    arch: int
    kernel: str
    d_pad: int
    dtype: str
    tiles: Tiles


@dataclass(frozen=True)
class Result:
    launch: Launch
    shared: int | None  # bytes of shared memory per block, None when the compile failed
    registers: int | None
    stack: int | None
    error: str = ""

    def problems(self) -> list[str]:
        """What makes this launch fail the check (empty when it passes)."""
        if self.error:
            return [f"compile failed: {self.error}"]
        limit = ARCH_SHARED_LIMIT[self.launch.arch]
        found = []
        if self.shared > limit:
            found.append(f"{self.shared} B exceeds the target's {limit} B")
        if self.launch.kernel != "row_stats_kernel" and self.shared > self.launch.tiles.shared_bound:
            found.append(f"{self.shared} B exceeds the entry's stated bound {self.launch.tiles.shared_bound} B")
        return found


def launches(archs: list[int], head_dims: list[int], dtypes: list[str], kernels: list[str] | None = None,
             tiles: Tiles | None = None) -> list[Launch]:
    """Every launch the plan makes for these targets, padded head dims and dtypes (or with ``tiles``)."""
    out = []
    for arch in archs:
        if arch not in ARCH_SHARED_LIMIT:
            raise ValueError(f"no shared memory limit known for sm_{arch}; known: {sorted(ARCH_SHARED_LIMIT)}")
        for d_pad in head_dims:
            for dtype in dtypes:
                chosen = tiles or choose_tiles(d_pad, DTYPES[dtype], ARCH_SHARED_LIMIT[arch])
                for kernel in kernels or KERNELS:
                    if kernel == "row_stats_kernel":  # tiled over tokens and all C channels: one launch per dtype
                        out.append(Launch(arch, kernel, 0, dtype, _ROW_STATS_TILES))
                    else:
                        out.append(Launch(arch, kernel, d_pad, dtype, chosen))
    return list(dict.fromkeys(out))


def _signature(fn, dtype: torch.dtype, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + (_TRITON_TYPE[dtype] if name in _TOKEN_POINTERS else "fp32")
        else:
            sig[name] = "fp32" if name == "inv_n" else "i32"
    return sig


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack frame bytes) of a cubin from ``cuobjdump -res-usage``, None where not reported."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None, None
    reg, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    return (int(reg.group(1)) if reg else None), (int(stack.group(1)) if stack else None)


def compile_launch(launch: Launch) -> Result:
    """Compile one launch for its target with Triton's compiler; never raises."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from seg.kernels.focused_linear.triton import kernels as triton_kernels

        dtype, t = DTYPES[launch.dtype], launch.tiles
        name, _, role = launch.kernel.partition("[")
        fn = getattr(triton_kernels, name)
        if name == "row_stats_kernel":
            constexprs = dict(BLOCK_R=16, BLOCK_C=256, P=3.0, P_INT=3)
            options = {"num_warps": 4}
        else:
            constexprs = dict(BLOCK=t.block, D_PAD=launch.d_pad, DC=min(t.chunk, launch.d_pad), P=3.0, P_INT=3,
                              DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")
            if role:
                constexprs["IS_QUERY"] = role == "queries]"
            options = {"num_warps": t.num_warps, "num_stages": t.num_stages}
        compiled = triton.compile(ASTSource(fn, _signature(fn, dtype, constexprs), constexprs),
                                  target=GPUTarget("cuda", launch.arch, 32), options=options)
        registers, stack = _resources(compiled.asm["cubin"])
        return Result(launch, int(compiled.metadata.shared), registers, stack)
    except Exception as err:
        return Result(launch, None, None, None, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")


def table(results: list[Result]) -> list[str]:
    """The markdown table of the results."""
    rows = ["| target | kernel | configuration | dtype | shared (B) | limit (B) | registers | stack (B) | check |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        la = r.launch
        config = "BLOCK_R 16, BLOCK_C 256" if la.kernel == "row_stats_kernel" else f"D_PAD {la.d_pad}, " \
            + la.tiles.label()
        problems = "; ".join(r.problems()) or "ok"
        shared, regs, stack = ("-" if x is None else x for x in (r.shared, r.registers, r.stack))
        rows.append(f"| sm_{la.arch} | {la.kernel} | {config} | {la.dtype} | {shared} | {ARCH_SHARED_LIMIT[la.arch]} "
                    f"| {regs} | {stack} | {problems} |")
    return rows


def _parse_tiles(text: str) -> Tiles:
    block, chunk, warps, stages = (int(part) for part in text.split(","))
    return Tiles(block, chunk, warps, stages, shared_bound=10**9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seg.kernels.compile_check", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 86, 89, 90], help="compute capabilities")
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(PAD_HEAD_DIMS),
                        help=f"padded head dims, of {PAD_HEAD_DIMS}")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=None)
    parser.add_argument("--tiles", type=_parse_tiles, default=None, help="BLOCK,DC,WARPS,STAGES instead of the plan's")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles run in parallel")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter defines no kernels to compile")
    todo = launches(args.arch, args.head_dims, args.dtypes, args.kernels, args.tiles)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(compile_launch, todo))
    print("\n".join(table(results)))
    failed = [r for r in results if r.problems()]
    print(f"\n{len(results)} launches compiled, {len(failed)} failed the check")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
