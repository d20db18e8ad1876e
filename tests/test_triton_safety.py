"""The checked Triton path (``seg.kernels.focused_linear.triton.checked``): half-precision kernels against float64, the
fallback to the reference on failing launches, disagreements and unsupported inputs, and the registered operator
under ``torch.compile``; run through Triton's interpreter in a child process (see ``_triton_worker``)."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import pytest
import torch
from _triton_worker import Worker

pytest.importorskip("triton", reason="triton is not installed")

# largest absolute error over the largest reference magnitude, against float64 on the same rounded inputs
HALF_TOLERANCE = {"bfloat16": 2e-2, "float16": 4e-3}


@pytest.fixture(scope="module")
def worker():
    child = Worker(Path(__file__).stem)
    yield child
    child.close()


# ---------------------------------------------------------------------------------------------------------------
# checks, run inside the interpreter process


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _problem(h: int, d: int, N: int, n: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """q (1, N, C) as a chunk of a fused (1, N, 3C) projection, k and v (1, n, C) chunks of a (1, n, 2C) one (strided,
    as the layer passes them), scale (1, 1, C) float32 and an upstream gradient (1, N, C), all leaves."""
    gen = torch.Generator().manual_seed(seed)
    C = h * d
    qkv = torch.randn(1, N, 3 * C, generator=gen).to(dtype)
    kv = torch.randn(1, n, 2 * C, generator=gen).to(dtype)
    scale = torch.randn(1, 1, C, generator=gen) * 0.5
    grad = torch.randn(1, N, C, generator=gen).to(dtype)
    return [qkv[..., :C], kv[..., :C], kv[..., C:], scale, grad]


def _run(fn, q, k, v, scale, grad, h: int) -> list[torch.Tensor]:
    """Output and gradients (q, k, v, scale) of ``fn(q, k, v, scale, h, 3.0)``."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v, scale)]
    out = fn(*leaves, h, 3.0)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _reference64(q, k, v, scale, grad, h: int) -> list[torch.Tensor]:
    from seg.kernels.focused_linear.reference import focused_linear_attention_tokens

    return _run(focused_linear_attention_tokens, *(t.double() for t in (q, k, v, scale, grad)), h)


def check_half_matches_float64(dtype_name: str, h: int, d: int, N: int, n: int) -> None:
    """Kernels in bf16 / fp16 (strided inputs), forward and all four gradients, against float64."""
    from seg.kernels.focused_linear.triton.launch import focused_linear_attention_triton

    dtype = getattr(torch, dtype_name)
    problem = _problem(h, d, N, n, dtype)
    assert not problem[0].is_contiguous()
    actual = _run(focused_linear_attention_triton, *problem, h)
    expected = _reference64(*problem, h)
    for name, a, e in zip(("out", "q", "k", "v", "scale"), actual, expected, strict=True):
        assert a.dtype == (torch.float32 if name == "scale" else dtype), (name, a.dtype)
        assert _rel_err(a, e) < HALF_TOLERANCE[dtype_name], (name, _rel_err(a, e))


def _fresh_checked_entry():
    from seg.kernels.focused_linear.triton import checked

    checked._verdicts.clear()
    checked._warned.clear()
    return checked


def _assert_reference_with_warning(match: str, h: int, problem: list[torch.Tensor]) -> None:
    """The checked entry warns once (message matching ``match``) and returns the reference's output and gradients."""
    from seg.kernels.focused_linear.triton import checked

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = _run(checked.focused_linear_attention, *problem, h)
    messages = [str(w.message) for w in caught if "attn_backend 'triton'" in str(w.message)]
    assert len(messages) == 1 and match in messages[0], messages
    expected = _reference64(*problem, h)
    for name, a, e in zip(("out", "q", "k", "v", "scale"), actual, expected, strict=True):
        assert _rel_err(a, e) < 1e-5, (name, _rel_err(a, e))


