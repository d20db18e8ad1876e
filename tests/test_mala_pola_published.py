"""MALA-T / S and PolaFormer-PVT-T / Swin-T against the outputs of the published model definitions.

``tests/fixtures/published_mala_pola`` holds what the published classifiers output at 224 x 224, and what the
published MALA-T segmentation backbone outputs at 480 x 653, for deterministic weights and inputs (how they were
produced: the README there). Classifier weights are written under the published names as a checkpoint file and
loaded the documented way (``pretrained=True`` with a local file, the model's ``checkpoint_filter_fn``, strict);
the same files then load into ``features_only`` models that must run at 480 x 653. Backbone weights are loaded by
name. Outputs must agree to 1e-4 of their largest magnitude.
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
SLOW = {"mala_small", "pola_swin_tiny", "mala_tiny_seg"}  # each over ~10 s on two CPU threads
ALL = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in META["models"]]
CLASSIFIERS = [p for p in ALL if not getattr(p, "values", (p,))[0].endswith("_seg")]


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
    model = timm.create_model(name.removesuffix("_seg"))
    return {k: v.clone() for k, v in model.state_dict().items() if k in META["models"][name]["kept"]}


def _checkpoint(name: str, path: Path) -> Path:
    torch.save({"model": _state_dict(name), "epoch": 299}, path)
    return path


@pytest.mark.parametrize("name", ALL)
def test_weight_rule_reproduces_the_fixture(name: str) -> None:
    entry = META["models"][name]
    state = _state_dict(name)
    for key, _, dtype, total in entry["keys"]:
        assert str(state[key].dtype).removeprefix("torch.") == dtype, key
        if total is not None:
            assert math.isclose(state[key].double().sum().item(), total, rel_tol=1e-5, abs_tol=1e-5), key
    backbone = name.endswith("_seg")
    x = make_input(1 if backbone else META["batch"], *META["seg_size" if backbone else "size"]).double()
    assert math.isclose(x.sum().item(), entry["input_sum"], rel_tol=1e-6, abs_tol=1e-3)


@pytest.mark.parametrize("name", CLASSIFIERS)
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
@pytest.mark.parametrize("name", [n for n in META["models"] if not n.endswith("_seg")])
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


@pytest.mark.slow  # the full MALA-T backbone at 480 x 653: about 15 s
def test_features_equal_the_published_mala_segmentation_backbone() -> None:
    """The published backbone (configs/MALA/FPN_t_1x.py) normalises each stage map with ``extra_norms``, as the
    project's models with output norms do; it has no classifier projection, norm or head."""
    name = "mala_tiny_seg"
    entry = META["models"][name]
    model = timm.create_model("mala_tiny", feature_norms=True).eval()
    missing, unexpected = model.load_state_dict(_state_dict(name), strict=False)
    assert set(missing) == {"proj.weight", "proj.bias", "head.weight", "head.bias"} | {
        f"norm.{k}" for k in ("weight", "bias", "running_mean", "running_var")}  # BN fills num_batches_tracked
    assert unexpected == []
    h, w = META["seg_size"]
    with torch.no_grad():
        maps = model.forward_intermediates(make_input(1, h, w), intermediates_only=True)
    diffs = []
    for i, (f, s) in enumerate(zip(maps, META["subsample"], strict=True)):
        assert list(f.shape) == entry["shapes"][i]
        expected = OUTPUTS[f"{name}@{h}x{w}/{i}"]
        diffs.append(((f[:, :, ::s, ::s] - expected).abs().max() / expected.abs().max()).item())
    print(f"{name}@{h}x{w}: max |diff| / max |feature| per stage " + " ".join(f"{d:.2e}" for d in diffs))
    assert max(diffs) <= TOLERANCE
