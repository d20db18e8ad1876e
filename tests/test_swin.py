"""FLatten-Swin: window attention vs a dense masked reference, global L stages, shapes, weights, grads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F

import seg.model.backbones.swin  # noqa: F401  (registers flatten_swin_*)
from seg.model.backbones._weights import CheckpointMismatchError
from seg.model.layers import FocusedLinearAttention
from seg.model.layers.window import WindowAttention

torch.manual_seed(0)
torch.set_num_threads(1)


def region(pos: torch.Tensor, P: int, window: int, shift: int) -> torch.Tensor:
    """Swin's region label of a coordinate of the shifted map: the last `shift` tokens wrapped around."""
    if shift == 0:
        return torch.zeros_like(pos)
    return (pos >= P - window).long() + (pos >= P - shift).long()


def dense_window_reference(attn: WindowAttention, x: torch.Tensor, size: tuple[int, int], shift: bool):
    """Softmax attention over the whole padded map with -inf outside each token's (shifted) window.

    No roll and no partition: window membership, offsets and regions are computed from coordinates.
    """
    B, N, C = x.shape
    h, w = attn.num_heads, attn.window_size
    wins = [min(w, s) for s in size]
    shifts = [w // 2 if shift and s > w else 0 for s in size]
    Hp, Wp = (math.ceil(s / v) * v for s, v in zip(size, wins, strict=True))
    xp = x.new_zeros(B, Hp, Wp, C)
    xp[:, : size[0], : size[1]] = x.view(B, *size, C)
    qkv = xp.reshape(B, Hp * Wp, C) @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv.view(B, Hp * Wp, 3, h, C // h).permute(2, 0, 3, 1, 4)
    r = torch.arange(Hp).repeat_interleave(Wp)
    c = torch.arange(Wp).repeat(Hp)
    rs, cs = (r - shifts[0]) % Hp, (c - shifts[1]) % Wp  # coordinates after the cyclic shift
    window_id = (rs // wins[0]) * Wp + cs // wins[1]
    label = region(rs, Hp, wins[0], shifts[0]) * 3 + region(cs, Wp, wins[1], shifts[1])
    index = (rs[:, None] - rs[None, :] + w - 1) * (2 * w - 1) + (cs[:, None] - cs[None, :] + w - 1)
    table = attn.relative_position_bias_table
    bias = table[index.clamp(0, table.shape[0] - 1)].permute(2, 0, 1)  # (h, Np, Np)
    logits = q @ k.transpose(-2, -1) * (C // h) ** -0.5 + bias
    logits = logits + (label[:, None] != label[None, :]) * -100.0
    logits = logits.masked_fill(window_id[:, None] != window_id[None, :], float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, Hp, Wp, C)
    out = out[:, : size[0], : size[1]].reshape(B, N, C)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize(
    ("size", "shift"),
    [((10, 13), False), ((10, 13), True), ((5, 9), True), ((3, 4), True), ((1, 1), True), ((14, 14), True)],
)
def test_window_attention_equals_dense_masked_reference(size: tuple[int, int], shift: bool) -> None:
    attn = WindowAttention(8, 2, window_size=7, shift=shift).double().eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(2, size[0] * size[1], 8, dtype=torch.float64)
    expected = dense_window_reference(attn, x, size, shift)
    torch.testing.assert_close(attn(x, size), expected, rtol=1e-10, atol=1e-10)
    assert "relative_position_index" not in attn.state_dict()


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere, so zero-initialised scale / positional encodings matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_weight = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 3 or "table" in name else 0.05) + norm_weight)
    return model


def test_l_stages_run_global_focused_linear_attention_at_224() -> None:
    model = randomised(timm.create_model("test_flatten_swin", num_classes=0)).eval()
    block = model.layers[0].blocks[0]
    assert isinstance(block.attn, FocusedLinearAttention) and block.attn.fused_qkv
    assert block.attn.positional_encoding.shape == (1, 56 * 56, 16)
    assert model.layers[1].blocks[0].attn.positional_encoding.shape == (1, 28 * 28, 32)
    seen = {}
    block.attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], size=args[1], out=out))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert seen["x"].shape == (1, 3136, 16) and seen["size"] == (56, 56)  # the whole map, not windows
    layer = FocusedLinearAttention(16, 1, (56, 56), fused_qkv=True)
    layer.load_state_dict(block.attn.state_dict())
    with torch.no_grad():
        # the encoder runs the cpu backend, the fresh layer the reference: equal to float32 rounding
        torch.testing.assert_close(seen["out"], layer.eval()(seen["x"], (56, 56)), rtol=1e-5, atol=1e-6)
    # the top-left 7 x 7 tokens move the bottom-right output: no window, no locality beyond the DWC
    layer.double()
    x = seen["x"].double()
    moved = x.view(1, 56, 56, 16).clone()
    moved[:, :7, :7] *= 10.0
    with torch.no_grad():
        change = layer(moved.view(1, 3136, 16), (56, 56)) - layer(x, (56, 56))
    assert change[:, -1].abs().max() > 1e-6


