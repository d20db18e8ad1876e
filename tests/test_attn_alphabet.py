"""One attention alphabet across the encoder families: ``attn_type='SSSS'`` builds each skeleton with its own
softmax attention, changing only the attention's parameters; the published letters stay aliases."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import seg.model.backbones  # noqa: F401  (registers the encoders)
from seg.model.layers import RoPESoftmaxAttention, SpatialReductionAttention, WindowAttention

SOFTMAX = {
    "flatten_pvt_tiny": SpatialReductionAttention,
    "agent_pvt_tiny": SpatialReductionAttention,
    "flatten_swin_tiny": WindowAttention,
    "agent_swin_tiny": WindowAttention,
    "ravlt_tiny": RoPESoftmaxAttention,
}


def _attention_free(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the parameters and buffers outside the blocks' ``attn`` modules."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {name: tuple(t.shape) for name, t in tensors.items() if ".attn." not in name}


@pytest.mark.parametrize("name", sorted(SOFTMAX))
def test_ssss_is_the_skeleton_with_its_own_softmax_attention(name: str) -> None:
    with torch.device("meta"):
        default = timm.create_model(name)
        softmax = timm.create_model(name, attn_type="SSSS")
    attentions = [m for n, m in softmax.named_modules() if n.endswith(".attn")]
    assert attentions and all(type(m) is SOFTMAX[name] for m in attentions)
    assert _attention_free(softmax) == _attention_free(default)
    if name == "flatten_pvt_tiny":  # PVT's softmax keys come from the sr_ratio-reduced grid
        assert [softmax.block1[0].attn.sr_ratio, softmax.block4[0].attn.sr_ratio] == [8, 1]


@pytest.mark.parametrize(("name", "published", "alphabet"), [
    ("test_agent_pvt", "ABAB", "ASAS"),
    ("test_agent_swin", "AAMB2", "AAMS2"),
    ("test_ravlt", "llvv", "LLSS"),
    ("test_mala", "lvlv", "LSLS"),
])
def test_published_letters_are_aliases(name: str, published: str, alphabet: str) -> None:
    torch.manual_seed(0)
    a = timm.create_model(name, attn_type=published)
    torch.manual_seed(0)
    b = timm.create_model(name, attn_type=alphabet)
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


@pytest.mark.parametrize("name", ["test_flatten_pvt", "test_flatten_swin", "test_agent_pvt", "test_agent_swin",
                                  "test_ravlt", "test_pola_pvt", "test_pola_swin"])
def test_one_check_of_attn_type(name: str) -> None:
    """Every family refuses a wrong letter or length with the same message, listing the valid letters."""
    with pytest.raises(ValueError, match=r"unknown letter\(s\) X; valid: .*S"):
        timm.create_model(name, attn_type="SSSX")
    with pytest.raises(ValueError, match="must be 4 letters"):
        timm.create_model(name, attn_type="SSS")
