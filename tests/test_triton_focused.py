"""Triton focused linear attention kernels, run on CPU through Triton's interpreter.

The checks below run in one child Python process started with ``TRITON_INTERPRET=1`` (see ``_triton_worker``); each
test asks it to run one check and fails with the child's traceback.
"""

import itertools
from pathlib import Path

import pytest
import torch
from _triton_worker import Worker

from seg.kernels.focused_linear.cpu import focused_linear_attention as cpu_attention
from seg.kernels.focused_linear.reference import focused_linear_attention

pytest.importorskip("triton", reason="triton is not installed")


@pytest.fixture(scope="module")
def worker():
    """One interpreter process for the whole file (importing torch and triton once)."""
    child = Worker(Path(__file__).stem)
    yield child
    child.close()


def _kernels():
    """The kernel module; only ever imported inside the interpreter process."""
    from seg.kernels.focused_linear.triton import launch

    assert launch._INTERPRETED and launch.triton_available(), "kernels not defined for the interpreter"
    return launch


# ---------------------------------------------------------------------------------------------------------------
# checks, run inside the interpreter process


def _inputs(B: int, h: int, d: int, N: int, n: int, dtype: torch.dtype, magnitude: float = 1.0, seed: int = 0):
    """q (B, N, C), k, v (B, n, C), scale (1, 1, C) and an upstream gradient (B, N, C)."""
    gen = torch.Generator().manual_seed(seed)
    C = h * d
    q, k, v = (torch.randn(B, t, C, generator=gen, dtype=torch.float64) * magnitude for t in (N, n, n))
    scale = torch.randn(1, 1, C, generator=gen, dtype=torch.float64) * 0.5
    grad = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    return [t.clamp(-50, 50).to(dtype) for t in (q, k, v)] + [scale, grad]


def _reference(q, k, v, scale, grad, h: int) -> list[torch.Tensor]:
    """Output and gradients (q, k, v, scale) of the pure-torch maths on (B, h, N, d) tensors, by autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, scale)]
    B, N, C = q.shape
    heads = lambda t: t.view(B, t.shape[1], h, C // h).transpose(1, 2)  # (B, T, C) -> (B, h, T, d)
    out = focused_linear_attention(*(heads(t) for t in leaves[:3]), leaves[3])
    out = out.transpose(1, 2).reshape(B, N, C)  # (B, h, N, d) -> (B, N, C)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _triton(q, k, v, scale, grad, h: int, p: float = 3.0) -> list[torch.Tensor]:
    """Output and gradients (q, k, v, scale) through the kernels."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, scale)]
    out = _kernels().focused_linear_attention_triton(*leaves, num_heads=h, focusing_factor=p)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute error relative to the largest magnitude of the expected tensor."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def check_float32(B: int, h: int, d: int, N: int, n: int) -> None:
    """float32 kernels against the float64 reference, forward and all four gradients."""
    q, k, v, scale, grad = _inputs(B, h, d, N, n, torch.float64)
    expected = _reference(q, k, v, scale, grad, h)
    actual = _triton(q.float(), k.float(), v.float(), scale.float(), grad.float(), h)
    for name, a, e in zip(("out", "q", "k", "v", "scale"), actual, expected, strict=True):
        assert a.dtype == torch.float32 and a.shape == e.shape, (name, a.dtype, a.shape)
        assert _rel_err(a, e) < 1e-5, (name, _rel_err(a, e))


def check_non_integer_power() -> None:
    """p = 2.5 takes the exp2 / log2 power instead of repeated products."""
    q, k, v, scale, grad = _inputs(1, 2, 16, 20, 9, torch.float64, seed=1)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, scale)]
    out = cpu_attention(*leaves, num_heads=2, focusing_factor=2.5)
    out.backward(grad)
    expected = [out.detach()] + [t.grad for t in leaves]
    actual = _triton(q.float(), k.float(), v.float(), scale.float(), grad.float(), 2, p=2.5)
    for name, a, e in zip(("out", "q", "k", "v", "scale"), actual, expected, strict=True):
        assert _rel_err(a, e) < 1e-5, (name, _rel_err(a, e))


def check_half_precision(dtype_name: str) -> None:
    """Half-precision activations up to |50|: finite output and gradients in the input dtypes, close to the
    float32 maths on the same (rounded) values."""
    dtype = getattr(torch, dtype_name)
    q, k, v, scale, grad = _inputs(2, 2, 16, 40, 12, dtype, magnitude=25.0, seed=2)
    assert q.abs().max() == 50 and k.abs().max() == 50, "inputs should reach the clamp"
    actual = _triton(q, k, v, scale.float(), grad.float(), 2)
    expected = _reference(q.float(), k.float(), v.float(), scale.float(), grad.float(), 2)
    for name, a, e in zip(("out", "q", "k", "v", "scale"), actual, expected, strict=True):
        assert a.dtype == (torch.float32 if name == "scale" else dtype), (name, a.dtype)
        assert torch.isfinite(a).all(), name
        assert _rel_err(a, e) < 2e-2, (name, _rel_err(a, e))


