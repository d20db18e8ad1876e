"""FLatten-PVT / PVTv2 encoders: shapes at any size, published checkpoints, smp decoders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch

import seg  # noqa: F401  (registers the encoders)
from seg.model.backbones._weights import CheckpointMismatchError

PUBLISHED = json.loads((Path(__file__).parent / "fixtures" / "published_keys.json").read_text())
TEST_MODELS = ["test_flatten_pvt", "test_flatten_pvt_v2"]


def published_file(tmp_path: Path, name: str, model: torch.nn.Module | None = None) -> Path:
    """A checkpoint with exactly the published names and shapes; values from ``model`` where they exist."""
    own = model.state_dict() if model is not None else {}
    torch.manual_seed(1)
    sd = {k: own[k].clone() if k in own else torch.randn(shape) * 0.02 for k, shape in PUBLISHED[name].items()}
    path = tmp_path / f"{name}.pth"
    torch.save({"model": sd, "epoch": 300}, path)
    return path


@pytest.mark.parametrize("name", TEST_MODELS)
@pytest.mark.parametrize("attn_type", ["LLLL", "SSSS", "LSLS"])
@pytest.mark.parametrize("size", [(64, 96), (33, 47), (71, 53)])
def test_features_at_any_size(name: str, attn_type: str, size: tuple[int, int]) -> None:
    model = timm.create_model(name, features_only=True, attn_type=attn_type).eval()
    with torch.no_grad():
        feats = model(torch.randn(2, 3, *size))
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    for f, stride in zip(feats, (4, 8, 16, 32), strict=True):
        assert f.dim() == 4 and torch.isfinite(f).all()
        expect = [-(-s // stride) for s in size]  # ceil: v1 completes the last patch row / column with zeros
        assert list(f.shape[2:]) == expect


def test_features_pass_through_per_stage_layernorm() -> None:
    model = timm.create_model("test_flatten_pvt", features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    for f in feats:  # LayerNorm at init: zero mean, unit variance over channels
        torch.testing.assert_close(f.mean(dim=1), torch.zeros_like(f[:, 0]), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("name", "published_m"),
    [("flatten_pvt_tiny", 12.2), ("flatten_pvt_small", 21.7), ("flatten_pvt_v2_b1", 12.9), ("flatten_pvt_v2_b2", 22.6)],
)
def test_parameter_counts_match_published(name: str, published_m: float) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - published_m) / published_m < 0.02, count


@pytest.mark.parametrize("name", ["flatten_pvt_tiny", "flatten_pvt_v2_b0"])
def test_published_names_and_shapes_load_exactly(name: str, tmp_path: Path) -> None:
    path = published_file(tmp_path, name)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    sd = torch.load(path, weights_only=True)["model"]
    own = model.state_dict()
    for key, value in sd.items():
        if key in own:
            assert own[key].equal(value), key
    if name == "flatten_pvt_tiny":  # the unused final norm is dropped; output norms only in feature models
        assert "norm.weight" not in own and "norm1.weight" not in own
        features = timm.create_model(name, features_only=True, pretrained=True,
                                     pretrained_cfg_overlay=dict(file=str(path)))
        assert features.model.norm1.weight.eq(1).all() and features.model.norm4.bias.eq(0).all()
        assert features.model.block4[0].mlp.fc1.weight.equal(sd["block4.0.mlp.fc1.weight"])


def test_round_trip_published_format_reproduces_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("test_flatten_pvt_v2").eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-zero scale and positional encoding too
    path = tmp_path / "ckpt.pth"
    torch.save({"model": source.state_dict()}, path)
    loaded = timm.create_model("test_flatten_pvt_v2", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))
    feats = timm.create_model("test_flatten_pvt_v2", features_only=True, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        _, intermediates = source.forward_intermediates(x)
        for a, b in zip(feats(x), intermediates, strict=True):
            torch.testing.assert_close(a, b)


def test_classifier_is_mean_of_stage4_tokens_then_head() -> None:
    model = timm.create_model("test_flatten_pvt").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)  # (B, C, H/32, W/32)
        torch.testing.assert_close(model(x), model.head(tokens.flatten(2).mean(-1)))


def test_position_tables_are_resized_to_the_model_grid(tmp_path: Path) -> None:
    path = published_file(tmp_path, "flatten_pvt_tiny")
    model = timm.create_model("flatten_pvt_tiny", img_size=256, num_classes=10, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert model.pos_embed1.shape == (1, 64 * 64, 64)
    assert model.block1[0].attn.positional_encoding.shape == (1, 64 * 64, 64)
    assert model.head.weight.shape == (10, 512)  # a different class count keeps its own head


def test_mismatched_file_lists_missing_and_unexpected_names(tmp_path: Path) -> None:
    sd = timm.create_model("test_flatten_pvt").state_dict()
    sd.pop("block1.0.attn.dwc.weight")
    sd["block9.0.attn.q.weight"] = torch.zeros(3)
    sd["block2.0.mlp.fc1.weight"] = torch.zeros(5, 5)
    path = tmp_path / "wrong.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        timm.create_model("test_flatten_pvt", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    msg = str(err.value)
    assert str(path) in msg
    assert "missing (1): block1.0.attn.dwc.weight" in msg
    assert "unexpected (1): block9.0.attn.q.weight" in msg
    assert "block2.0.mlp.fc1.weight: file (5, 5)" in msg


def test_file_with_pickled_code_is_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": Payload()}}, path)
    with pytest.raises(Exception, match="weights_only|Unsupported global|WeightsUnpickler"):
        timm.create_model("test_flatten_pvt", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert not (tmp_path / "pwned").exists()


SMALL_DECODERS = [
    (smp.UPerNet, dict(decoder_channels=32)),
    (smp.FPN, dict(decoder_pyramid_channels=32, decoder_segmentation_channels=32)),
]


@pytest.mark.parametrize(("arch", "decoder"), SMALL_DECODERS)
@pytest.mark.parametrize("name", TEST_MODELS)
def test_smp_decoders_train_at_512_without_unused_parameters(arch: type, decoder: dict, name: str) -> None:
    model = arch(encoder_name=f"tu-{name}", encoder_weights=None, classes=150, **decoder)
    out = model(torch.randn(2, 3, 512, 512))
    assert out.shape == (2, 150, 512, 512)
    out.logsumexp(1).mean().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


@pytest.mark.slow
def test_full_tiny_upernet_trains_at_512() -> None:
    model = smp.UPerNet(encoder_name="tu-flatten_pvt_tiny", encoder_weights=None, classes=150)
    model(torch.randn(2, 3, 512, 512)).logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_original_pvt_checkpoint_with_class_token_loads_into_softmax_baseline(tmp_path: Path) -> None:
    model = timm.create_model("test_flatten_pvt", attn_type="SSSS")
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(("norm1", "norm2", "norm3", "norm4"))}
    cls_entry = torch.randn(1, 1, sd["pos_embed4"].shape[-1])
    sd["pos_embed4"] = torch.cat([cls_entry, sd["pos_embed4"]], dim=1)  # (1, 1 + 7*7, C)
    sd["cls_token"] = cls_entry
    sd["norm.weight"], sd["norm.bias"] = torch.ones(64), torch.zeros(64)
    path = tmp_path / "pvt_tiny.pth"
    torch.save({"model": sd}, path)
    loaded = timm.create_model("test_flatten_pvt", attn_type="SSSS", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)))
    assert loaded.pos_embed4.equal(model.pos_embed4)