@pytest.mark.parametrize("attn_type", ["LLSS", "SSSS"])
def test_features_only_shapes_at_any_size(attn_type: str) -> None:
    model = timm.create_model("test_flatten_swin", features_only=True, attn_type=attn_type).eval()
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        for H, W in [(64, 96), (70, 101), (33, 47), (32, 32)]:
            feats = model(torch.randn(1, 3, H, W))
            strides = [4, 8, 16, 32]
            expected = [(1, 4 * s, math.ceil(H / s), math.ceil(W / s)) for s in strides]  # C = 16 * s / 4
            assert [tuple(f.shape) for f in feats] == expected
            assert all(torch.isfinite(f).all() for f in feats)


def save_published(model: torch.nn.Module, path: Path, extra: dict | None = None) -> str:
    """A published-format file: {'model': state dict} without the output norms norm0..3."""
    out_norms = {"norm0", "norm1", "norm2", "norm3"}
    sd = {k: v for k, v in model.state_dict().items() if k.split(".")[0] not in out_norms}
    torch.save({"model": {**sd, **(extra or {})}, "epoch": 300}, path)
    return str(path)


def swin_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The attn_mask / relative_position_index buffers a released Swin file carries."""
    out = {}
    for i, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            if isinstance(block.attn, WindowAttention):
                prefix = f"layers.{i}.blocks.{j}"
                out[f"{prefix}.attn.relative_position_index"] = block.attn.relative_position_index
                if j % 2:
                    out[f"{prefix}.attn_mask"] = torch.full((4, 49, 49), -100.0)
    return out


@pytest.mark.parametrize("attn_type", ["LLSS", "SSSS"])
def test_checkpoint_round_trip(attn_type: str, tmp_path: Path) -> None:
    source = randomised(timm.create_model("test_flatten_swin", attn_type=attn_type)).eval()
    buffers = swin_buffers(source) if attn_type == "SSSS" else {}
    assert len(buffers) == (8 if attn_type == "SSSS" else 0)  # 6 index tables, 2 masks
    path = save_published(source, tmp_path / "weights.pth", buffers)
    loaded = timm.create_model("test_flatten_swin", attn_type=attn_type, pretrained=True,
                               pretrained_cfg_overlay=dict(file=path)).eval()
    x = torch.randn(1, 3, 160, 224)  # stage 3: 10 x 14 (padded, shifted), stage 4: 5 x 7
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)
    features = timm.create_model("test_flatten_swin", attn_type=attn_type, pretrained=True,
                                 features_only=True, pretrained_cfg_overlay=dict(file=path)).eval()
    torch.testing.assert_close(features.model.norm3.weight, torch.ones(128))  # fresh output norm
    torch.testing.assert_close(features.model.layers[2].blocks[1].mlp.fc1.weight,
                               source.layers[2].blocks[1].mlp.fc1.weight)


def test_bias_table_is_resized_bicubic_for_another_window(tmp_path: Path) -> None:
    source = randomised(timm.create_model("test_flatten_swin", attn_type="SSSS"))
    path = save_published(source, tmp_path / "w7.pth", swin_buffers(source))
    model = timm.create_model("test_flatten_swin", attn_type="SSSS", window_size=5, pretrained=True,
                              pretrained_cfg_overlay=dict(file=path))
    table = source.layers[3].blocks[1].attn.relative_position_bias_table  # (13 * 13, 4)
    grid = table.detach().T.reshape(1, 4, 13, 13)
    expected = F.interpolate(grid, size=(9, 9), mode="bicubic", align_corners=False).reshape(4, 81).T
    torch.testing.assert_close(model.layers[3].blocks[1].attn.relative_position_bias_table.detach(), expected)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 96, 64))).all()


def test_mismatched_file_lists_names(tmp_path: Path) -> None:
    path = save_published(timm.create_model("test_flatten_swin"), tmp_path / "llss.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        timm.create_model("test_flatten_swin", attn_type="SSSS", pretrained=True,
                          pretrained_cfg_overlay=dict(file=path))
    message = str(err.value)
    assert "missing (2): layers.0.blocks.0.attn.relative_position_bias_table" in message
    assert "unexpected (8): layers.0.blocks.0.attn.scale" in message  # scale, encoding, dwc x 2
    assert "layers.1.blocks.0.attn.positional_encoding" in message


def test_every_parameter_gets_a_gradient_in_upernet() -> None:
    model = smp.UPerNet(encoder_name="tu-test_flatten_swin", encoder_weights=None, classes=5,
                        decoder_channels=32)
    assert model.encoder.out_channels == [3, 0, 16, 32, 64, 128]
    out = model(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 5, 64, 96)
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_no_weight_decay_names_the_tables() -> None:
    model = timm.create_model("test_flatten_swin")
    names = model.no_weight_decay()
    assert "layers.0.blocks.0.attn.positional_encoding" in names and "layers.0.blocks.0.attn.scale" in names
    assert "layers.3.blocks.1.attn.relative_position_bias_table" in names
    assert len(names) == 2 * 2 + 4  # two L blocks (encoding + scale), four S blocks (table)


@pytest.mark.parametrize(("name", "millions"), [("flatten_swin_tiny", 29), ("flatten_swin_small", 51),
                                                ("flatten_swin_base", 89)])
def test_parameter_counts(name: str, millions: int) -> None:
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e6 - millions) / millions < 0.02
    assert len(model.layers[2].blocks) == (6 if name == "flatten_swin_tiny" else 18)
