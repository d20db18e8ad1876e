"""Agent attention: the maths against explicit references, the encoders' shapes, sizes, weights and parameters."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import seg  # noqa: F401  (registers the encoders)
from seg.model.backbones._weights import CheckpointMismatchError
from seg.model.backbones.agent_swin import stage_types
from seg.model.layers import AgentAttention, agent_attention, agent_position_biases
from seg.model.layers.window import WindowAttention
from seg.model.segmentor import Segmentor
from seg.train.weight_decay import no_decay_names

torch.manual_seed(0)


def _tables(h: int, n: int, grid: tuple[int, int], dtype=torch.float64) -> list[torch.Tensor]:
    H0, W0 = grid
    shapes = [(h, n, 7, 7), (h, n, 7, 7), (1, h, n, H0, 1), (1, h, n, 1, W0), (1, h, H0, 1, n), (1, h, 1, W0, n)]
    return [torch.randn(s, dtype=dtype) for s in shapes]


def test_agent_attention_equals_the_two_explicit_softmaxes() -> None:
    B, h, N, n, d = 2, 3, 20, 4, 8
    q, k, v = (torch.randn(B, h, N, d, dtype=torch.float64) for _ in range(3))
    agents = torch.randn(B, h, n, d, dtype=torch.float64)
    b1, b2 = torch.randn(h, n, N, dtype=torch.float64), torch.randn(h, N, n, dtype=torch.float64)
    s = d**-0.5
    agent_v = ((agents * s) @ k.transpose(-2, -1) + b1).softmax(-1) @ v  # (B, h, n, d)
    expected = ((q * s) @ agents.transpose(-2, -1) + b2).softmax(-1) @ agent_v  # (B, h, N, d)
    torch.testing.assert_close(agent_attention(q, k, v, agents, b1, b2), expected, rtol=1e-12, atol=1e-12)


def test_agent_attention_is_differentiable() -> None:
    B, h, N, n, d = 1, 2, 6, 4, 3
    leaves = [torch.randn(shape, dtype=torch.float64, requires_grad=True)
              for shape in [(B, h, N, d)] * 3 + [(B, h, n, d), (h, n, N), (h, N, n)]]
    assert torch.autograd.gradcheck(agent_attention, leaves, fast_mode=True)


def test_biases_at_the_training_grid_equal_the_classification_formula() -> None:
    """p x p agents on the stored H0 x W0 map: B_1 = R(an) + ah + aw, B_2 = R(na) + ha + wa (R: 7 x 7 -> H0 x W0)."""
    h, n, grid = 2, 9, (14, 14)
    an, na, ah, aw, ha, wa = _tables(h, n, grid)
    b1, b2 = agent_position_biases(an, na, ah, aw, ha, wa, grid, (3, 3))
    resize = lambda t: F.interpolate(t, size=grid, mode="bilinear", align_corners=False)
    expected1 = (resize(an) + (ah + aw)[0]).reshape(h, n, -1)  # (h, n, N)
    expected2 = resize(na).reshape(h, n, -1).transpose(1, 2) + (ha + wa).reshape(h, -1, n)  # (h, N, n)
    torch.testing.assert_close(b1, expected1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b2, expected2, rtol=1e-12, atol=1e-12)


def test_biases_follow_the_map_and_the_agent_grid() -> None:
    """Another map and agent grid: both axes resized; agents laid out row-major on the a_h x a_w grid."""
    h, n = 2, 16
    an, na, ah, aw, ha, wa = (t * 0 for t in _tables(h, n, (28, 28)))
    na = na + torch.arange(4, dtype=torch.float64).repeat_interleave(4).view(1, n, 1, 1)  # agent row index
    b1, b2 = agent_position_biases(an, na, ah, aw, ha, wa, (5, 9), (6, 10))
    assert b1.shape == (h, 60, 45) and b2.shape == (h, 45, 60)
    rows = F.interpolate(torch.arange(4.0, dtype=torch.float64).view(1, 1, 4, 1), size=(6, 1), mode="bilinear",
                         align_corners=False).flatten()
    torch.testing.assert_close(b2[0, 0].view(6, 10), rows[:, None].expand(6, 10))


def test_module_rejects_a_wrong_grid_and_a_non_square_agent_count() -> None:
    attn = AgentAttention(16, 2, (8, 8), agent_num=4)
    with pytest.raises(ValueError, match="do not form"):
        attn(torch.randn(1, 10, 16), (3, 4))
    with pytest.raises(ValueError, match="square"):
        AgentAttention(16, 2, agent_num=8)


def test_swin_stage_types_parse_the_published_strings() -> None:
    assert stage_types("AAAB") == ["A", "A", "A", "B"]
    assert stage_types("AAMB2") == ["A", "A", "M2", "B"]
    for bad in ("AAB", "AAMB", "AAAB2"):
        with pytest.raises(ValueError, match="attn_type"):
            stage_types(bad)
    with pytest.raises(ValueError, match="unknown letter"):
        timm.create_model("test_agent_swin", attn_type="AAXB")


def test_swin_m2_stage_has_two_agent_blocks_then_windows() -> None:
    model = timm.create_model("test_agent_swin")
    kinds = [[type(b.attn).__name__ for b in stage.blocks] for stage in model.layers]
    assert kinds == [["AgentAttention"], ["AgentAttention"], ["AgentAttention"] * 2 + ["WindowAttention"] * 2,
                     ["WindowAttention"] * 2]
    stage3 = model.layers[2].blocks
    assert stage3[0].attn.ah_bias.shape == (1, 2, 49, 14, 1) and stage3[2].attn.shift_size == 0
    assert stage3[3].attn.shift_size == 3


@pytest.mark.parametrize("name", ["test_agent_pvt", "test_agent_swin"])
@pytest.mark.parametrize("size", [(32, 32), (37, 61), (97, 45)])
def test_features_at_odd_sizes(name: str, size: tuple[int, int]) -> None:
    model = timm.create_model(name, features_only=True, agent_shapes=(5, (3, 4), 2, 7)).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        features = model(torch.randn(2, 3, *size))
    side = lambda n, i: math.ceil(n / 4 / 2**i)
    assert [tuple(f.shape) for f in features] == [
        (2, c, side(size[0], i), side(size[1], i)) for i, c in enumerate(model.feature_info.channels())]
    assert all(torch.isfinite(f).all() for f in features)


@pytest.mark.parametrize("name", ["test_agent_pvt", "test_agent_swin"])
def test_forward_intermediates_equal_features_and_forward(name: str) -> None:
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 70, 101)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(model.forward_head(final), model(x))
        last = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(last[0], maps[1])
    assert maps[0].shape[-2:] == (18, 26)


def _reference_counts() -> dict[str, float]:
    """Parameters (millions) of the published classes with 1000 classes, SPEC-family section 2."""
    return {"agent_pvt_tiny": 11.57, "agent_pvt_small": 20.64, "agent_pvt_medium": 35.92, "agent_pvt_large": 48.74,
            "agent_swin_tiny": 28.90, "agent_swin_small": 49.67, "agent_swin_base": 88.10}


@pytest.mark.parametrize("name", list(_reference_counts()))
def test_parameter_counts_within_2_percent_of_the_published_classes(name: str, monkeypatch) -> None:
    # shapes only: built on the meta device, with timm's truncated-normal init (slow there, meaningless) skipped
    monkeypatch.setattr(timm.layers.weight_init, "_trunc_normal_", lambda tensor, *args: tensor)
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count / _reference_counts()[name] - 1) < 0.02, count


def _published_format(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the names and layout of a released Agent-Swin checkpoint: no output norms
    ``norm0..3``, plus the ``relative_position_index`` and ``attn_mask`` buffers the released files carry."""
    output_norms = {f"norm{i}" for i in range(4)}
    state = {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[0] not in output_norms}
    for name, module in model.named_modules():
        if isinstance(module, WindowAttention):
            state[f"{name}.relative_position_index"] = torch.zeros(49, 49, dtype=torch.int64)
            if module.shift_size:
                state[f"{name.removesuffix('.attn')}.attn_mask"] = torch.zeros(4, 49, 49)
    return state


