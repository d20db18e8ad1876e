"""What every encoder family shares when it registers with timm: the build call, the default config, the
classifier API, and the list of the names the families registered."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

from timm import list_models
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, model_entrypoint
from torch import Tensor, nn

from seg.kernels.onednn import Linear

__all__ = ["build_encoder", "encoder_names", "imagenet_cfg", "imagenet_cfgs", "init_transformer_weights"]


def encoder_names(pattern: str = "*") -> list[str]:
    """The timm names registered by this package's encoder families (entry points defined in ``seg.model.backbones``),
    matching the ``fnmatch`` pattern; the families register on import of :mod:`seg.model.backbones`."""
    package = __name__.rpartition(".")[0] + "."
    return [name for name in list_models(pattern) if model_entrypoint(name).__module__.startswith(package)]


def build_encoder(
    model_cls: type[nn.Module],
    variant: str,
    pretrained: bool,
    filter_fn: Callable[[dict, nn.Module], dict],
    **kwargs,
) -> nn.Module:
    """Build a registered variant; ``features_only=True`` gives the 4 stage maps (strides 4/8/16/32) through
    ``forward_intermediates``, each through its stage's output norm (built for feature models only, see
    :class:`~seg.model.backbones._staged.StagedEncoder`), and ``pretrained=True`` loads
    ``pretrained_cfg_overlay['file']`` via ``filter_fn``."""
    if kwargs.get("features_only") and "feature_norms" in inspect.signature(model_cls).parameters:
        kwargs.setdefault("feature_norms", True)
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def imagenet_cfg(first_conv: str, **kwargs) -> dict:
    """The pretrained config of a 224 x 224 ImageNet-1k classifier whose weights come from a local file."""
    return dict(
        url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
        interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv=first_conv, classifier="head", **kwargs,
    )


def imagenet_cfgs(first_conv: str, variants: Iterable[str]) -> dict:
    """timm's default configs of the ImageNet classifiers ``variants`` (:func:`imagenet_cfg` each)."""
    return generate_default_cfgs({name: imagenet_cfg(first_conv) for name in variants})


def init_transformer_weights(m: nn.Module) -> None:
    """Linear: truncated normal (std 0.02), zero bias; LayerNorm: identity. Other modules keep their own init."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ClassifierBackbone(nn.Module):
    """timm's classifier API: ``global_pool`` over :meth:`forward_features`' output, then a linear ``head`` on
    ``num_features`` (an identity with no classes).

    ``output_fmt`` is the layout of :meth:`forward_features`: an ``NCHW`` map, or ``NLC`` tokens with
    ``num_prefix_tokens`` class tokens first. Pools: ``avg`` (mean over the map, or over the tokens after the
    prefix), ``token`` (the first class token, ``NLC`` only) and ``''`` (no pooling: the head, if any, is applied
    at every position, and ``forward_head(pre_logits=True)`` returns the unpooled features).
    """

    num_features: int
    head_hidden_size: int
    num_classes: int
    global_pool: str = "avg"
    output_fmt: str = "NCHW"
    num_prefix_tokens: int = 0

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new ``head`` for ``num_classes`` (0: identity); ``global_pool`` None keeps the current pooling."""
        if global_pool is not None:
            pools = ("avg", "token", "") if self.num_prefix_tokens else ("avg", "")
            if global_pool not in pools:
                raise ValueError(f"global_pool {global_pool!r} is not one of {pools} for {type(self).__name__}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def pool_features(self, x: Tensor) -> Tensor:
        """:meth:`forward_features`' output -> pre-logits (B, C), or ``x`` itself when ``global_pool`` is ''."""
        if self.global_pool == "token":
            return x[:, 0]  # (B, N, C) -> the class token (B, C)
        if self.global_pool == "avg":
            return x.mean(dim=(2, 3)) if self.output_fmt == "NCHW" else x[:, self.num_prefix_tokens:].mean(dim=1)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pool_features(x)
        if pre_logits or self.num_classes == 0:
            return x
        if not self.global_pool and self.output_fmt == "NCHW":  # logits at every position: (B, classes, H, W)
            return self.head(x.movedim(1, -1)).movedim(-1, 1)
        return self.head(x)
