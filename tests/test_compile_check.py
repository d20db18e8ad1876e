"""``python -m seg.kernels.compile_check``: the Triton launches the plan chooses compile for real GPU targets on CPU
and fit their shared memory (one compile in the default run; the paper head dims under ``-m slow``)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from seg.kernels import compile_check
from seg.kernels.focused_linear.triton.tiles import (
    ARCH_SHARED_LIMIT,
    PAD_HEAD_DIMS,
    Tiles,
    choose_tiles,
    pad_head_dim,
    tile_options,
)

# the plan and the checks need no Triton; compiling does, and not under the interpreter
needs_compiler = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") == "1",
    reason="compiles real kernels with Triton's compiler (not installed, or interpreted)",
)


def test_plan_chooses_tiles_within_every_target_limit() -> None:
    """For head dims 16-128, every dtype and every checked target, the chosen entry states a bound within the
    target's shared memory; the largest limit gets the fastest entry, the smallest a leaner one where needed."""
    for arch, limit in ARCH_SHARED_LIMIT.items():
        for d in range(16, 129, 8):
            for dtype in compile_check.DTYPES.values():
                tiles = choose_tiles(pad_head_dim(d), dtype, limit)
                assert tiles.shared_bound <= limit, (arch, d, dtype, tiles)
    assert choose_tiles(128, torch.bfloat16, ARCH_SHARED_LIMIT[90]) == tile_options(128, torch.bfloat16)[0]
    assert choose_tiles(128, torch.bfloat16, ARCH_SHARED_LIMIT[89]) == tile_options(128, torch.bfloat16)[-1]
    assert pad_head_dim(40) == 64 and pad_head_dim(8) == 16 and pad_head_dim(128) == 128


def test_launches_cover_every_kernel_and_configuration() -> None:
    todo = compile_check.launches([86, 90], list(PAD_HEAD_DIMS), list(compile_check.DTYPES))
    assert len(todo) == 2 * (len(PAD_HEAD_DIMS) * 3 * (len(compile_check.KERNELS) - 1) + 3)  # row_stats: per dtype
    assert {la.kernel for la in todo} == set(compile_check.KERNELS)
    with pytest.raises(ValueError, match="sm_75"):
        compile_check.launches([75], [32], ["float32"])


def test_check_fails_over_the_target_limit_or_the_stated_bound() -> None:
    """A result over the target's limit, over its entry's bound, or a failed compile fails the check."""
    tiles = Tiles(64, 64, 4, 2, shared_bound=96 * 1024)
    launch = compile_check.Launch(89, "summary_kernel", 64, "bfloat16", tiles)
    assert compile_check.Result(launch, 90_000, 100, 0).problems() == []
    assert "exceeds the target's 101376 B" in compile_check.Result(launch, 102_400, 100, 0).problems()[0]
    over_bound = compile_check.Result(launch, 99_000, 100, 0).problems()
    assert over_bound and "stated bound" in over_bound[0]
    assert "compile failed" in compile_check.Result(launch, None, None, None, "RuntimeError: x").problems()[0]
    assert "| sm_89 | summary_kernel |" in compile_check.table([compile_check.Result(launch, 90_000, 100, 0)])[2]


@needs_compiler
def test_too_large_tiles_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    """A deliberately large tile (256 tokens, 3 stages) needs more than sm_89's 99 KB: the command exits 1."""
    code = compile_check.main(["--arch", "89", "--head-dims", "64", "--dtypes", "bfloat16", "--kernels",
                               "summary_kernel", "--tiles", "256,64,4,3", "--jobs", "1"])
    out = capsys.readouterr().out
    assert code == 1 and "exceeds the target's 101376 B" in out, out


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("arch", [86, 90])
def test_paper_head_dims_compile_and_fit(arch: int, capsys: pytest.CaptureFixture[str]) -> None:
    """Head dims 32 and 64 (the paper models), every dtype and kernel: exit 0 with a row per launch."""
    code = compile_check.main(["--arch", str(arch), "--head-dims", "32", "64", "--jobs", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count(f"| sm_{arch} |") == 2 * 3 * (len(compile_check.KERNELS) - 1) + 3, out  # row_stats: per dtype
