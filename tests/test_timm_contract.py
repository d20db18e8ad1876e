"""timm's model contract for every encoder name the project registers.

What each check means follows timm's own model tests (forward, backward, default config, features,
forward_intermediates; not its torch.fx / TorchScript ones). The names come from the project's registry, so a
family added later is checked without editing this file: each check runs on its tiny ``test_*`` variants in the
default run, and all of them on each full size under ``-m slow`` (one build of each model, reused).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import timm
import timm.layers.weight_init
import torch
from timm.models._features import FeatureGetterNet
from torch import Tensor, nn

import seg.model.backbones  # noqa: F401  (registers the encoders)
from seg.model.backbones._registry import encoder_names

TINY = encoder_names("test_*")
FULL = [name for name in encoder_names() if name not in TINY]
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


def _no_gradient(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.grad is None]


# ---------------------------------------------------------------- the checks, one per part of the contract


def check_default_cfg(model: nn.Module, unpooled: nn.Module) -> None:
    """timm's default-config test: unpooled features match ``pool_size`` / ``num_features`` in the declared
    ``output_fmt``, pre-logits have ``head_hidden_size``, the classifier and the pooling can be removed (by
    ``reset_classifier`` on ``model``, at creation for ``unpooled``: ``num_classes=0, global_pool=''``)."""
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg["num_classes"] == 1000
    assert model.num_features > 0 and model.head_hidden_size > 0
    state = model.state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    assert state[cfg["first_conv"] + ".weight"].shape[1] == cfg["input_size"][0]

    with torch.no_grad():
        features = model.forward_features(_image(*cfg["input_size"][1:]))
        pre_logits = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
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
    torch.testing.assert_close(model.forward_head(features), pre_logits)  # pooled, no head
    model.reset_classifier(0, "")
    torch.testing.assert_close(model.forward_head(features), features)  # no pooling either
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), features)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(0, "nope")
    assert unpooled.num_classes == 0 and unpooled.global_pool == ""
    assert not any(name.startswith(cfg["classifier"] + ".") for name in unpooled.state_dict())
    torch.testing.assert_close(unpooled.forward_head(features), features)


def check_forward(model: nn.Module) -> None:
    """forward = forward_head(forward_features) under every pooling, and with gradient checkpointing (eval mode, as
    timm's forward test: a family whose drop path is on by default, RAVLT, draws other masks each call)."""
    model.eval()
    x = _image(*FEATURE_SIZE, batch=2)
    default = model.global_pool
    with torch.no_grad():
        for pool in ("avg", "token", "") if getattr(model, "num_prefix_tokens", 0) else ("avg", ""):
            model.reset_classifier(5, pool)
            torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)))
    model.reset_classifier(5, default)
    reference = model(x)
    assert reference.shape[:2] == (2, 5) and torch.isfinite(reference).all()
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-5)  # grad enabled: checkpoints run
    model.set_grad_checkpointing(False)


def check_backward(model: nn.Module) -> None:
    """timm's backward test: 42 classes, train mode; no parameter (e.g. a feature-only norm) without gradient."""
    model.reset_classifier(42)
    out = model.train()(_image(*BACKWARD_SIZE, batch=2))
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    assert not _no_gradient(model), _no_gradient(model)


def check_features_only(features: nn.Module) -> None:
    """timm's features test (the getter wrapper over forward_intermediates): 4 NCHW maps with the channels
    and strides of ``feature_info``; no classifier; every parameter gets a gradient (DDP needs it)."""
    channels, reductions = features.feature_info.channels(), features.feature_info.reduction()
    assert reductions == [4, 8, 16, 32]
    for info in features.feature_info.get_dicts():
        features.model.get_submodule(info["module"])  # feature_info names modules the model has
    assert not any(n.startswith("model.head.") for n, _ in features.named_parameters())
    maps = features.train()(_image(*FEATURE_SIZE, batch=2))
    assert len(maps) == len(channels)
    for f, c, r in zip(maps, channels, reductions, strict=True):
        assert f.shape == (2, c, math.ceil(FEATURE_SIZE[0] / r), math.ceil(FEATURE_SIZE[1] / r))
        assert torch.isfinite(f).all()
    sum(f.square().mean() for f in maps).backward()
    assert not _no_gradient(features), _no_gradient(features)


def check_feature_subset(full: nn.Module, part: nn.Module) -> None:
    """``out_indices=(1, 2)``: two maps; the stage-4 modules and the unused output norms are pruned."""
    assert part.feature_info.channels() == full.feature_info.channels()[1:3]
    assert sum(p.numel() for p in part.parameters()) < sum(p.numel() for p in full.parameters())
    maps = part.train()(_image(*FEATURE_SIZE))
    assert [f.shape[1] for f in maps] == part.feature_info.channels()
    sum(f.square().mean() for f in maps).backward()
    assert not _no_gradient(part), _no_gradient(part)


