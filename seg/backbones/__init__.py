"""timm-registered encoders; importing this package registers them."""

from seg.backbones import pvt, swin  # noqa: F401
