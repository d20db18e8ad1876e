"""Where the Triton kernels cannot run, the reference does, with one warning that says why. None of these tests
needs Triton: every ``check_*`` function runs in one child process where ``import triton`` fails, as on a CPU-only
torch wheel (see ``_triton_worker``), and each test asks it to run one."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _triton_worker import Worker

from seg.kernels.focused_linear import dispatch
from seg.kernels.focused_linear.reference import focused_linear_attention_tokens
from seg.kernels.focused_linear.triton.reference_grads import reference_with_grads


@pytest.fixture(scope="module")
def no_triton():
    """One child process without Triton for the whole file."""
    child = Worker(Path(__file__).stem, hide_triton=True)
    yield child
    child.close()


def _caught(run, match: str) -> tuple[object, list[str]]:
    """``run()``'s result and the messages of the warnings it raised that contain ``match``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run()
    return result, [str(w.message) for w in caught if match in str(w.message)]


# ---------------------------------------------------------------------------------------------------------------
# checks, run in the process without Triton


def check_triton_is_hidden() -> None:
    """``import seg`` works without Triton, and the kernel module knows it has none."""
    import seg  # noqa: F401  (registers the encoders)
    from seg.kernels.focused_linear.triton import launch

    assert sys.modules["triton"] is None and launch.triton is None
    with pytest.raises(ImportError):
        import triton  # noqa: F401
    assert not launch.triton_available()


def check_requested_triton_warns_once_and_equals_reference() -> None:
    """An encoder built with ``attn_backend="triton"`` on CPU tensors: one warning over several calls (forward
    and backward), and the reference encoder's features and gradients."""
    import timm

    import seg  # noqa: F401
    from seg.kernels import set_backend

    torch.manual_seed(0)
    fast = timm.create_model("test_flatten_pvt", features_only=True, attn_backend="triton")
    ref = set_backend(copy.deepcopy(fast), "reference")
    x = torch.randn(2, 3, 64, 64)

    def run(model: torch.nn.Module) -> list[torch.Tensor]:
        outs = []
        for _ in range(2):
            model.zero_grad()
            features = model(x)
            sum(f.square().mean() for f in features).backward()
            outs.append(features[-1].detach())
        return outs + [p.grad for p in model.parameters()]

    got, messages = _caught(lambda: run(fast), "triton")
    assert len(messages) == 1, messages
    assert messages[0].startswith("triton requested but unavailable: the triton package is not installed")
    want, others = _caught(lambda: run(ref), "triton")
    assert not others, others
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def check_operator_falls_back() -> None:
    """The checked operator itself, called on tensors it cannot take: the reference's output and gradients,
    with one warning naming the missing package."""
    from seg.kernels.focused_linear.triton import checked

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, t, 16, generator=gen).requires_grad_() for t in (20, 12, 12))
    scale = (torch.randn(1, 1, 16, generator=gen) * 0.5).requires_grad_()

    def run(fn) -> list[torch.Tensor]:
        for t in (q, k, v, scale):
            t.grad = None
        out = fn(q, k, v, scale, 2, 3.0)
        out.square().sum().backward()
        return [out.detach()] + [t.grad.clone() for t in (q, k, v, scale)]

    got, messages = _caught(lambda: run(checked.focused_linear_attention), "attn_backend 'triton'")
    assert messages == ["attn_backend 'triton': the triton package is not installed (CPU-only torch wheels ship "
                        "without it); using the reference"], messages
    for a, b in zip(got, run(focused_linear_attention_tokens), strict=True):
        torch.testing.assert_close(a, b)