def check_output_norms(classifier: nn.Module, features: nn.Module) -> None:
    """A feature model's maps are the classifier's stage maps through the per-stage output norms (where the
    family has them: ``feature_info``'s module names them), with the same trunk weights."""
    _randomise_norms(features, seed=1)
    own = features.model.state_dict()
    trunk = {k: v for k, v in classifier.state_dict().items() if k in own}
    trunk_only = copy.deepcopy(classifier)
    trunk_only.prune_intermediate_layers(len(classifier.feature_info), prune_norm=True)  # no head, no final layers
    classifier_only = classifier.state_dict().keys() - trunk_only.state_dict().keys()
    assert classifier.state_dict().keys() - own.keys() <= classifier_only  # the feature model has the whole trunk
    missing, _ = features.model.load_state_dict(trunk, strict=False)
    modules = [info["module"] for info in features.model.feature_info]
    assert all(any(key.startswith(m + ".") for m in modules) for key in missing), missing  # only output norms are new
    x = _image(*FEATURE_SIZE)
    with torch.no_grad():
        raw = classifier.eval().forward_intermediates(x, intermediates_only=True)
        got = features.eval()(x)
    for r, g, module in zip(raw, got, modules, strict=True):
        if any(key.startswith(module + ".") for key in missing):
            r = _layer_norm_channels(features.model.get_submodule(module), r)
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def check_forward_intermediates(model: nn.Module) -> None:
    """timm's semantics of indices, norm, output_fmt, intermediates_only and stop_early."""
    model.eval()
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
        final_norm = getattr(model, "norm", None)  # the classifier's final LayerNorm, where the family has one
        final_norm = final_norm if isinstance(final_norm, nn.LayerNorm) else None
        expected = inter[3] if final_norm is None else _layer_norm_channels(final_norm, inter[3])
        torch.testing.assert_close(normed[3], expected, rtol=1e-4, atol=1e-4)

    model.set_grad_checkpointing()
    final2, _ = model.forward_intermediates(x)
    torch.testing.assert_close(final2, final, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the tiny variants: one test per check


def test_registry_lists_every_family_with_a_tiny_variant() -> None:
    assert {"test_flatten_pvt", "test_flatten_pvt_v2", "test_flatten_swin", "test_soft"} <= set(TINY)
    assert {"flatten_pvt_tiny", "flatten_pvt_v2_b0", "flatten_swin_tiny", "soft_tiny"} <= set(FULL)
    assert "pvt_v2_b0" in timm.list_models() and "pvt_v2_b0" not in encoder_names()  # timm's own: not ours
    families = {timm.models.model_entrypoint(name).__module__ for name in FULL}
    tested = {timm.models.model_entrypoint(name).__module__ for name in TINY}
    assert families <= tested, f"families without a test_* variant (the default run): {families - tested}"


@pytest.mark.parametrize("name", TINY)
def test_default_cfg_shapes_and_classifier_resets(name: str) -> None:
    model = timm.create_model(name).eval()
    unpooled = timm.create_model(name, num_classes=0, global_pool="").eval()
    check_default_cfg(model, unpooled)
    unpooled.load_state_dict(model.state_dict())
    x = _image(*FEATURE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(unpooled(x), model.forward_features(x))  # the created one's forward too


@pytest.mark.parametrize("name", TINY)
def test_forward_under_every_pooling_and_checkpointing(name: str) -> None:
    check_forward(timm.create_model(name))


@pytest.mark.parametrize("name", TINY)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    check_backward(timm.create_model(name, num_classes=42))


@pytest.mark.parametrize("name", TINY)
def test_features_only(name: str) -> None:
    check_features_only(timm.create_model(name, features_only=True))


@pytest.mark.parametrize("name", TINY)
def test_features_only_subset_prunes_what_it_does_not_use(name: str) -> None:
    full = timm.create_model(name, features_only=True)
    check_feature_subset(full, timm.create_model(name, features_only=True, out_indices=(1, 2)))


@pytest.mark.parametrize("name", TINY)
def test_feature_maps_pass_through_the_output_norms(name: str) -> None:
    check_output_norms(timm.create_model(name), timm.create_model(name, features_only=True))


@pytest.mark.parametrize("name", TINY)
def test_forward_intermediates(name: str) -> None:
    check_forward_intermediates(timm.create_model(name))


def test_unpooled_head_gives_logits_at_every_position() -> None:
    model = timm.create_model("test_flatten_swin", num_classes=3, global_pool="").eval()
    x = _image(64, 96)
    with torch.no_grad():
        features = model.forward_features(x)  # (1, C, 2, 3)
        logits = model(x)
    assert logits.shape == (1, 3, 2, 3)
    expected = torch.einsum("kc,bchw->bkhw", model.head.weight, features) + model.head.bias[:, None, None]
    torch.testing.assert_close(logits, expected)


# ---------------------------------------------------------------- the full sizes: every check, built cheaply


@pytest.fixture
def cheap_init(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Truncated-normal init as a clamped normal: timm's inverse-CDF sampling dominates building a full-size
    model on CPU, and the contract does not depend on the values."""
    monkeypatch.setattr(timm.layers.weight_init, "_trunc_normal_",
                        lambda t, mean, std, a, b: t.normal_(mean, std).clamp_(a, b))
    yield


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_full_size_contract(name: str, cheap_init: None) -> None:
    """Each full size through every check: one classifier and one feature model built, copies for the rest."""
    torch.manual_seed(0)
    classifier = timm.create_model(name)
    features = timm.create_model(name, features_only=True)
    with torch.device("meta"):  # built for its attributes and state-dict names only
        unpooled = timm.create_model(name, num_classes=0, global_pool="")
    check_default_cfg(copy.deepcopy(classifier).eval(), unpooled)
    check_forward(copy.deepcopy(classifier))
    check_backward(copy.deepcopy(classifier))
    check_forward_intermediates(copy.deepcopy(classifier))
    check_feature_subset(features, FeatureGetterNet(copy.deepcopy(features.model), out_indices=(1, 2)))
    check_output_norms(classifier, copy.deepcopy(features))
    check_features_only(features)
