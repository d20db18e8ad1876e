"""timm-registered encoders; importing this package registers them."""

from seg.backbones import pvt, ravlt, soft, swin  # noqa: F401