def check_unchecked_kernels_refuse_to_run() -> None:
    """The raw kernel entry says what it needs instead of failing inside Triton."""
    from seg.kernels.focused_linear.triton import launch

    x = torch.randn(1, 4, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        launch.focused_linear_attention_triton(x, x, x, torch.zeros(1, 1, 8), num_heads=2)


def check_auto_on_cuda_without_triton_warns() -> None:
    """``auto`` on CUDA tensors without Triton runs the reference and says why (the CUDA tensor is only
    described: the decision reads its device)."""
    dispatch._warned.clear()
    cuda_x = SimpleNamespace(device=torch.device("cuda", 0), is_cuda=True, dtype=torch.float32)
    mode, messages = _caught(lambda: dispatch.select_mode("auto", cuda_x, True), "attn_backend 'auto'")
    assert mode == "reference" and len(messages) == 1 and "triton package is not installed" in messages[0]


def check_split_plan() -> None:
    """The launch plan needs no Triton: reductions split into about ``programs`` programs of >= 8 blocks each
    (one split when there are fewer blocks), or into a forced count, covering every block exactly once."""
    from seg.kernels.focused_linear.triton import launch

    plan = launch._Plan.__new__(launch._Plan)
    for B, h, chunks, tokens, forced in [(2, 1, 1, 128 * 128, None), (8, 5, 2, 32 * 32, None), (1, 1, 1, 100, None),
                                         (2, 2, 1, 4 * 64 + 1, 4), (2, 2, 1, 3 * 64, 8), (1, 1, 1, 10, 3),
                                         (2, 2, 1, 3 * 64 + 5, 4)]:
        plan.B, plan.h, plan.chunks, plan.block, plan.programs = B, h, chunks, 64, 4 * 132  # an H100's 132 SMs
        plan.forced_splits = forced
        splits, per_split = plan.splits(tokens)
        blocks = -(-tokens // 64)
        assert (splits - 1) * per_split < blocks <= splits * per_split
        if forced is None:
            assert per_split >= min(launch.MIN_BLOCKS_PER_SPLIT, blocks)
            assert splits == 1 or B * h * chunks * splits <= 2 * plan.programs
        else:
            assert splits <= min(forced, blocks) and per_split == -(-blocks // min(forced, blocks))


def check_cpu_backend_on_cuda_tensors_warns_once() -> None:
    """``attn_backend="cpu"`` on CUDA tensors runs the reference, with one warning over repeated calls (the CUDA
    tensor is only described: the decision reads its device)."""
    dispatch._warned.clear()
    cuda_x = SimpleNamespace(device=torch.device("cuda", 0), is_cuda=True, dtype=torch.float32)
    modes, messages = _caught(lambda: [dispatch.select_mode("cpu", cuda_x, True) for _ in range(3)], "'cpu'")
    assert modes == ["reference"] * 3
    assert messages == ["attn_backend 'cpu' asked for on cuda tensors: the CPU path takes CPU tensors only; using "
                        "the reference"]


def check_auto_on_cpu_tensors_never_warns() -> None:
    x = torch.randn(1, 4, 8)
    modes, messages = _caught(lambda: [dispatch.select_mode("auto", x, g) for g in (True, False)], "")
    assert modes == ["cpu", "cpu"]
    assert not messages, messages


def check_reference_with_grads_passes_gradcheck(same_length: bool, p: float) -> None:
    """The closed-form gradients the probe compares the kernels with, against finite differences (float64):
    q, k, v and the temperature, two images, two heads."""
    gen = torch.Generator().manual_seed(0)
    B, h, d, N = 2, 2, 3, 7
    n = N if same_length else 4
    q, k, v = (torch.randn(B, t, h * d, generator=gen, dtype=torch.float64) for t in (N, n, n))
    q[0, 0] = -1.0  # a query at the kernel floor (all channels <= 0)
    scale = torch.randn(1, 1, h * d, generator=gen, dtype=torch.float64) * 0.5

    class ClosedForm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, scale):
            ctx.save_for_backward(q, k, v, scale)
            return reference_with_grads(torch.zeros_like(q), q, k, v, scale, h, p)[0]

        @staticmethod
        def backward(ctx, grad_out):
            return reference_with_grads(grad_out, *ctx.saved_tensors, h, p)[1:]

    inputs = tuple(t.requires_grad_() for t in (q, k, v, scale))
    assert torch.autograd.gradcheck(ClosedForm.apply, inputs)
    # and its output is the reference's
    torch.testing.assert_close(ClosedForm.apply(*inputs), focused_linear_attention_tokens(*inputs, h, p))


# ---------------------------------------------------------------------------------------------------------------
# tests


def test_import_without_triton(no_triton: Worker) -> None:
    no_triton("check_triton_is_hidden")


def test_requested_triton_warns_once_and_equals_reference(no_triton: Worker) -> None:
    no_triton("check_requested_triton_warns_once_and_equals_reference")


def test_operator_falls_back_without_triton(no_triton: Worker) -> None:
    no_triton("check_operator_falls_back")


def test_unchecked_kernels_refuse_to_run_without_triton(no_triton: Worker) -> None:
    no_triton("check_unchecked_kernels_refuse_to_run")


def test_auto_on_cuda_without_triton_warns(no_triton: Worker) -> None:
    no_triton("check_auto_on_cuda_without_triton_warns")


def test_split_plan_without_triton(no_triton: Worker) -> None:
    no_triton("check_split_plan")


def test_cpu_backend_on_cuda_tensors_warns_once(no_triton: Worker) -> None:
    no_triton("check_cpu_backend_on_cuda_tensors_warns_once")


def test_auto_on_cpu_tensors_never_warns(no_triton: Worker) -> None:
    no_triton("check_auto_on_cpu_tensors_never_warns")


@pytest.mark.parametrize("same_length", [True, False])
@pytest.mark.parametrize("p", [3.0, 2.5])
def test_reference_with_grads_passes_gradcheck_in_float64(no_triton: Worker, same_length: bool, p: float) -> None:
    no_triton("check_reference_with_grads_passes_gradcheck", same_length, p)
