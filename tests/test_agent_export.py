"""Agent-PVT exports with dynamic H x W: strict torch.export and ONNX (onnxruntime) equal to eager at other sizes.

Slow (minutes on 2 cores: tracing the four stages' bias resizes); run with ``-m slow``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import seg  # noqa: F401  (registers the encoders)
from seg.kernels import set_backend
from seg.model.segmentor import Segmentor
from seg.serve.export import export_onnx, export_program, export_supported

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.slow
@pytest.mark.skipif(not export_supported(), reason="this torch cannot export the models")
def test_agent_pvt_semantic_fpn_dynamic_sizes(tmp_path) -> None:
    """Traced at 64 x 96 with the published downstream agent grids (stage 4's 2 x 3 map pooled up to 28 x 28),
    run at 96 x 64 and at a size that is no multiple of 32."""
    torch.manual_seed(0)
    model = Segmentor("test_agent_pvt", "semantic_fpn", num_classes=5, decoder_channels=16, aux_head=False,
                      encoder_kwargs=dict(agent_shapes=(12, 16, 28, 28)))
    model = set_backend(model, "reference").eval()
    program = export_program(model, torch.randn(1, 3, 64, 96))
    image = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(image), model(image)["out"], atol=1e-5, rtol=0)
    session = ort.InferenceSession(str(export_onnx(program, tmp_path / "model.onnx")),
                                   providers=["CPUExecutionProvider"])
    for h, w in [(96, 64), (75, 101)]:
        image = torch.randn(1, 3, h, w)
        with torch.no_grad():
            expected = model(image)["out"].numpy()
        (got,) = session.run(None, {"image": image.numpy()})
        assert got.shape == (1, 5, h, w)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
