"""The cpu backend's oneDNN linear layers compute what F.linear / GELU compute, and fall back when they cannot."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seg.kernels.onednn import Linear, linear, linear_gelu, onednn_linear_available, set_onednn_linear
from seg.model.layers.mlp import Mlp

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 24), (2, 33, 24), (2, 3, 5, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear_in_inference(shape: tuple[int, ...], bias: bool) -> None:
    x = torch.randn(*shape)
    w, b = torch.randn(40, 24), torch.randn(40) if bias else None
    with torch.inference_mode():
        got = linear(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    # strided input (a channel slice) and a transposed weight
    wide = torch.randn(2, 9, 48)
    with torch.no_grad():
        torch.testing.assert_close(linear(wide[..., 8:32], w.T.contiguous().T), F.linear(wide[..., 8:32], w))
        # a strided bias (a column of a larger matrix), which the operator would read as dense
        column = torch.randn(40, 3)[:, 1]
        torch.testing.assert_close(linear(x, w, column), F.linear(x, w, column), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_equals_gelu_of_linear(approximate: str) -> None:
    x, w, b = torch.randn(2, 50, 16), torch.randn(64, 16), torch.randn(64)
    with torch.inference_mode():
        got = linear_gelu(x, w, b, approximate)
    torch.testing.assert_close(got, F.gelu(F.linear(x, w, b), approximate=approximate), rtol=1e-5, atol=1e-5)


def test_gradients_autocast_and_switch_follow_f_linear() -> None:
    """Training runs the oneDNN forward and dL/dx with hand-written reductions for dL/dW, dL/db."""
    layer = Linear(8, 4)
    x = torch.randn(2, 3, 8, requires_grad=True)
    layer(x).square().sum().backward()
    ref = torch.nn.Linear(8, 4)
    ref.load_state_dict(layer.state_dict())
    x2 = x.detach().clone().requires_grad_()
    ref(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast casts as for F.linear
    set_onednn_linear(False)
    try:
        with torch.no_grad():
            torch.testing.assert_close(layer(x), ref(x))
    finally:
        set_onednn_linear(True)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mlp_inference_equals_training_path(approximate: str) -> None:
    mlp = Mlp(16, 48, act_layer=lambda: torch.nn.GELU(approximate=approximate)).eval()
    x = torch.randn(2, 30, 16)
    with torch.no_grad():
        fast = mlp(x)
    torch.testing.assert_close(fast, mlp(x).detach(), rtol=1e-5, atol=1e-5)


def test_mlp_with_conv_needs_the_grid() -> None:
    mlp = Mlp(8, 16, conv=True)
    assert mlp(torch.randn(1, 12, 8), (3, 4)).shape == (1, 12, 8)
    with pytest.raises(ValueError, match="grid size"):
        mlp(torch.randn(1, 12, 8))
