"""Agent-PVT-T and Agent-Swin-T against outputs of the published model definitions.

``tests/fixtures/published_agent`` holds what the published classifiers output at 224 x 224 and what the
published segmentation backbones (reduced depth, the ADE20K configs' agent grids) output at non-square sizes,
for deterministic weights and inputs (how they were produced: the README there). Classifier weights are written
under the published names as a checkpoint file and loaded the documented way (``pretrained=True`` with a local
file, the model's ``checkpoint_filter_fn``, strict); the backbone weights are loaded by name. Outputs must agree
to 1e-4 of their largest magnitude.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from _published_weights import SKIPPED_SUFFIXES, make_input, make_state_dict
from torch import Tensor

import seg  # noqa: F401  (registers the encoders)

FIXTURE = Path(__file__).parent / "fixtures" / "published_agent"
META = json.loads((FIXTURE / "models.json").read_text())
OUTPUTS = torch.load(FIXTURE / "outputs.pt", weights_only=True)
TOLERANCE = 1e-4  # relative to the largest magnitude of the published output
SEG_AGENT_SHAPES = {"agent_pvt_tiny_seg": (12, 16, 28, 28), "agent_swin_tiny_seg": (9, 12, 14, 7)}


@functools.cache
def _state_dict(name: str) -> dict[str, Tensor]:
    return make_state_dict([(key, tuple(shape)) for key, shape, *_ in META["models"][name]["keys"]])


def _close(got: Tensor, expected: Tensor) -> float:
    """max |got - expected| / max |expected|."""
    assert got.shape == expected.shape
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("name", list(META["models"]))
def test_weight_and_input_rule_reproduces_the_fixture(name: str) -> None:
    """The generator's tensors (per-tensor sums), else a mismatch would say nothing about the models."""
    entry = META["models"][name]
    state = _state_dict(name)
    for key, _, dtype, total in entry["keys"]:
        assert str(state[key].dtype).removeprefix("torch.") == dtype, key
        if total is not None:
            assert math.isclose(state[key].double().sum().item(), total, rel_tol=1e-5, abs_tol=1e-5), key
    batch = META["batch"]["seg" if name.endswith("_seg") else "cls"]
    x = make_input(batch, *entry["size"]).double()
    assert math.isclose(x.sum().item(), entry["input_sum"], rel_tol=1e-6, abs_tol=1e-3)


@pytest.mark.parametrize("name", ["agent_pvt_tiny", "agent_swin_tiny"])
def test_logits_equal_the_published_classifiers(name: str, tmp_path: Path) -> None:
    entry = META["models"][name]
    path = tmp_path / f"{name}.pth"
    torch.save({"model": _state_dict(name), "epoch": 299}, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    h, w = entry["size"]
    with torch.no_grad():
        got = model(make_input(META["batch"]["cls"], h, w))
    diff = _close(got, OUTPUTS[f"{name}@{h}x{w}"])
    print(f"{name}@{h}x{w}: max |diff| / max |logit| {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("name", ["agent_pvt_tiny_seg", "agent_swin_tiny_seg"])
def test_features_equal_the_published_segmentation_backbones(name: str) -> None:
    """Non-square input, the ADE20K configs' agent grids (Agent-PVT pools stage 4's 4 x 6 map up to 28 x 28)."""
    entry = META["models"][name]
    encoder = name.removesuffix("_seg")
    # Agent-Swin's backbone has the output norms norm0..3; Agent-PVT's returns the raw trunk maps: a model without
    # output norms (a classifier's trunk)
    model = timm.create_model(encoder, agent_shapes=SEG_AGENT_SHAPES[name], depths=META["seg_depths"][name],
                              feature_norms="swin" in name).eval()
    state = {k: v for k, v in _state_dict(name).items() if not k.endswith(SKIPPED_SUFFIXES)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # the published backbones have no classifier; Agent-Swin's has its final norm
    extra = {"head.weight", "head.bias"} | ({"norm.weight", "norm.bias"} if "swin" in name else set())
    assert set(missing) == extra and unexpected == []
    h, w = entry["size"]
    with torch.no_grad():
        maps = model.forward_intermediates(make_input(META["batch"]["seg"], h, w), intermediates_only=True)
    diffs = []
    for i, (f, s) in enumerate(zip(maps, META["subsample"], strict=True)):
        assert list(f.shape) == entry["shapes"][i]
        diffs.append(_close(f[:, :, ::s, ::s], OUTPUTS[f"{name}@{h}x{w}/{i}"]))
    print(f"{name}@{h}x{w}: max |diff| / max |feature| per stage " + " ".join(f"{d:.2e}" for d in diffs))
    assert max(diffs) <= TOLERANCE
