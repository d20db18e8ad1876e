"""Tests for the segmentor: shapes, aux head, gradients, param groups, checkpoints (padding: test_padding.py)."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import timm
import torch
import torch.nn.functional as F

import seg.model.segmentor as models
from seg.model.segmentor import DECODERS, DecoderName, Segmentor
from seg.train.weight_decay import no_decay_names, param_groups, plan_weight_decay

# timm's PVTv2-B0 shrunk to one block per stage: same code path as a real encoder, fast on CPU.
TINY = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))
NUM_CLASSES = 5
SIZES = [(64, 96), (70, 101)]
_CACHE: dict[str, Segmentor] = {}


def _tiny(decoder: str) -> Segmentor:
    """One tiny segmentor per decoder, shared by the tests (they never change its weights)."""
    if decoder not in _CACHE:
        torch.manual_seed(0)
        _CACHE[decoder] = Segmentor(
            "pvt_v2_b0", decoder, num_classes=NUM_CLASSES, decoder_channels=32, encoder_kwargs=TINY
        )
    return _CACHE[decoder]


@pytest.mark.parametrize("decoder", ["upernet", "semantic_fpn", "segformer", "fpn"])
@pytest.mark.parametrize("size", SIZES)
def test_output_shapes_train_and_eval(decoder: str, size: tuple[int, int]) -> None:
    model = _tiny(decoder)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model.train()(x)
        assert set(out) == {"out", "aux"}
        assert out["out"].shape == out["aux"].shape == (2, NUM_CLASSES, *size)
        out = model.eval()(x)
    assert set(out) == {"out"}
    assert out["out"].shape == (2, NUM_CLASSES, *size)
    assert torch.isfinite(out["out"]).all()


@pytest.mark.parametrize("decoder", ["upernet", "semantic_fpn"])
def test_channels_last_heads_compute_the_same_logits(decoder: str) -> None:
    model = _tiny(decoder).eval()
    assert model.decode_head.state_dict()  # heads hold channels-last conv weights by default
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in model.decode_head.parameters())
    plain = Segmentor("pvt_v2_b0", decoder, num_classes=NUM_CLASSES, decoder_channels=32, encoder_kwargs=TINY,
                      channels_last=False).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["out"], plain(x)["out"], rtol=1e-4, atol=1e-4)


def test_no_aux_head_when_disabled() -> None:
    model = Segmentor("pvt_v2_b0", "semantic_fpn", num_classes=3, aux_head=False, encoder_kwargs=TINY)
    assert model.aux_head is None
    assert set(model.train()(torch.randn(2, 3, 64, 64))) == {"out"}


def test_aux_head_reads_stride_16_stage() -> None:
    model = _tiny("semantic_fpn")
    assert model.encoder_channels == [16, 32, 64, 128]
    assert model.aux_head.convs[0].conv.in_channels == 64


@pytest.mark.parametrize("decoder", ["upernet", "semantic_fpn", "segformer"])
def test_backward_reaches_every_parameter(decoder: str) -> None:
    torch.manual_seed(0)
    model = Segmentor("pvt_v2_b0", decoder, num_classes=NUM_CLASSES, decoder_channels=32, encoder_kwargs=TINY)
    out = model.train()(torch.randn(2, 3, 70, 101))
    target = torch.randint(0, NUM_CLASSES, (2, 70, 101))
    (F.cross_entropy(out["out"], target) + 0.4 * F.cross_entropy(out["aux"], target)).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_upernet_training_batch_of_one_raises() -> None:
    model = _tiny("upernet")
    with pytest.raises(ValueError, match="more than one image"):
        model.train()(torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64))["out"].shape == (1, NUM_CLASSES, 64, 64)


def test_semantic_fpn_trains_with_batch_of_one() -> None:
    out = _tiny("semantic_fpn").train()(torch.randn(1, 3, 64, 64))
    assert out["out"].shape == (1, NUM_CLASSES, 64, 64)


def test_decoder_table_matches_literal() -> None:
    assert set(DECODERS) == set(get_args(DecoderName))


def test_unknown_decoder_lists_options() -> None:
    with pytest.raises(ValueError, match="upernett") as err:
        Segmentor("pvt_v2_b0", "upernett", encoder_kwargs=TINY)  # type: ignore[arg-type]
    for name in DECODERS:
        assert name in str(err.value)


def test_config_parser_rejects_unknown_decoder() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Segmentor, "model")
    cfg = parser.parse_args(["--model.encoder=pvt_v2_b0", "--model.decoder=semantic_fpn"])
    assert cfg.model.decoder == "semantic_fpn"
    with pytest.raises(Exception, match="semantic_fpn"):
        parser.parse_args(["--model.encoder=pvt_v2_b0", "--model.decoder=upernett"])


def test_missing_checkpoint_raises_before_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def _no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("encoder built before checking the checkpoint path")

    monkeypatch.setattr(models, "get_encoder", _no_build)
    path = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        Segmentor("pvt_v2_b0", encoder_checkpoint=str(path), encoder_kwargs=TINY)


def test_encoder_checkpoint_is_loaded(tmp_path: Path) -> None:
    torch.manual_seed(123)
    source = timm.create_model("pvt_v2_b0", **TINY)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))  # move away from any init a fresh model could share
    state = source.state_dict()
    path = tmp_path / "imagenet.pth"
    torch.save({"model": state}, path)

    def encoder_state(model: Segmentor) -> dict[str, torch.Tensor]:
        # The features-only wrapper renames "stages.0" to "stages_0".
        return {k.replace("stages_", "stages."): v for k, v in model.encoder.model.state_dict().items()}

    loaded = encoder_state(
        Segmentor("pvt_v2_b0", "semantic_fpn", encoder_checkpoint=str(path), encoder_kwargs=TINY)
    )
    fresh = encoder_state(Segmentor("pvt_v2_b0", "semantic_fpn", encoder_kwargs=TINY))
    assert set(loaded) == set(state) - {"head.weight", "head.bias"}
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    key = "patch_embed.proj.weight"
    assert (fresh[key] - state[key]).abs().max() > 0.1


def test_weight_decay_rules() -> None:
    model = Segmentor("test_flatten_pvt", "upernet", num_classes=NUM_CLASSES, decoder_channels=32)
    names = {n for n, _ in model.named_parameters()}
    assert no_decay_names(model, "decay_all") == set()  # PVT recipe: everything decays
    swin = no_decay_names(model, "norms_tables")
    default = no_decay_names(model, "norms_biases_tables")
    assert swin < default <= names
    for name in ("encoder.model.model.block1.0.attn.scale", "encoder.model.model.block1.0.attn.positional_encoding",
                 "encoder.model.model.pos_embed1", "encoder.model.model.block1.0.norm1.weight",
                 "encoder.model.model.block1.0.norm1.bias"):
        assert name in names and name in swin
    bn = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert {f"{bn}.weight", f"{bn}.bias"} <= swin  # by module type, whatever the name
    assert "decode_head.conv_seg.bias" in default - swin  # the Swin recipe decays biases of other layers
    assert "encoder.model.model.block1.0.attn.q.bias" in default - swin
    for name in ("decode_head.conv_seg.weight", "encoder.model.model.block1.0.attn.q.weight"):
        assert name not in default
    with pytest.raises(ValueError, match="norms_tables"):
        no_decay_names(model, "norms")  # type: ignore[arg-type]


@pytest.mark.parametrize("encoder", ["pvt_v2_b0", "test_flatten_pvt"])
def test_param_groups_partition(encoder: str) -> None:
    if encoder not in timm.list_models(encoder):
        pytest.skip(f"{encoder} is not registered")
    kwargs = TINY if encoder == "pvt_v2_b0" else {}
    model = Segmentor(encoder, "upernet", num_classes=NUM_CLASSES, decoder_channels=32, encoder_kwargs=kwargs)
    decay, no_decay = param_groups(model.named_parameters(), plan_weight_decay(model, "norms_biases_tables"))
    assert "weight_decay" not in decay and no_decay["weight_decay"] == 0.0  # the optimizer's own decay applies
    ids_decay = [id(p) for p in decay["params"]]
    ids_no = [id(p) for p in no_decay["params"]]
    all_ids = [id(p) for p in model.parameters()]
    assert len(ids_decay) + len(ids_no) == len(all_ids)
    assert set(ids_decay) | set(ids_no) == set(all_ids)
    assert set(ids_decay).isdisjoint(ids_no)
    assert all(p.ndim >= 2 for p in decay["params"])

    names = {id(p): n for n, p in model.named_parameters()}
    no_names = {names[i] for i in ids_no}
    decay_names = {names[i] for i in ids_decay}
    assert any(n.endswith("norm.weight") for n in no_names)  # LayerNorm weights
    assert any(n.endswith(".bias") for n in no_names)
    assert "decode_head.conv_seg.weight" in decay_names
    assert "aux_head.convs.0.conv.weight" in decay_names
    assert any(n.endswith("attn.q.weight") for n in decay_names)  # a linear weight
    if encoder == "test_flatten_pvt":
        keys = ("pos_embed", "positional_encoding")
        tables = [n for n in names.values() if any(k in n for k in keys) or n.endswith(".scale")]
        assert tables and set(tables) <= no_names
