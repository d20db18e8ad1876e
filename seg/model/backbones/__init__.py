"""timm-registered encoders; importing this package registers them."""

from seg.model.backbones import agent_pvt, agent_swin, mala, mlla, pola, pvt, ravlt, soft, swin  # noqa: F401
