"""RAVLT-T logits against the outputs of the published model definition.

``tests/fixtures/published_logits_ravlt`` holds what the published ``RAVLT`` class with ``RAVLT_T``'s
arguments (one block per stage) computes for deterministic
weights (the rule of ``tests/_published_weights.py``) and inputs at 224 x 224, 224 x 320 and 97 x 141 (how:
the README there). The RoPE ``angle`` buffers are the published constructor's; here they come from the
project's constructor, so a wrong frequency rule fails the sums. The weights are written as a checkpoint
under the published names and loaded the documented way (``pretrained=True`` with a local file).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from _published_weights import make_input, make_state_dict
from torch import Tensor

import seg  # noqa: F401  (registers the encoders)

FIXTURE = Path(__file__).parent / "fixtures" / "published_logits_ravlt"
META = json.loads((FIXTURE / "models.json").read_text())
LOGITS = torch.load(FIXTURE / "logits.pt", weights_only=True)
TOLERANCE = 1e-4  # of the largest |logit|


@functools.cache
def _state_dict(name: str) -> dict[str, Tensor]:
    """The rule's tensors under the published names, the ``angle`` buffers from the project's constructor."""
    entry = META["models"][name]
    state = make_state_dict([(key, tuple(shape)) for key, shape, *_ in entry["keys"]])
    fresh = timm.create_model(name, depths=entry["depths"]).state_dict()
    for key in entry["kept"]:
        state[key] = fresh[key].clone()
    return state


@pytest.mark.parametrize("name", list(META["models"]))
def test_weights_inputs_and_rope_frequencies_reproduce_the_fixture(name: str) -> None:
    entry = META["models"][name]
    state = _state_dict(name)
    assert entry["kept"] and all(key.endswith("RoPE.angle") for key in entry["kept"])
    for key, shape, dtype, total in entry["keys"]:
        assert tuple(state[key].shape) == tuple(shape), key
        assert str(state[key].dtype).removeprefix("torch.") == dtype, key
        if total is not None:
            assert math.isclose(state[key].double().sum().item(), total, rel_tol=1e-6, abs_tol=1e-5), key
    for h, w in entry["sizes"]:
        x = make_input(META["batch"], h, w).double()
        assert math.isclose(x.sum().item(), entry["outputs"][f"{name}@{h}x{w}"]["input_sum"], rel_tol=1e-6,
                            abs_tol=1e-3)


@pytest.mark.parametrize("name", list(META["models"]))
def test_logits_equal_the_published_model(name: str, tmp_path: Path) -> None:
    entry = META["models"][name]
    path = tmp_path / f"{name}.pth"
    torch.save({"model": _state_dict(name)}, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              depths=entry["depths"]).eval()
    diffs = {}
    with torch.no_grad():
        for h, w in entry["sizes"]:
            key = f"{name}@{h}x{w}"
            expected = LOGITS[key]
            got = model(make_input(META["batch"], h, w))
            assert got.shape == expected.shape, key
            diffs[key] = ((got - expected).abs().max() / expected.abs().max()).item()
    print(" ".join(f"{k}: max |diff| / max |logit| {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOLERANCE, diffs
