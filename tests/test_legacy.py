"""Saved models and checkpoints written before the mmseg heads (saved-model version 3): smp's UperNet loads as
``smp_upernet``, the auxiliary head's old names load, the earlier Semantic FPN head is refused with what changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from seg.model.checkpoint import load_checkpoint
from seg.model.hub import CONFIG_FILE, WEIGHTS_FILE
from seg.model.legacy import OutdatedHeadError
from seg.model.segmentor import Segmentor

_OLD_AUX = {"convs.0.conv.": "conv.0.", "convs.0.bn.": "conv.1.", "conv_seg.": "classifier."}


def _old_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The auxiliary head under the names it had before version 3."""
    out = {}
    for key, value in state.items():
        if key.startswith("aux_head."):
            rest = key[len("aux_head."):]
            new = next(n for n in _OLD_AUX if rest.startswith(n))
            key = "aux_head." + _OLD_AUX[new] + rest[len(new):]
        out[key] = value.contiguous()
    return out


def _save_version_2(folder: Path, arguments: dict, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps({**arguments, "format": "flatten-seg", "version": 2}))
    return folder


def _model(decoder: str) -> Segmentor:
    torch.manual_seed(0)
    model = Segmentor("test_flatten_pvt", decoder, num_classes=4, decoder_channels=16, aux_head=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


def test_version_2_upernet_loads_as_smp_upernet(tmp_path: Path) -> None:
    old = _model("smp_upernet")  # what `upernet` built before version 3
    arguments = {**old.arguments, "decoder": "upernet"}
    folder = _save_version_2(tmp_path / "v2", arguments, _old_names(old.state_dict()))
    loaded = Segmentor.from_pretrained(folder)
    assert loaded.decoder_name == "smp_upernet"
    x = torch.randn(1, 3, 64, 80)
    torch.testing.assert_close(loaded(x)["out"], old(x)["out"], rtol=0, atol=0)
    loaded.train()
    torch.testing.assert_close(loaded.aux_head.conv_seg.weight, old.aux_head.conv_seg.weight)


def test_version_2_semantic_fpn_is_refused_with_what_changed(tmp_path: Path) -> None:
    model = _model("semantic_fpn")
    state = {("decode_head.scale_heads.0.blocks.0.0.weight" if k == "decode_head.scale_heads.0.0.conv.weight"
              else k): v for k, v in _old_names(model.state_dict()).items()}
    folder = _save_version_2(tmp_path / "v2", model.arguments, state)
    with pytest.raises(OutdatedHeadError, match=r"model.safetensors holds the `semantic_fpn` head of saved-model "
                                                r"versions before 3.*upsampling by exactly 2"):
        Segmentor.from_pretrained(folder)


def test_lightning_checkpoint_with_smp_upernet_names_the_fix(tmp_path: Path) -> None:
    old = _model("smp_upernet")
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in old.state_dict().items()}}, path)
    with pytest.raises(OutdatedHeadError, match="decoder: smp_upernet"):
        load_checkpoint(_model("upernet"), path)
    smp = _model("smp_upernet")
    load_checkpoint(smp, path)  # the same model under its new name loads
    torch.testing.assert_close(smp.state_dict()["decode_head.classifier.weight"],
                               old.state_dict()["decode_head.classifier.weight"])


def test_lightning_checkpoint_with_old_aux_names_loads(tmp_path: Path) -> None:
    old = _model("semantic_fpn")
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in _old_names(old.state_dict()).items()}}, path)
    new = Segmentor("test_flatten_pvt", "semantic_fpn", num_classes=4, decoder_channels=16, aux_head=True)
    load_checkpoint(new, path)
    torch.testing.assert_close(new.aux_head.convs[0].bn.running_var, old.aux_head.convs[0].bn.running_var)
