"""MALA-T / S and PolaFormer-PVT-T / Swin-T against the logits of the published model definitions.

``tests/fixtures/published_mala_pola`` holds what the published classifiers output at 224 x 224 for
deterministic weights and inputs (how they were produced: the README there). The weights are written under the
published names as a checkpoint file and loaded the documented way (``pretrained=True`` with a local file, the
model's ``checkpoint_filter_fn``, strict); the logits must agree to 1e-4 of their largest magnitude. The same
files then load into ``features_only`` models that must run at a size no published classifier takes.
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

FIXTURE = Path(__file__).parent / "fixtures" / "published_mala_pola"
META = json.loads((FIXTURE / "models.json").read_text())
OUTPUTS = torch.load(FIXTURE / "outputs.pt", weights_only=True)
TOLERANCE = 1e-4  # relative to the largest |logit| of the published model
SLOW = {"mala_small", "pola_swin_tiny"}  # each over ~10 s on two CPU threads
MODELS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in META["models"]]


@functools.cache
def _state_dict(name: str) -> dict[str, Tensor]:
    """The fixture's weights under the published names; constants of the published constructor (``kept``,
    MALA's RoPE frequencies) from the project's own model, so a wrong rule fails the sums check."""
    entry = META["models"][name]
    state = make_state_dict([(key, tuple(shape)) for key, shape, *_ in entry["keys"]])
    state.update(_kept(name))
    return state


@functools.cache
def _kept(name: str) -> dict[str, Tensor]:
    if not META["models"][name]["kept"]:
        return {}
    model = timm.create_model(name)
    return {k: v.clone() for k, v in model.state_dict().items() if k in META["models"][name]["kept"]}


def _checkpoint(name: str, path: Path) -> Path:
    torch.save({"model": _state_dict(name), "epoch": 299}, path)
    return path


@pytest.mark.parametrize("name", MODELS)
def test_weight_rule_reproduces_the_fixture(name: str) -> None:
    entry = META["models"][name]
    state = _state_dict(name)
    for key, _, dtype, total in entry["keys"]:
        assert str(state[key].dtype).removeprefix("torch.") == dtype, key
        if total is not None:
            assert math.isclose(state[key].double().sum().item(), total, rel_tol=1e-5, abs_tol=1e-5), key
    x = make_input(META["batch"], *META["size"]).double()
    assert math.isclose(x.sum().item(), entry["input_sum"], rel_tol=1e-6, abs_tol=1e-3)


@pytest.mark.parametrize("name", MODELS)
def test_logits_equal_the_published_classifiers(name: str, tmp_path: Path) -> None:
    path = _checkpoint(name, tmp_path / f"{name}.pth")
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    h, w = META["size"]
    expected = OUTPUTS[f"{name}@{h}x{w}"]
    with torch.no_grad():
        got = model(make_input(META["batch"], h, w))
    diff = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"{name}@{h}x{w}: max |diff| / max |logit| {diff:.2e}")
    assert diff <= TOLERANCE
    assert (expected[0] - expected[1]).abs().max() > 100 * TOLERANCE * expected.abs().max()  # the images differ


@pytest.mark.slow  # full-size models at 480 x 653: 9-18 s each on two CPU threads
@pytest.mark.parametrize("name", list(META["models"]))
def test_published_checkpoint_runs_features_only_at_480_x_653(name: str, tmp_path: Path) -> None:
    path = _checkpoint(name, tmp_path / f"{name}.pth")
    model = timm.create_model(name, features_only=True, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        maps = model(make_input(1, 480, 653))
    sides = [(math.ceil(480 / s), math.ceil(653 / s)) for s in (4, 8, 16, 32)]
    assert [tuple(f.shape[2:]) for f in maps] == sides
    assert [f.shape[1] for f in maps] == model.feature_info.channels()
    assert all(torch.isfinite(f).all() for f in maps)
