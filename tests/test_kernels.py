"""The attention backends compute what the reference computes, and fall back when they cannot run."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch

import seg.kernels.onednn as onednn
from seg.kernels import BACKENDS, set_backend
from seg.kernels.focused_linear import select_mode
from seg.kernels.onednn import Linear
from seg.model.layers import FocusedLinearAttention


def _randomised(attn: FocusedLinearAttention) -> FocusedLinearAttention:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    return attn


def _forward_backward(module: torch.nn.Module, x: torch.Tensor, size: tuple[int, int]) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    out = module(x, size)
    out.square().mean().backward()
    return [out.detach(), x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize(("sr", "fused_qkv", "heads"), [(1, False, 1), (1, True, 3), (2, False, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [1, 2])  # one image and one head take oneDNN's single-matrix products
def test_cpu_backend_equals_reference_forward_and_backward(sr: int, fused_qkv: bool, heads: int,
                                                           dtype: torch.dtype, batch: int) -> None:
    ref = _randomised(FocusedLinearAttention(8 * heads, heads, grid_size=(8, 8), sr_ratio=sr, fused_qkv=fused_qkv))
    ref = ref.to(dtype)
    fast = set_backend(copy.deepcopy(ref), "cpu")
    x = torch.randn(batch, 6 * 10, 8 * heads, dtype=dtype)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for got, want in zip(_forward_backward(fast, x, (6, 10)), _forward_backward(ref, x, (6, 10)), strict=True):
        torch.testing.assert_close(got, want, **tol)
    with torch.no_grad():  # the folded inference path (sr 1) or the closed-form forward without autograd
        torch.testing.assert_close(fast.eval()(x, (6, 10)), ref.eval()(x, (6, 10)), **tol)


@pytest.mark.parametrize("name", ["test_flatten_pvt", "test_flatten_pvt_v2", "test_flatten_swin", "test_soft"])
def test_every_backend_gives_the_reference_encoder_output(name: str) -> None:
    torch.manual_seed(0)
    ref = timm.create_model(name, features_only=True, attn_backend="reference").double().eval()
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        want = ref(x)
        for backend in BACKENDS:
            other = copy.deepcopy(ref)
            set_backend(other, backend)
            for got, expected in zip(other(x), want, strict=True):
                torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_backend_switch_keeps_parameters_and_names() -> None:
    model = timm.create_model("test_flatten_pvt", attn_backend="cpu")
    names = {k: v.data_ptr() for k, v in model.state_dict().items()}
    layers = [m for m in model.modules() if isinstance(m, FocusedLinearAttention)]
    assert layers and all(m.attn_backend == "cpu" for m in layers)
    set_backend(model, "reference")
    assert model.attn_backend == "reference" and all(m.attn_backend == "reference" for m in layers)
    assert all(type(m) in (Linear, torch.nn.Linear) for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == names
    with pytest.raises(ValueError, match="not one of auto, reference, cpu, triton"):
        set_backend(model, "cuda")
    with pytest.raises(ValueError, match="not one of auto, reference, cpu, triton"):
        FocusedLinearAttention(8, 2, attn_backend="gpu")


@pytest.mark.parametrize(
    ("backend", "dtype", "grad", "global_keys", "mode"),
    [
        ("auto", torch.float32, True, True, "cpu"),
        ("auto", torch.float32, False, True, "cpu_inference"),
        ("auto", torch.float32, False, False, "cpu"),
        ("cpu", torch.float64, False, True, "cpu_inference"),
        ("auto", torch.bfloat16, True, True, "reference"),
        ("reference", torch.float32, False, True, "reference"),
        ("triton", torch.float32, True, True, "reference"),  # CPU tensors, no interpreter: the reference
    ],
)
def test_select_mode_is_the_one_decision(backend: str, dtype: torch.dtype, grad: bool, global_keys: bool,
                                         mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 4, 8, dtype=dtype)
    with torch.set_grad_enabled(grad):
        assert select_mode(backend, x, global_keys) == mode


def test_layer_forward_runs_the_selected_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layer's forward runs what select_mode answers: the folded CPU inference without autograd."""
    import seg.model.layers.focused_linear as layer_module

    calls = []
    real = layer_module.fused_inference
    monkeypatch.setattr(layer_module, "fused_inference", lambda *a: calls.append(1) or real(*a))
    attn = _randomised(FocusedLinearAttention(16, 2, grid_size=(4, 4))).eval()
    x = torch.randn(1, 16, 16)
    with torch.no_grad():
        fast = attn(x, (4, 4))
        attn.attn_backend = "reference"
        ref = attn(x, (4, 4))
    assert calls == [1]
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_onednn_disabled_falls_back_to_f_linear_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = Linear(8, 4)
    x = torch.randn(3, 8)
    monkeypatch.setattr(onednn, "_warned", False)
    with torch.backends.mkldnn.flags(enabled=False), pytest.warns(UserWarning, match="mkldnn.enabled is False"):
        out = layer(x)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_onednn_missing_operator_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch build without the private operator (or one where it fails) probes as unavailable."""
    onednn._probe.cache_clear()
    monkeypatch.setattr(torch.ops, "mkldnn", object())  # no _linear_pointwise attribute
    monkeypatch.setattr(onednn, "_warned", False)
    try:
        with pytest.warns(UserWarning, match="_linear_pointwise is missing"):
            assert not onednn.onednn_linear_available()
        layer = Linear(8, 4)
        x = torch.randn(2, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once already
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    finally:
        onednn._probe.cache_clear()


@pytest.mark.parametrize("scale", [0.0, -40.0])
def test_folded_inference_stays_finite_when_the_power_overflows(scale: float) -> None:
    """The folded CPU inference powers y itself (one pass fewer); where y^p would overflow float32 (a tiny
    temperature, softplus(-40) ~ 4e-18) it powers the unit vectors instead and still equals the reference."""
    attn = _randomised(FocusedLinearAttention(16, 2, grid_size=(4, 4))).eval()
    with torch.no_grad():
        attn.scale.fill_(scale)
    x = torch.randn(1, 20, 16)
    with torch.no_grad():
        got = attn(x, (4, 5))
        want = set_backend(copy.deepcopy(attn).double(), "reference")(x.double(), (4, 5))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)
