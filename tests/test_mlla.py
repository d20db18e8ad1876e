"""MLLA: RoPE and the linear attention against their definitions, shapes at any size, weights, grads, export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F

import seg.model.backbones.mlla  # noqa: F401  (registers mlla_*)
from seg.model.backbones._weights import CheckpointMismatchError
from seg.model.layers import MllaAttention, RoPE, apply_rope, mlla_linear_attention
from seg.model.segmentor import Segmentor

torch.manual_seed(0)


def mlla_tables(size: tuple[int, int], C: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MLLA's RoPE over all C channels, split into h heads: (sin, cos) (h, N, d) each."""
    return tuple(t.view(-1, h, C // h).transpose(0, 1) for t in RoPE(C, endpoint=False, persistent=False)(size))


def test_rope_angles_split_rows_and_columns_at_half_the_channels() -> None:
    """C = 16: K = 4 frequencies 10000^(-k/4); pairs 0-3 turn with the row, pairs 4-7 with the column."""
    H, W, C = 3, 5, 16
    sin, cos = (t.view(H, W, C // 2, 2) for t in RoPE(C, endpoint=False)((H, W)))
    torch.testing.assert_close(sin[..., 0], sin[..., 1])  # both channels of a pair turn by the same angle
    theta = torch.tensor([10000.0 ** (-k / 4) for k in range(4)])
    for y in range(H):
        for x in range(W):
            angles = torch.cat([y * theta, x * theta])
            torch.testing.assert_close(sin[y, x, :, 0], angles.sin())
            torch.testing.assert_close(cos[y, x, :, 0], angles.cos())
    with pytest.raises(ValueError, match="divisible by 4"):
        RoPE(18, endpoint=False)


def test_rope_is_a_rotation_whose_dot_products_depend_on_offsets_only() -> None:
    size = (6, 7)
    sin, cos = (t.double() for t in mlla_tables(size, 16, 2))
    rope = lambda x: apply_rope(x, sin, cos)  # noqa: E731
    q, k = torch.randn(2, 1, 2, 42, 8, dtype=torch.float64).unbind(0)  # (B, h, N, d) each
    torch.testing.assert_close(rope(q).norm(dim=-1), q.norm(dim=-1))
    # the same q at (1, 2) and k at (3, 5), then both moved by (+2, +1): equal dot products
    at = lambda y, x: y * size[1] + x  # noqa: E731
    qs = q[..., at(1, 2), :].unsqueeze(-2).expand_as(q)
    ks = k[..., at(3, 5), :].unsqueeze(-2).expand_as(k)
    qr, kr = rope(qs), rope(ks)
    dot = lambda i, j: (qr[..., i, :] * kr[..., j, :]).sum(-1)  # noqa: E731
    torch.testing.assert_close(dot(at(1, 2), at(3, 5)), dot(at(3, 3), at(5, 6)))
    assert not torch.allclose(dot(at(1, 2), at(3, 5)), dot(at(1, 2), at(3, 4)))
    # a head sees only its own pairs: with 2 heads of 8 channels at C = 16, head 0 turns with rows only
    torch.testing.assert_close(qr[:, 0, at(1, 2)], qr[:, 0, at(1, 6)])
    assert not torch.allclose(qr[:, 1, at(1, 2)], qr[:, 1, at(1, 6)])


def naive_mlla(q, k, v, sin, cos):
    """o_i = sum_j (rho(q_i) . rho(k_j)) v_j / N / (q_i . mean_j k_j + 1e-6), quadratic in N."""
    q, k = F.elu(q) + 1, F.elu(k) + 1
    q_rot, k_rot = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
    N = q.shape[-2]
    scores = q_rot @ k_rot.transpose(-2, -1) / N  # (B, h, N, N)
    return (scores @ v) / (q @ k.mean(-2, keepdim=True).transpose(-2, -1) + 1e-6)


def test_linear_attention_equals_its_quadratic_definition() -> None:
    size = (5, 9)
    q, k, v = torch.randn(3, 2, 2, 45, 16, dtype=torch.float64).unbind(0)
    tables = [t.double() for t in mlla_tables(size, 32, 2)]
    torch.testing.assert_close(mlla_linear_attention(q, k, v, *tables), naive_mlla(q, k, v, *tables))


def test_half_precision_runs_in_float32_without_overflow() -> None:
    """fp16 inputs over 128 x 128 tokens: the mean-based summary stays finite and equals the float32 result."""
    size = (128, 128)
    q, k, v = (torch.randn(3, 1, 2, 128 * 128, 32) * 4).unbind(0)
    tables = mlla_tables(size, 64, 2)
    expected = mlla_linear_attention(q, k, v, *tables)
    got = mlla_linear_attention(q.half(), k.half(), v.half(), *tables)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn = MllaAttention(64, 2)
        out = attn(torch.randn(1, 32 * 48, 64), (32, 48))
    assert torch.isfinite(out).all()


def test_attention_layer_equals_its_pieces() -> None:
    attn = MllaAttention(32, 2).double()
    size = (4, 6)
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    q, k = (x @ attn.qk.weight.T + attn.qk.bias).chunk(2, dim=-1)
    heads = lambda t: t.view(2, 24, 2, 16).transpose(1, 2)  # noqa: E731
    tables = [t.double() for t in mlla_tables(size, 32, 2)]
    o = naive_mlla(heads(q), heads(k), heads(x), *tables).transpose(1, 2).reshape(2, 24, 32)
    lepe = attn.lepe(x.transpose(1, 2).reshape(2, 32, *size)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(attn(x, size), o + lepe)
    with pytest.raises(ValueError, match="do not form a 5 x 5 grid"):
        attn(x, (5, 5))


def test_features_only_shapes_at_any_size() -> None:
    model = timm.create_model("test_mlla", features_only=True).eval()
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        for H, W in [(64, 96), (70, 101), (33, 47), (32, 32), (97, 35)]:
            feats = model(torch.randn(1, 3, H, W))
            expected = [(1, 4 * s, math.ceil(H / s), math.ceil(W / s)) for s in (4, 8, 16, 32)]
            assert [tuple(f.shape) for f in feats] == expected
            assert all(torch.isfinite(f).all() for f in feats)


def test_forward_intermediates_and_pruning() -> None:
    model = timm.create_model("test_mlla").eval()
    x = torch.randn(2, 3, 45, 77)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        torch.testing.assert_close(model.forward_head(final), model(x))
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], feats[1])
        assert model.prune_intermediate_layers([0, 2]) == [0, 2]
        assert not hasattr(model, "norm1") and len(model.layers) == 3 and model.layers[-1].downsample is None
        pruned = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    torch.testing.assert_close(pruned[1], feats[2])


def test_attention_factories_replace_mlla_attention_in_the_same_blocks() -> None:
    """The staged base's factory contract: (dim, num_heads, grid at 224, sr_ratio, shift) per stage."""
    from seg.model.layers import FocusedLinearAttention

    seen = []

    def flatten(dim: int, heads: int, grid: tuple[int, int], sr: int, shift: bool) -> torch.nn.Module:
        seen.append((dim, heads, grid, sr))
        return FocusedLinearAttention(dim, heads, grid, sr_ratio=sr)

    model = timm.create_model("test_mlla", attn_layers=[flatten] * 4).eval()
    assert sorted(set(seen)) == [(16, 1, (56, 56), 1), (32, 2, (28, 28), 1), (64, 2, (14, 14), 1),
                                 (128, 4, (7, 7), 1)]
    assert isinstance(model.layers[2].blocks[1].attn, FocusedLinearAttention)
    assert "layers.0.blocks.0.cpe1.weight" in model.state_dict()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 70, 101))).all()
    with pytest.raises(ValueError, match="one factory per stage"):
        timm.create_model("test_mlla", attn_layers=[flatten])


