"""timm's model contract for every encoder name the project registers.

What each check means follows timm's own model tests (forward, backward, default config, features,
forward_intermediates; not its torch.fx / TorchScript ones). The names come from the project's registry, so a
family added later is checked without editing this file: its tiny ``test_*`` variants in the default run, its
full sizes under ``-m slow``.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import Tensor, nn

import seg.backbones  # noqa: F401  (registers the encoders)
from seg.backbones._registry import encoder_names

TINY = encoder_names("test_*")
FULL = [name for name in encoder_names() if name not in TINY]
NAMES = [pytest.param(name, id=name) for name in TINY] + [
    pytest.param(name, id=name, marks=pytest.mark.slow) for name in FULL
]
FEATURE_SIZE = (64, 48)  # not square, and 48 is no multiple of 32: stage maps ceil(H / r) x ceil(W / r)
BACKWARD_SIZE = (64, 64)


def _image(*size: int, batch: int = 1, seed: int = 0) -> Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _layer_norm_channels(norm: nn.Module, x: Tensor) -> Tensor:
    """A LayerNorm over C of an NCHW map, written out: (x - mean) / sqrt(var + eps) * weight + bias."""
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight[:, None, None] + norm.bias[:, None, None]


def _randomise_norms(model: nn.Module, seed: int) -> None:
    """Non-trivial LayerNorm affines (they start at the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))


def test_registry_lists_every_family_with_a_tiny_variant() -> None:
    assert {"test_flatten_pvt", "test_flatten_pvt_v2", "test_flatten_swin", "test_soft"} <= set(TINY)
    assert {"flatten_pvt_tiny", "flatten_pvt_v2_b0", "flatten_swin_tiny", "soft_tiny"} <= set(FULL)
    assert "pvt_v2_b0" in timm.list_models() and "pvt_v2_b0" not in encoder_names()  # timm's own: not ours
    families = {timm.models.model_entrypoint(name).__module__ for name in FULL}
    tested = {timm.models.model_entrypoint(name).__module__ for name in TINY}
    assert families <= tested, f"families without a test_* variant (the default run): {families - tested}"


@pytest.mark.parametrize("name", NAMES)
def test_default_cfg_shapes_and_classifier_resets(name: str) -> None:
    """timm's default-config test: unpooled features match ``pool_size`` / ``num_features`` in the declared
    ``output_fmt``, pre-logits have ``head_hidden_size``, removing the classifier and the pooling works."""
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg["num_classes"] == 1000
    assert model.num_features > 0 and model.head_hidden_size > 0
    state = model.state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    assert state[cfg["first_conv"] + ".weight"].shape[1] == cfg["input_size"][0]

    x = _image(*cfg["input_size"][1:])
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        logits = model(x)
    fmt = getattr(model, "output_fmt", "NCHW")
    if fmt == "NCHW":
        assert features.shape == (1, model.num_features, *cfg["pool_size"])
        pooled = features.mean(dim=(2, 3))
    else:
        assert fmt == "NLC" and model.num_prefix_tokens > 0, fmt  # class tokens first, then the grid
        assert features.shape == (1, model.num_prefix_tokens + math.prod(cfg["pool_size"]), model.num_features)
        pooled = features[:, 0] if model.global_pool == "token" else features[:, model.num_prefix_tokens:].mean(1)
    assert pre_logits.shape == (1, model.head_hidden_size)
    torch.testing.assert_close(pre_logits, pooled)
    torch.testing.assert_close(logits, model.get_classifier()(pre_logits))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()

    model.reset_classifier(0)
    assert model.num_classes == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), pre_logits)  # pooled, no head
    model.reset_classifier(0, "")
    with torch.no_grad():
        torch.testing.assert_close(model(x), features)  # no pooling either
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), features)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(0, "nope")

    unpooled = timm.create_model(name, num_classes=0, global_pool="").eval()
    unpooled.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(unpooled(x), features)