def test_checkpoint_round_trip_through_timm(tmp_path: Path) -> None:
    """A released-format file loads strictly into the model it came from, and resized into another grid."""
    source = timm.create_model("test_agent_swin").eval()
    with torch.no_grad():
        for name, p in source.named_parameters():
            if name.endswith("_bias") and p.dim() >= 4:
                p.normal_()  # tables far from their init, so a table left unloaded shows in the output
    path = tmp_path / "agent_swin.pth"
    torch.save({"model": _published_format(source), "optimizer": {}, "epoch": 299, "max_accuracy": 0.0}, path)
    loaded = timm.create_model("test_agent_swin", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), source(x))
        bigger = timm.create_model("test_agent_swin", img_size=256, pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(path))).eval()
    table = bigger.layers[0].blocks[0].attn.ha_bias
    assert table.shape == (1, 1, 64, 1, 9)
    torch.testing.assert_close(table[0, 0, :, 0], F.interpolate(
        source.layers[0].blocks[0].attn.ha_bias[0, 0, :, 0].T[None], size=64, mode="linear").squeeze(0).T)


def test_pvt_checkpoint_with_wrong_heads_is_refused_naming_the_file(tmp_path: Path) -> None:
    state = timm.create_model("test_agent_pvt").state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(("norm1", "norm2", "norm3", "norm4"))}
    state["block2.0.attn.an_bias"] = torch.zeros(3, 16, 7, 7)  # 3 heads, the model has 2
    del state["block1.0.attn.dwc.weight"]
    path = tmp_path / "agent_pvt_wrong.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        timm.create_model("test_agent_pvt", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    message = str(err.value)
    assert "agent_pvt_wrong.pth" in message and "AgentPVT" in message
    assert "block1.0.attn.dwc.weight" in message and "block2.0.attn.an_bias: file (3, 16, 7, 7)" in message


