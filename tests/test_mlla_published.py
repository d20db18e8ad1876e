"""MLLA-T against outputs of the published MLLA definitions (``tests/fixtures/published_mlla``, README there).

The same deterministic weights are made under the published names (the classification model's plus the
segmentation backbone's ``norm0..3``; ``rope.rotations`` and ``num_batches_tracked`` as zero placeholders),
written as a checkpoint file and loaded the documented way (``pretrained=True`` with a local file:
``weights_only`` read, :func:`seg.model.backbones.mlla.checkpoint_filter_fn`, strict load). The logits at 224 x 224
must equal the published classifier's and the four feature maps at 122 x 186 the published segmentation
backbone's, to 1e-4 of the largest reference value.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from _published_weights import make_input, value_for
from torch import Tensor

import seg  # noqa: F401  (registers the encoders)

FIXTURE = Path(__file__).parent / "fixtures" / "published_mlla"
META = json.loads((FIXTURE / "models.json").read_text())
ENTRY = META["models"]["mlla_tiny"]
OUTPUTS = torch.load(FIXTURE / "outputs.pt", weights_only=True)
TOLERANCE = 1e-4  # relative to the largest |value| of each reference output


@functools.cache
def _state_dict() -> dict[str, Tensor]:
    """The fixture's weights under the published names; structural buffers as zero placeholders."""
    out = {}
    for index, (name, shape, dtype, total) in enumerate(ENTRY["keys"]):
        if total is None:
            out[name] = torch.zeros(shape, dtype=getattr(torch, dtype))
        else:
            out[name] = value_for(index, name, tuple(shape))
    return out


def test_weight_and_input_rule_reproduces_the_fixture() -> None:
    """Per-tensor and input sums first, else a mismatch below would say nothing about the models."""
    state = _state_dict()
    assert [k for k, *_ in ENTRY["keys"]] == sorted(state)
    for name, _, _, total in ENTRY["keys"]:
        if total is not None:
            assert math.isclose(state[name].double().sum().item(), total, rel_tol=1e-5, abs_tol=1e-5), name
    for h, w in ENTRY["logit_sizes"] + ENTRY["feature_sizes"]:
        stats = next(v for k, v in ENTRY["outputs"].items() if k.startswith(f"mlla_tiny@{h}x{w}"))
        x = make_input(META["batch"], h, w).double()
        assert math.isclose(x.sum().item(), stats["input_sum"], rel_tol=1e-6, abs_tol=1e-3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("mlla") / "mlla_tiny.pth"
    torch.save({"model": _state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def model(checkpoint: str) -> torch.nn.Module:
    return timm.create_model("mlla_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint)).eval()


@pytest.fixture(scope="module")
def feature_model(checkpoint: str) -> torch.nn.Module:
    """The classifier's weights with the output norms ``norm0..3`` of a feature model (at their init, as in the
    published segmentation backbone)."""
    return timm.create_model("mlla_tiny", pretrained=True, feature_norms=True,
                             pretrained_cfg_overlay=dict(file=checkpoint)).eval()


def _relative_diff(got: Tensor, expected: Tensor) -> float:
    assert got.shape == expected.shape
    return ((got - expected).abs().max() / expected.abs().max()).item()


def test_logits_equal_the_published_classifier(model: torch.nn.Module) -> None:
    diffs = {}
    with torch.no_grad():
        for h, w in ENTRY["logit_sizes"]:
            key = f"mlla_tiny@{h}x{w}"
            diffs[key] = _relative_diff(model(make_input(META["batch"], h, w)), OUTPUTS[key])
    print(diffs)
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_features_equal_the_published_segmentation_backbone(feature_model: torch.nn.Module) -> None:
    """Non-square, no side a multiple of 4: the stem's and patch merging's padding and RoPE on the live grid."""
    diffs = {}
    with torch.no_grad():
        for h, w in ENTRY["feature_sizes"]:
            features = feature_model.forward_intermediates(make_input(META["batch"], h, w), intermediates_only=True)
            assert len(features) == 4
            for i, feature in enumerate(features):
                key = f"mlla_tiny@{h}x{w}/features{i}"
                diffs[key] = _relative_diff(feature, OUTPUTS[key])
    print(diffs)
    assert max(diffs.values()) <= TOLERANCE, diffs
