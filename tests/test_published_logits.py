"""Logits of the project's encoders against outputs of the published model definitions.

``tests/fixtures/published_logits`` holds what the published FLatten-PVT-T, FLatten-PVTv2-B0, FLatten-Swin-T
and SOFT-Tiny definitions output for deterministic weights and inputs (how they were produced: the README
there). Here the same weights are made under the published names, written as a checkpoint file and loaded
the documented way (``pretrained=True`` with a local file: ``weights_only`` read, the model's
``checkpoint_filter_fn``, strict load), and the logits must agree to 1e-4.
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

FIXTURE = Path(__file__).parent / "fixtures" / "published_logits"
META = json.loads((FIXTURE / "models.json").read_text())
LOGITS = torch.load(FIXTURE / "logits.pt", weights_only=True)
PUBLISHED_KEYS = json.loads((Path(__file__).parent / "fixtures" / "published_keys.json").read_text())
TOLERANCE = 1e-4


def _keys(name: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(shape)) for key, shape, *_ in META["models"][name]["keys"]]


@functools.cache
def _state_dict(name: str) -> dict[str, Tensor]:
    return make_state_dict(_keys(name))


def test_fixture_key_lists_agree_with_published_keys() -> None:
    for name in PUBLISHED_KEYS:
        assert dict(_keys(name)) == {k: tuple(v) for k, v in PUBLISHED_KEYS[name].items()}, name


@pytest.mark.parametrize("name", list(META["models"]))
def test_weight_and_input_rule_reproduces_the_fixture(name: str) -> None:
    """The generator's tensors (per-tensor sums), else a logit mismatch would say nothing about the models."""
    entry = META["models"][name]
    state = _state_dict(name)
    for key, _, dtype, total in entry["keys"]:
        assert str(state[key].dtype).removeprefix("torch.") == dtype, key
        if total is not None:
            assert math.isclose(state[key].double().sum().item(), total, rel_tol=1e-5, abs_tol=1e-5), key
    for h, w in entry["sizes"]:
        x = make_input(META["batch"], h, w).double()
        out = entry["outputs"][f"{name}@{h}x{w}"]
        assert math.isclose(x.sum().item(), out["input_sum"], rel_tol=1e-6, abs_tol=1e-3)
        assert math.isclose(x.abs().sum().item(), out["input_abs_sum"], rel_tol=1e-6)


@pytest.mark.parametrize("name", list(META["models"]))
def test_logits_equal_the_published_models(name: str, tmp_path: Path) -> None:
    entry = META["models"][name]
    path = tmp_path / f"{name}.pth"
    torch.save({"model": _state_dict(name)}, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    diffs = {}
    with torch.no_grad():
        for h, w in entry["sizes"]:
            key = f"{name}@{h}x{w}"
            expected = LOGITS[key]
            got = model(make_input(META["batch"], h, w))
            assert got.shape == expected.shape, key
            diffs[key] = (got - expected).abs().max().item()
    print(" ".join(f"{k}: max |diff| {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOLERANCE, diffs
