"""timm-registered encoders; importing this package registers them."""

from seg.backbones import mlla, pvt, soft, swin  # noqa: F401
