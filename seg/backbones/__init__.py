"""timm-registered encoders; importing this package registers them."""

from seg.backbones import agent_pvt, agent_swin, mlla, pvt, ravlt, soft, swin  # noqa: F401
