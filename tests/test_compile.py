"""torch.compile switch of the task: compiled in place, same logits, same checkpoint keys (slow: inductor)."""

from __future__ import annotations

import pytest
import torch

from seg.models import Segmentor
from seg.task import SegmentationTask

pytestmark = pytest.mark.slow


def test_compile_switch_keeps_outputs_and_checkpoint_keys() -> None:
    torch.manual_seed(0)
    model = Segmentor("test_flatten_pvt", "semantic_fpn", num_classes=4, decoder_channels=16, aux_head=False)
    task = SegmentationTask(model, compile=True).eval()
    keys = list(task.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        eager = task.model(x)["out"]
        task.configure_model()
        assert task.model._compiled_call_impl is not None
        compiled = task.model(x)["out"]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert list(task.state_dict()) == keys
