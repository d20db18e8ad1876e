"""The Triton self-check (``seg.kernels.focused_linear.triton.probe``) catches kernels that are wrong only in a
corner a small problem never reaches: the second split of a reduction, the second image, the last head-dim column,
the backward, another focusing factor. Each fault is injected into one kernel launch, run through Triton's
interpreter in a child process (see ``_triton_worker``); the checked entry must fall back to the reference with one
warning that names the disagreement."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from _triton_worker import Worker

from seg.kernels.focused_linear.triton import launch
from seg.kernels.focused_linear.triton.probe import PROBE_SPLITS, head_dims, probe_shape
from seg.kernels.focused_linear.triton.tiles import HALF_DTYPES, INTERPRETER_TILES, PAD_HEAD_DIMS, tile_options

Corrupt = Callable[[tuple, dict], None]


@pytest.fixture(scope="module")
def worker():
    pytest.importorskip("triton", reason="triton is not installed")
    child = Worker(Path(__file__).stem)
    yield child
    child.close()


# ---------------------------------------------------------------------------------------------------------------
# checks, run inside the interpreter process


class _Faulty:
    """A kernel launched as usual, then one of its outputs corrupted by ``corrupt(args, meta)``."""

    def __init__(self, kernel, corrupt: Corrupt) -> None:
        self.kernel, self.corrupt = kernel, corrupt

    def __getitem__(self, grid: tuple):
        def run(*args, **meta) -> None:
            self.kernel[grid](*args, **meta)
            self.corrupt(args, meta)
        return run


@contextlib.contextmanager
def _injected(kernel: str, corrupt: Corrupt) -> Iterator[None]:
    """``launch.<kernel>`` replaced by a faulty one, and the checked entry's verdicts and warnings forgotten."""
    from seg.kernels.focused_linear.triton import checked

    original = getattr(launch, kernel)
    checked._verdicts.clear()
    checked._warned.clear()
    setattr(launch, kernel, _Faulty(original, corrupt))
    try:
        yield
    finally:
        setattr(launch, kernel, original)
        checked._verdicts.clear()
        checked._warned.clear()


def _second_split(args: tuple, meta: dict) -> None:
    kv = args[5]  # summary_kernel's per-split KV partial sums (B * h, splits, D, D)
    if kv.shape[1] > 1:
        kv[:, 1] *= 1.5


def _second_image(args: tuple, meta: dict) -> None:
    out = args[6]  # apply_kernel's output (B, N, C)
    if out.shape[0] > 1:
        out[1] *= 1.5


def _last_column(args: tuple, meta: dict) -> None:
    out, d = args[6], args[8]  # apply_kernel's output (B, N, C) and head dim
    if d == meta["D_PAD"]:  # the last padded column holds real channels
        out[..., d - 1::d] *= 1.5  # (B, N, C): the last channel of every head


def _backward_only(args: tuple, meta: dict) -> None:
    args[7].mul_(1.05)  # key_grad_kernel's dL/dv (B, n, C)


def _fractional_power(args: tuple, meta: dict) -> None:
    if meta["P_INT"] == 0:  # the exp2 / log2 power of a non-integer p
        args[6].mul_(1.5)


FAULTS = {  # name: (kernel, corruption, what the warning names)
    "second_split": ("summary_kernel", _second_split, "(output at head dim 13"),
    "second_image": ("apply_kernel", _second_image, "(output at head dim 13"),
    "last_column": ("apply_kernel", _last_column, "(output at head dim 16"),
    "backward_only": ("key_grad_kernel", _backward_only, "(dv at head dim 13"),
}