def test_agent_tables_get_no_weight_decay_in_the_swin_recipe() -> None:
    model = Segmentor("test_agent_swin", "upernet", num_classes=5, decoder_channels=16, aux_head=False)
    exempt = no_decay_names(model, "norms_tables")
    tables = {n for n, _ in model.named_parameters() if n.endswith(("an_bias", "na_bias", "ah_bias", "aw_bias",
                                                                     "ha_bias", "wa_bias"))}
    assert len(tables) == 6 * 4 and tables <= exempt  # 4 agent blocks: stages 1, 2 and the first two of M2
    qkv_biases = {n for n, _ in model.named_parameters() if n.endswith("attn.qkv.bias")}
    assert qkv_biases and not qkv_biases & exempt  # other biases decay, as in the recipe


@pytest.mark.parametrize(("encoder", "decoder"), [("test_agent_pvt", "semantic_fpn"), ("test_agent_swin", "upernet")])
def test_logits_equal_with_and_without_padded_pixels(encoder: str, decoder: str) -> None:
    torch.manual_seed(0)
    model = Segmentor(encoder, decoder, num_classes=5, decoder_channels=32, aux_head=False,
                      encoder_kwargs=dict(agent_shapes=(12, 16, 28, 28))).eval()
    x = torch.randn(1, 3, 160, 224)
    padded = F.pad(x, (0, 64, 0, 32))  # (1, 3, 192, 288): a batch padded to a common size
    with torch.no_grad():
        plain = model(x)["out"]
        with_padding = model(padded, sizes=[(160, 224)])["out"]
    assert with_padding.shape[-2:] == (192, 288)
    torch.testing.assert_close(with_padding[..., :160, :224], plain, rtol=1e-5, atol=1e-5)
