"""timm-registered encoders; importing this package registers them."""

from seg.backbones import pvt, soft, swin  # noqa: F401