def check_failing_launch_falls_back() -> None:
    """A launch error after the probe passed (forward, then backward): one warning each, the reference's results."""
    from seg.kernels.focused_linear.triton import launch

    checked = _fresh_checked_entry()
    problem = _problem(2, 16, 24, 24, torch.float32)
    _run(checked.focused_linear_attention, *problem, 2)  # probes: the kernels are trusted
    assert list(checked._verdicts.values()) == [None], checked._verdicts
    original = launch.forward, launch.backward

    def out_of_resources(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory, Required: 116224, Hardware limit: 101376")

    try:
        launch.forward = out_of_resources
        _assert_reference_with_warning("out of resource", 2, problem)
        assert "RuntimeError" in checked._verdicts[("cpu", torch.float32, 16, True, 3.0)]
        checked = _fresh_checked_entry()
        launch.forward, launch.backward = original[0], out_of_resources
        _assert_reference_with_warning("out of resource", 2, problem)  # the forward ran the kernels
    finally:
        launch.forward, launch.backward = original
        _fresh_checked_entry()


def check_disagreement_falls_back() -> None:
    """Kernels that compute a wrong gradient fail the probe: the reference runs, with the reason."""
    from seg.kernels.focused_linear.triton import launch

    _fresh_checked_entry()
    original = launch.backward

    def wrong_backward(*args, **kwargs):
        grad_q, grad_k, grad_v, grad_r = original(*args, **kwargs)
        return grad_q, grad_k * 1.01, grad_v, grad_r

    try:
        launch.backward = wrong_backward
        _assert_reference_with_warning("(dk at head dim 13: relative error", 2, _problem(2, 16, 24, 9, torch.float32))
    finally:
        launch.backward = original
        _fresh_checked_entry()


def check_unsupported_inputs_fall_back() -> None:
    """float64 and head dims over 128 run the reference, with a warning naming the reason; never an error."""
    _fresh_checked_entry()
    _assert_reference_with_warning("float64", 2, _problem(2, 16, 12, 12, torch.float64))
    _assert_reference_with_warning("head dim 160 exceeds 128", 1, _problem(1, 160, 6, 6, torch.float32))
    _fresh_checked_entry()


def check_compiled_module() -> None:
    """``torch.compile`` (one graph) of a layer with attn_backend 'triton' runs the kernels' forward and backward
    and equals the reference layer."""
    import copy

    from seg.kernels import set_backend
    from seg.kernels.focused_linear.triton import launch
    from seg.model.layers import FocusedLinearAttention

    _fresh_checked_entry()
    calls = {"forward": 0, "backward": 0}
    original = launch.forward, launch.backward

    def counted(name, fn):
        def run(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return run

    torch.manual_seed(0)
    ref = FocusedLinearAttention(32, 2, grid_size=(8, 8), sr_ratio=2)
    with torch.no_grad():
        ref.scale.normal_(0, 0.5)
    fast = set_backend(copy.deepcopy(ref), "triton")
    compiled = torch.compile(fast, fullgraph=True)
    x = torch.randn(2, 6 * 8, 32)
    try:
        launch.forward, launch.backward = counted("forward", original[0]), counted("backward", original[1])
        out = compiled(x, (6, 8))
        out.square().mean().backward()
    finally:
        launch.forward, launch.backward = original
    want = ref(x, (6, 8))
    want.square().mean().backward()
    assert calls["forward"] >= 2 and calls["backward"] >= 2, calls  # the probe's call and the layer's
    assert _rel_err(out.detach(), want.detach()) < 1e-5
    for (name, a), b in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert _rel_err(a.grad, b.grad) < 1e-4, (name, _rel_err(a.grad, b.grad))


# ---------------------------------------------------------------------------------------------------------------
# tests

# (dtype, h, d, N, n): the paper models' head dims 32 and 64, h = 1, 2, 3, 5, n == N and n < N (spatial reduction)
HALF_CASES = [("bfloat16", 2, 32, 24, 24), ("float16", 3, 64, 24, 8)]
HALF_SLOW = [(dt, h, d, 24, n) for dt, h, d, n in itertools.product(("bfloat16", "float16"), (1, 2, 3, 5), (32, 64),
                                                                     (24, 8)) if (dt, h, d, 24, n) not in HALF_CASES]


@pytest.mark.parametrize(("dtype_name", "h", "d", "N", "n"), HALF_CASES)
def test_half_precision_matches_float64(worker: Worker, dtype_name: str, h: int, d: int, N: int, n: int) -> None:
    worker("check_half_matches_float64", dtype_name, h, d, N, n)


@pytest.mark.slow
@pytest.mark.parametrize(("dtype_name", "h", "d", "N", "n"), HALF_SLOW)
def test_half_precision_matches_float64_all(worker: Worker, dtype_name: str, h: int, d: int, N: int, n: int) -> None:
    worker("check_half_matches_float64", dtype_name, h, d, N, n)


def test_failing_launch_falls_back_to_reference(worker: Worker) -> None:
    worker("check_failing_launch_falls_back")


def test_disagreeing_kernels_fall_back_to_reference(worker: Worker) -> None:
    worker("check_disagreement_falls_back")


def test_unsupported_inputs_fall_back_to_reference(worker: Worker) -> None:
    worker("check_unsupported_inputs_fall_back")


def test_compiled_layer_runs_the_kernels(worker: Worker) -> None:
    worker("check_compiled_module")