def test_merging_pads_odd_maps_before_its_biased_conv() -> None:
    """An odd map's padded row / column enters the depthwise conv as ReLU(bias), not as zero."""
    model = timm.create_model("test_mlla").eval()
    merge = model.layers[0].downsample
    with torch.no_grad():
        merge.conv[0].conv.bias.fill_(1.0)
        x = torch.randn(1, 5 * 7, 16)
        out, size = merge(x, (5, 7))
        assert size == (3, 4)
        grid = F.pad(x.view(1, 5, 7, 16), (0, 0, 0, 1, 0, 1)).permute(0, 3, 1, 2)  # (1, 16, 6, 8)
        expected = merge.conv(grid).flatten(2).transpose(1, 2)
        assert not torch.allclose(merge.conv(grid[..., :5, :7]).flatten(2).transpose(1, 2), expected)
    torch.testing.assert_close(out, expected)


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Random values in every float tensor (parameters and BatchNorm statistics)."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var") else torch.randn_like(t) * 0.2)
    return model


def save_published(model: torch.nn.Module, path: Path, drop: tuple[str, ...] = ()) -> str:
    """A published-format file: {'model': ..., 'state_dict_ema': ...} without norm0..3, with the RoPE buffers."""
    sd = {k: v for k, v in model.state_dict().items() if k.split(".")[0] not in {"norm0", "norm1", "norm2", "norm3"}}
    for i, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            sd[f"layers.{i}.blocks.{j}.attn.rope.rotations"] = torch.randn(7, 7, block.attn.qk.in_features // 2, 2)
    sd = {k: v for k, v in sd.items() if not k.startswith(drop)}
    torch.save({"model": sd, "state_dict_ema": sd, "epoch": 300}, path)
    return str(path)


def test_published_checkpoint_loads_strictly_and_ignores_rope_buffers(tmp_path: Path) -> None:
    source = randomised(timm.create_model("test_mlla")).eval()
    path = save_published(source, tmp_path / "mlla.pth")
    loaded = timm.create_model("test_mlla", pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    x = torch.randn(1, 3, 75, 101)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)
    features = timm.create_model("test_mlla", pretrained=True, features_only=True,
                                 pretrained_cfg_overlay=dict(file=path)).eval()
    torch.testing.assert_close(features.model.norm3.weight, torch.ones(128))  # fresh output norm
    torch.testing.assert_close(features.model.layers[2].blocks[1].attn.qk.weight,
                               source.layers[2].blocks[1].attn.qk.weight)
    assert not any("rotations" in name for name in features.model.state_dict())
    other_head = timm.create_model("test_mlla", num_classes=7, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    torch.testing.assert_close(other_head.layers[0].blocks[0].cpe1.weight, source.layers[0].blocks[0].cpe1.weight)


def test_mismatched_file_lists_names(tmp_path: Path) -> None:
    path = save_published(timm.create_model("test_mlla"), tmp_path / "broken.pth", drop=("layers.1.blocks.0.dwc",))
    with pytest.raises(CheckpointMismatchError) as err:
        timm.create_model("test_mlla", pretrained=True, pretrained_cfg_overlay=dict(file=path))
    assert "missing (2): layers.1.blocks.0.dwc.weight, layers.1.blocks.0.dwc.bias" in str(err.value)
    wider = save_published(timm.create_model("test_mlla", embed_dim=32), tmp_path / "wider.pth")
    with pytest.raises(CheckpointMismatchError, match=r"wider.pth does not match MLLA(.|\n)*wrong shape"):
        timm.create_model("test_mlla", pretrained=True, pretrained_cfg_overlay=dict(file=wider))


@pytest.mark.parametrize(("name", "millions", "depth3"), [("mlla_tiny", 24.39, 8), ("mlla_small", 43.02, 21),
                                                          ("mlla_base", 95.98, 21)])
def test_parameter_counts(name: str, millions: float, depth3: int) -> None:
    """The published classifiers' counts (SPEC-family section 2), plus the output norms norm0..3."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000)
    out_norms = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in {f"norm{i}" for i in range(4)})
    count = sum(p.numel() for p in model.parameters()) - out_norms
    assert abs(count / 1e6 - millions) / millions < 0.02
    assert abs(count / 1e6 - millions) < 0.006  # equal to the published definitions to the stated digits
    assert len(model.layers[2].blocks) == depth3


def test_recipe_decay_rule_exempts_exactly_the_published_norm_names() -> None:
    """MLLA-B's mmseg config exempts names containing 'norm': here the LayerNorms and BatchNorms, nothing else."""
    from seg.train.weight_decay import no_decay_names

    model = timm.create_model("test_mlla")
    published = {n for n, _ in model.named_parameters() if "norm" in n}
    assert any(".conv.2.norm." in n for n in published) and "patch_embed.conv1.norm.weight" in published
    assert no_decay_names(model, "norms_tables") == published
    assert model.no_weight_decay() == set()


def test_every_parameter_gets_a_gradient_in_upernet() -> None:
    model = smp.UPerNet(encoder_name="tu-test_mlla", encoder_weights=None, classes=5, decoder_channels=32)
    assert model.encoder.out_channels == [3, 0, 16, 32, 64, 128]
    out = model(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 5, 64, 96)
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model = timm.create_model("test_mlla", drop_path_rate=0.0)
    x = torch.randn(1, 3, 32, 40)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).sum().backward()
        grads.append(model.layers[1].blocks[0].attn.qk.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_logits_equal_with_and_without_64_padded_pixels() -> None:
    torch.manual_seed(0)
    model = Segmentor("test_mlla", "upernet", num_classes=5, decoder_channels=32, aux_head=False).eval()
    x = torch.randn(1, 3, 120, 170)
    padded = F.pad(x, (0, 64, 0, 64))  # a batch padded to a common size
    with torch.no_grad():
        plain = model(x)["out"]
        with_padding = model(padded, sizes=[(120, 170)])["out"]
    assert with_padding.shape[-2:] == (184, 234)
    torch.testing.assert_close(with_padding[..., :120, :170], plain, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_export_with_dynamic_sizes_equals_eager(tmp_path: Path) -> None:
    """Strict torch.export traced at 64 x 96 and its ONNX (onnxruntime) at other sizes, none a multiple of 32
    (RoPE angles, stem and merging padding all follow the symbolic H x W). Minutes on a CPU: slow."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from seg.kernels import set_backend
    from seg.serve.export import export_onnx, export_program, export_supported

    if not export_supported():
        pytest.skip("this torch cannot export the models")
    torch.manual_seed(0)
    model = Segmentor("test_mlla", "semantic_fpn", num_classes=5, decoder_channels=16, aux_head=False)
    model = set_backend(model, "reference").eval()
    program = export_program(model, torch.randn(1, 3, 64, 96))
    session = ort.InferenceSession(str(export_onnx(program, tmp_path / "mlla.onnx")),
                                   providers=["CPUExecutionProvider"])
    for h, w in [(96, 64), (75, 101)]:
        image = torch.randn(1, 3, h, w)
        with torch.no_grad():
            expected = model(image)["out"]
            torch.testing.assert_close(program.module()(image), expected, atol=1e-5, rtol=0)
        (got,) = session.run(None, {"image": image.numpy()})
        assert got.shape == (1, 5, h, w)
        torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=0)
