"""Published ADE20K segmenters (mmsegmentation 0.x) converted with ``python -m seg.model.convert`` compute what the
published code computes.

``tests/fixtures/published_seg`` holds the whole-image logits the published segmentors (each repository's own
backbone, FPN neck, FPNHead / UPerHead and aux FCNHead, built from its ADE20K config at reduced depth, 11 classes)
give for the deterministic weights of ``tests/_published_weights.py``, at 256 x 352 and at 256 x 342 (not a
multiple of 32: Agent-PVT's flooring patch embedding, the heads' exact x2 upsampling). The test writes each
checkpoint in the published layout (``meta`` with numpy scalars, ``state_dict`` with ``backbone.`` / ``neck.`` /
``decode_head.`` / ``auxiliary_head.``, ``optimizer``), converts it with the project's recipe config and compares
the saved model's ``model(x)["out"]``. Full-size models are checked by parameter count.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from _published_weights import make_input, make_state_dict
from _specs import small_spec, spec_arg
from test_convert import write_published

from seg.model.convert import main
from seg.model.segmentor import Segmentor

ROOT = Path(__file__).parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "published_seg"
META = json.loads((FIXTURE / "models.json").read_text())
LOGITS = torch.load(FIXTURE / "logits.pt", weights_only=True)
TOLERANCE = 1e-4  # of the largest |logit|
RECIPES = {  # fixture model -> the project's config of the same published recipe
    "agent_pvt_tiny_fpn": "agent_pvt_tiny_fpn_ade20k_40k",
    "agent_swin_tiny_upernet": "agent_swin_tiny_upernet_ade20k_160k",
    "ravlt_small_fpn": "ravlt_small_fpn_ade20k_80k",
    "ravlt_small_upernet": "ravlt_small_upernet_ade20k_160k",
    "mlla_base_upernet": "mlla_base_upernet_ade20k_160k",
}
# the published full-size segmentors' parameters with their aux heads (SPEC-family part 10)
FULL_PARAMS = {"agent_pvt_tiny_fpn": 15_323_998, "agent_swin_tiny_upernet": 60_556_472,
               "ravlt_small_fpn": 28_307_542, "ravlt_small_upernet": 54_528_748, "mlla_base_upernet": 127_637_468}


def _init_args(name: str) -> dict:
    config = yaml.safe_load((ROOT / "configs" / f"{RECIPES[name]}.yaml").read_text())
    return config["model"]["model"]["init_args"]


@functools.cache
def _checkpoint_state(name: str) -> dict[str, torch.Tensor]:
    """The rule's tensors under the published names; constants the published constructor builds (RAVLT's RoPE
    frequencies) from the project's encoder, which builds the same ones."""
    entry = META["models"][name]
    state = make_state_dict([(key, tuple(shape)) for key, shape, *_ in entry["keys"]])
    args = _init_args(name)
    own = timm.create_model(args["encoder"], depths=entry["depths"]).state_dict()
    for key in entry["kept"]:
        local = key.removeprefix("backbone.")
        if local in own:
            state[key] = own[local].clone()
    return state


def test_weight_rule_reproduces_the_fixture() -> None:
    for name, entry in META["models"].items():
        state = _checkpoint_state(name)
        for key, _, _, total in entry["keys"]:
            if total is not None and key not in entry["kept"]:
                assert state[key].double().sum().item() == pytest.approx(total, rel=1e-6, abs=1e-6), key


@pytest.fixture(scope="module", params=list(RECIPES))
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    name = request.param
    entry = META["models"][name]
    folder = tmp_path_factory.mktemp(name)
    checkpoint = write_published(folder / f"{name}.pth", _checkpoint_state(name))
    kwargs = {**_init_args(name)["encoder_kwargs"], "depths": entry["depths"]}
    main([str(checkpoint), "--config", str(ROOT / "configs" / f"{RECIPES[name]}.yaml"),
          f"--model.model.init_args.encoder_kwargs={json.dumps(kwargs)}", spec_arg(small_spec(entry["num_classes"])),
          "--out", str(folder / "saved")])
    return name, folder / "saved"


def test_logits_equal_the_published_segmentor(converted: tuple[str, Path]) -> None:
    name, folder = converted
    model = Segmentor.from_pretrained(folder)
    s = META["subsample"]
    diffs = {}
    for h, w in META["sizes"]:
        with torch.no_grad():
            logits = model(make_input(META["batch"], h, w))["out"]
        assert logits.shape == (1, META["num_classes"], h, w)
        expected = LOGITS[f"{name}@{h}x{w}"]
        diffs[f"{h}x{w}"] = ((logits[:, :, ::s, ::s] - expected).abs().max() / expected.abs().max()).item()
    print(name, diffs)
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_full_size_parameter_counts(name: str) -> None:
    args = _init_args(name)
    model = Segmentor(args["encoder"], args["decoder"], num_classes=150, aux_head=args["aux_head"],
                      encoder_kwargs=args["encoder_kwargs"])
    assert sum(p.numel() for p in model.parameters()) == FULL_PARAMS[name]
