"""What every encoder family shares when it registers with timm: the build call and the default config."""

from __future__ import annotations

from collections.abc import Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg
from torch import nn

__all__ = ["build_encoder", "imagenet_cfg", "init_transformer_weights"]


def build_encoder(
    model_cls: type[nn.Module],
    variant: str,
    pretrained: bool,
    filter_fn: Callable[[dict, nn.Module], dict],
    **kwargs,
) -> nn.Module:
    """Build a registered variant; ``features_only=True`` gives the 4 stage maps (strides 4/8/16/32) through
    ``forward_intermediates``, and ``pretrained=True`` loads ``pretrained_cfg_overlay['file']`` via ``filter_fn``."""
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
    """timm's classifier API over a linear ``head`` on ``num_features`` (an identity with no classes)."""

    num_features: int

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