def check_invalid_inputs() -> None:
    """Shapes and dtypes the kernels do not take are refused with a clear message, before any launch."""
    tf = _kernels()
    q = torch.randn(1, 8, 12)
    scale = torch.zeros(1, 1, 12)
    for call, error, match in [
        (lambda: tf.focused_linear_attention_triton(q, q, q, scale, num_heads=5), ValueError, "divisible"),
        (lambda: tf.focused_linear_attention_triton(q.double(), q, q, scale, 2), TypeError, "float64"),
        (lambda: tf.focused_linear_attention_triton(q, q[:, :3], q, scale, 2), ValueError, "k and v"),
        (lambda: tf.focused_linear_attention_triton(torch.randn(1, 4, 129), torch.randn(1, 4, 129),
                                                    torch.randn(1, 4, 129), torch.zeros(129), 1),
         ValueError, "head dim"),
    ]:
        with pytest.raises(error, match=match):
            call()


def check_module_backend(sr: int) -> None:
    """FocusedLinearAttention with ``attn_backend='triton'`` equals the reference module: output and every
    parameter gradient, with and without spatial reduction."""
    import copy

    from seg.kernels import set_backend
    from seg.kernels.focused_linear.triton import checked
    from seg.model.layers import FocusedLinearAttention

    _kernels()
    torch.manual_seed(0)
    ref = FocusedLinearAttention(32, 2, grid_size=(8, 8), sr_ratio=sr)
    with torch.no_grad():
        ref.scale.normal_(0, 0.5)
        ref.positional_encoding.normal_(0, 0.5)
    fast = set_backend(copy.deepcopy(ref), "triton")
    x = torch.randn(2, 6 * 10, 32)
    outs = []
    for module in (ref, fast):
        out = module(x, (6, 10))
        out.square().mean().backward()
        outs.append(out.detach())
    assert _rel_err(outs[1], outs[0]) < 1e-5
    for (name, a), b in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert _rel_err(a.grad, b.grad) < 1e-4, (name, _rel_err(a.grad, b.grad))
    config = ("cpu", torch.float32, 16, sr == 1, 3.0)
    assert config in checked._verdicts and checked._verdicts[config] is None, checked._verdicts


def check_probe_inside_inference_mode() -> None:
    """The first triton call of a process may come from evaluation (inference mode, bf16 autocast): the probe
    still runs the kernels' backward, and the module uses the kernels, not the reference, without a warning."""
    import copy
    import warnings

    from seg.kernels import set_backend
    from seg.kernels.focused_linear.triton import checked
    from seg.model.layers import FocusedLinearAttention

    _kernels()
    checked._verdicts.clear()
    torch.manual_seed(0)
    attn = FocusedLinearAttention(32, 2, grid_size=(8, 8))
    reference = set_backend(copy.deepcopy(attn), "reference")
    fast = set_backend(attn, "triton")
    x = torch.randn(1, 6 * 10, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = fast(x, (6, 10))
        assert checked._verdicts == {("cpu", torch.bfloat16, 16, True, 3.0): None}, checked._verdicts
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference(x, (6, 10))
    assert _rel_err(out.float(), want.float()) < 2e-2


# ---------------------------------------------------------------------------------------------------------------
# tests


# (B, h, d, N, n): N = 7 x 9 tokens; n = 12 as with a spatial reduction; d = 40 is padded to 64 inside the kernels
FAST_CASES = [(1, 1, 16, 63, 63), (2, 3, 40, 63, 12), (1, 3, 16, 63, 12)]
SLOW_CASES = [
    case for case in itertools.product((1, 2), (1, 3), (16, 40), (63,), (63, 12)) if case not in FAST_CASES
]


@pytest.mark.parametrize(("B", "h", "d", "N", "n"), FAST_CASES)
def test_float32_matches_reference(worker: Worker, B: int, h: int, d: int, N: int, n: int) -> None:
    worker("check_float32", B, h, d, N, n)


@pytest.mark.slow
@pytest.mark.parametrize(("B", "h", "d", "N", "n"), SLOW_CASES)
def test_float32_matches_reference_all_shapes(worker: Worker, B: int, h: int, d: int, N: int, n: int) -> None:
    worker("check_float32", B, h, d, N, n)


def test_non_integer_focusing_factor(worker: Worker) -> None:
    worker("check_non_integer_power")


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_half_precision_large_activations(worker: Worker, dtype_name: str) -> None:
    worker("check_half_precision", dtype_name)


@pytest.mark.parametrize("sr", [1, 2])
def test_module_triton_backend_equals_reference(worker: Worker, sr: int) -> None:
    worker("check_module_backend", sr)


def test_probe_from_inference_mode_uses_the_kernels(worker: Worker) -> None:
    worker("check_probe_inside_inference_mode")


def test_invalid_inputs(worker: Worker) -> None:
    worker("check_invalid_inputs")

