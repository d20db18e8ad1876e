"""FocusedLinearAttention2d: the plug-in NCHW layer inside a timm ResNet and on its own."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from seg.model.layers import FocusedLinearAttention2d


def test_trains_inside_a_resnet_stage():
    """resnet18 with the layer after layer3: AdamW steps on random data, finite gradients, decreasing loss."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4)
    layer = FocusedLinearAttention2d(256, num_heads=4, grid_size=(4, 4))
    model.layer3 = nn.Sequential(model.layer3, layer)
    images, labels = torch.randn(4, 3, 64, 64), torch.randint(0, 4, (4,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        for name, param in layer.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert model(torch.randn(1, 3, 75, 53)).shape == (1, 4)


@pytest.mark.parametrize("sr_ratio", [1, 2])
@pytest.mark.parametrize("size", [(7, 9), (13, 5), (16, 16)])
def test_any_size_and_reduction(size, sr_ratio):
    torch.manual_seed(0)
    layer = FocusedLinearAttention2d(32, num_heads=2, sr_ratio=sr_ratio, grid_size=(8, 8)).eval()
    x = torch.randn(2, 32, *size)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()


def test_residual_choice_and_no_position_table():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 6, 10)
    plain = FocusedLinearAttention2d(16, num_heads=2, residual=False, positional_encoding=False)
    assert plain.layer_scale is None and not plain.attn.positional_encoding.requires_grad
    residual = FocusedLinearAttention2d(16, num_heads=2, init_scale=1.0)
    residual.load_state_dict(plain.state_dict(), strict=False)
    torch.testing.assert_close(residual(x), x + plain(x))