def test_unpooled_head_gives_logits_at_every_position() -> None:
    model = timm.create_model("test_flatten_swin", num_classes=3, global_pool="").eval()
    x = _image(64, 96)
    with torch.no_grad():
        features = model.forward_features(x)  # (1, C, 2, 3)
        logits = model(x)
    assert logits.shape == (1, 3, 2, 3)
    expected = torch.einsum("kc,bchw->bkhw", model.head.weight, features) + model.head.bias[:, None, None]
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    """timm's backward test: 42 classes, train mode; no parameter (e.g. a feature-only norm) without gradient."""
    model = timm.create_model(name, num_classes=42).train()
    out = model(_image(*BACKWARD_SIZE, batch=2))
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", NAMES)
def test_gradient_checkpointing_keeps_the_output(name: str) -> None:
    model = timm.create_model(name).eval()
    x = _image(*BACKWARD_SIZE)
    reference = model(x)
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_features_only(name: str) -> None:
    """timm's features test (the getter wrapper over forward_intermediates): 4 NCHW maps with the channels
    and strides of ``feature_info``; no classifier; every parameter gets a gradient (DDP needs it)."""
    model = timm.create_model(name, features_only=True).train()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert reductions == [4, 8, 16, 32]
    feats = model(_image(*FEATURE_SIZE, batch=2))
    assert len(feats) == len(channels)
    for f, c, r in zip(feats, channels, reductions, strict=True):
        assert f.shape == (2, c, math.ceil(FEATURE_SIZE[0] / r), math.ceil(FEATURE_SIZE[1] / r))
        assert torch.isfinite(f).all()
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("model.head.") for n in names)
    sum(f.square().mean() for f in feats).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", NAMES)
def test_features_only_subset_prunes_what_it_does_not_use(name: str) -> None:
    full = timm.create_model(name, features_only=True).eval()
    part = timm.create_model(name, features_only=True, out_indices=(1, 2)).train()
    assert part.feature_info.channels() == full.feature_info.channels()[1:3]
    assert sum(p.numel() for p in part.parameters()) < sum(p.numel() for p in full.parameters())
    feats = part(_image(*FEATURE_SIZE))
    assert [f.shape[1] for f in feats] == part.feature_info.channels()
    sum(f.square().mean() for f in feats).backward()
    missing = [n for n, p in part.named_parameters() if p.grad is None]
    assert not missing, missing  # the stage-4 modules and the unused output norms are gone


@pytest.mark.parametrize("name", NAMES)
def test_feature_maps_pass_through_the_output_norms(name: str) -> None:
    """A feature model's maps are the classifier's stage maps through the per-stage output norms (where the
    family has them: ``feature_info``'s module names them), with the same trunk weights."""
    torch.manual_seed(0)
    classifier = timm.create_model(name).eval()
    features = timm.create_model(name, features_only=True).eval()
    _randomise_norms(features, seed=1)
    own = features.model.state_dict()
    trunk = {k: v for k, v in classifier.state_dict().items() if k in own}
    assert all(k.startswith(("head.", "norm.")) for k in classifier.state_dict().keys() - own.keys())
    missing, _ = features.model.load_state_dict(trunk, strict=False)
    modules = [info["module"] for info in features.model.feature_info]
    assert all(key.split(".")[0] in modules for key in missing), missing  # only output norms are new
    x = _image(*FEATURE_SIZE)
    with torch.no_grad():
        raw = classifier.forward_intermediates(x, intermediates_only=True)
        got = features(x)
    for i, (r, g) in enumerate(zip(raw, got, strict=True)):
        module = modules[i]
        if any(key.startswith(module + ".") for key in missing):
            r = _layer_norm_channels(features.model.get_submodule(module), r)
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates(name: str) -> None:
    """timm's semantics of indices, norm, output_fmt, intermediates_only and stop_early."""
    model = timm.create_model(name).eval()
    _randomise_norms(model, seed=2)
    x = _image(*FEATURE_SIZE)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1] for t in inter] == [info["num_chs"] for info in model.feature_info]
        for t, info in zip(inter, model.feature_info, strict=True):
            assert t.shape[2:] == tuple(math.ceil(s / info["reduction"]) for s in FEATURE_SIZE)

        only = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        assert isinstance(only, list) and len(only) == 2
        torch.testing.assert_close(only, [inter[0], inter[2]])
        _, last_two = model.forward_intermediates(x, indices=2, output_fmt="NHWC")  # an int: the last n stages
        torch.testing.assert_close(last_two, [inter[2].permute(0, 2, 3, 1), inter[3].permute(0, 2, 3, 1)])
        with pytest.raises(ValueError, match="output_fmt"):
            model.forward_intermediates(x, output_fmt="NCL")

        early, (stage1,) = model.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(stage1, inter[1])
        assert early.shape != final.shape  # the trunk stopped after stage 1

        _, normed = model.forward_intermediates(x, norm=True)
        torch.testing.assert_close(normed[:3], inter[:3])
        final_norm = getattr(model, "norm", None)  # the classifier's final norm, where the family has one
        expected = inter[3] if final_norm is None else _layer_norm_channels(final_norm, inter[3])
        torch.testing.assert_close(normed[3], expected, rtol=1e-4, atol=1e-4)

    model.set_grad_checkpointing()
    final2, _ = model.forward_intermediates(x)
    torch.testing.assert_close(final2, final, rtol=1e-4, atol=1e-5)