def _problem(B: int, h: int, d: int, N: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    """q (B, N, C), k, v (B, n, C), scale (1, 1, C), float32."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, t, h * d, generator=gen) for t in (N, n, n))
    return [q, k, v, torch.randn(1, 1, h * d, generator=gen) * 0.5]


def _with_grads(fn, problem: list[torch.Tensor], h: int, p: float) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in problem]
    out = fn(*leaves, h, p)
    out.square().sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def _checked_call(problem: list[torch.Tensor], h: int, p: float) -> tuple[list[torch.Tensor], list[str]]:
    """Output and gradients through the checked entry, and its warnings."""
    from seg.kernels.focused_linear.triton import checked

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = _with_grads(checked.focused_linear_attention, problem, h, p)
    return results, [str(w.message) for w in caught if "attn_backend 'triton'" in str(w.message)]


def _assert_reference(results: list[torch.Tensor], problem: list[torch.Tensor], h: int, p: float) -> None:
    from seg.kernels.focused_linear.reference import focused_linear_attention_tokens

    want = _with_grads(focused_linear_attention_tokens, [t.double() for t in problem], h, p)
    for name, a, b in zip(("out", "q", "k", "v", "scale"), results, want, strict=True):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err < 1e-5, (name, err)


def _small_probe_agrees() -> bool:
    """Whether the kernels agree with the float64 reference on the problem a weaker probe would run: one image,
    two heads, a masked head dim (13 of 16), 37 tokens in one split."""
    from seg.kernels.focused_linear.triton.probe import TOLERANCE, inverse_temperature, scale_grad
    from seg.kernels.focused_linear.triton.reference_grads import reference_with_grads

    q, k, v, scale = _problem(1, 2, 13, 37, 37, seed=1)
    grad = torch.randn_like(q)
    out, *saved = launch.forward(q, k, v, inverse_temperature(scale), 2, 3.0)
    grads = launch.backward(grad, q, k, v, inverse_temperature(scale), tuple(saved), 2, 3.0)
    got = (out, *grads[:3], scale_grad(grads[3], scale))
    want = reference_with_grads(grad.double(), q.double(), k.double(), v.double(), scale.double(), 2, 3.0)
    errors = [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want, strict=True)]
    return max(errors) <= TOLERANCE[torch.float32]


def check_fault_is_caught(fault: str) -> None:
    """With one faulty launch, the checked entry runs the reference (output and every gradient) with exactly one
    warning naming the disagreement; a one-image, one-split, masked probe would have passed the fault."""
    kernel, corrupt, named = FAULTS[fault]
    with _injected(kernel, corrupt):
        if fault != "backward_only":  # the backward fault is visible to any probe that runs the backward
            assert _small_probe_agrees(), f"{fault}: the fault should be invisible to a small probe"
        problem = _problem(2, 2, 16, 24, 24)
        results, messages = _checked_call(problem, 2, 3.0)
    assert len(messages) == 1, messages
    assert "disagree with the float64 reference" in messages[0] and named in messages[0], messages[0]
    _assert_reference(results, problem, 2, 3.0)


def check_probe_crosses_splits(same_length: bool) -> None:
    """The probe's launches: two images, every token reduction in at least three splits, a masked and an unmasked
    head dim; the kernels pass it."""
    from seg.kernels.focused_linear.triton import checked

    seen: list[tuple] = []

    def record(name: str):
        def corrupt(args: tuple, meta: dict) -> None:
            seen.append((name, args[0].shape, args[6 if name == "summary_kernel" else 7].shape))
        return corrupt

    with _injected("summary_kernel", record("summary_kernel")), \
            _injected("query_grad_summary_kernel", record("query_grad_summary_kernel")):
        problem = _problem(1, 2, 16, 20, 20 if same_length else 9)
        results, messages = _checked_call(problem, 2, 3.0)
        assert not messages, messages
        assert list(checked._verdicts.values()) == [None]
    probe_calls = seen[:4]  # two problems x (forward summary, backward summary); then the real call's
    assert [name for name, _, _ in probe_calls] == ["summary_kernel", "query_grad_summary_kernel"] * 2
    assert {shape[0] for _, shape, _ in probe_calls} == {2}  # two images
    assert {shape[2] for _, shape, _ in probe_calls} == {2 * 13, 2 * 16}  # two heads of d = 13 and d = 16
    for name, _, partial in probe_calls:
        assert partial[1] >= 3, (name, partial)  # per-split partial sums (B * h, splits, D, ...)
    _assert_reference(results, problem, 2, 3.0)


def check_verdict_per_focusing_factor() -> None:
    """Kernels wrong only for a non-integer p, trusted for p = 3 (a verdict kept from an earlier call): a call
    with p = 2.5 is probed anew and refused."""
    from seg.kernels.focused_linear.triton import checked

    problem = _problem(2, 2, 16, 24, 24)
    with _injected("apply_kernel", _fractional_power):
        trusted = checked.configuration(problem[0], problem[1], 2, 3.0)
        checked._verdicts[trusted] = None
        results, messages = _checked_call(problem, 2, 2.5)
        assert len(messages) == 1 and "p = 2.5 (output at head dim 13" in messages[0], messages
        assert checked._verdicts[trusted] is None and len(checked._verdicts) == 2, checked._verdicts
    _assert_reference(results, problem, 2, 2.5)


# ---------------------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_is_caught_and_falls_back(worker: Worker, fault: str) -> None:
    worker("check_fault_is_caught", fault)


@pytest.mark.parametrize("same_length", [True, False], ids=["n==N", "n<N"])
def test_probe_crosses_three_splits_with_two_images(worker: Worker, same_length: bool) -> None:
    worker("check_probe_crosses_splits", same_length)


def test_verdict_is_kept_per_focusing_factor(worker: Worker) -> None:
    worker("check_verdict_per_focusing_factor")


@pytest.mark.parametrize("same_length", [True, False])
def test_probe_shape_crosses_three_splits_on_every_tile(same_length: bool) -> None:
    """On every tile configuration a device may choose, and the interpreter's, the probe's problem has two images
    and at least three splits in each token reduction (queries for the backward, keys for the forward)."""
    blocks = {INTERPRETER_TILES.block}
    for dtype in (torch.float32, *HALF_DTYPES):
        blocks |= {tiles.block for d_pad in PAD_HEAD_DIMS for tiles in tile_options(d_pad, dtype)}
    for block in sorted(blocks):
        B, h, N, n = probe_shape(same_length, block)
        assert B >= 2 and h >= 2
        for tokens in (N, n):
            splits, _ = launch.split_blocks(launch.cdiv(tokens, block), PROBE_SPLITS)
            assert splits >= 3, (block, tokens, splits)


@pytest.mark.parametrize(("d_pad", "d", "want"), [(16, 16, (13, 16)), (64, 40, (40, 64)), (128, 128, (125, 128))])
def test_probe_head_dims_are_masked_and_unmasked(d_pad: int, d: int, want: tuple[int, int]) -> None:
    assert head_dims(d_pad, d) == want
