"""Tests for the mmseg heads: Semantic FPN, UperNet and the auxiliary FCN head (parameter counts, mmseg's names,
the published computation at odd sizes). Their logits against the published code: test_published_segmenters.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seg.model.heads import AuxFCNHead, SemanticFPNHead, UPerHead

PVT_T_WIDTHS = (64, 128, 320, 512)


def _features(widths: tuple[int, ...], height: int, width: int, batch: int = 2) -> list[torch.Tensor]:
    """Random encoder maps at strides 4, 8, 16, 32 for a (height, width) image, sizes rounded up."""
    out = []
    h, w = -(-height // 4), -(-width // 4)
    for c in widths:
        out.append(torch.randn(batch, c, h, w))
        h, w = -(-h // 2), -(-w // 2)
    return out


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_semantic_fpn_param_count_matches_formula_for_pvt_tiny() -> None:
    fpn, head, classes = 256, 128, 150
    lateral = sum(c * fpn + fpn for c in PVT_T_WIDTHS)  # 1x1 convs with bias
    fpn_convs = 4 * (9 * fpn * fpn + fpn)  # 3x3 convs with bias
    first_block = 9 * fpn * head + 2 * head  # 3x3 conv without bias + BN (weight, bias)
    next_block = 9 * head * head + 2 * head
    # Levels at strides 4, 8, 16, 32 have 1, 1, 2, 3 blocks: 4 first blocks, 3 further ones.
    scale_heads = 4 * first_block + 3 * next_block
    classifier = head * classes + classes
    expected = lateral + fpn_convs + scale_heads + classifier
    assert expected == 4_266_646
    assert _count(SemanticFPNHead(PVT_T_WIDTHS, classes)) == expected


def test_semantic_fpn_block_layout() -> None:
    head = SemanticFPNHead(PVT_T_WIDTHS, 150)
    assert [len(s) for s in head.scale_heads] == [1, 2, 4, 6]  # [ConvModule, Upsample2x] per step
    norms = [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 7
    convs = [m for s in head.scale_heads for m in s.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 7 and all(m.bias is None for m in convs)


def test_semantic_fpn_names_are_mmseg_names() -> None:
    """A published checkpoint's ``neck.`` / ``decode_head.`` entries map one to one onto these names."""
    names = set(SemanticFPNHead(PVT_T_WIDTHS, 150).state_dict())
    expected = {"conv_seg.weight", "conv_seg.bias"}
    for i in range(4):
        expected |= {f"neck.lateral_convs.{i}.conv.{p}" for p in ("weight", "bias")}
        expected |= {f"neck.fpn_convs.{i}.conv.{p}" for p in ("weight", "bias")}
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    for i, steps in enumerate([1, 1, 2, 3]):
        for k in range(steps):
            expected.add(f"scale_heads.{i}.{2 * k}.conv.weight")
            expected |= {f"scale_heads.{i}.{2 * k}.bn.{p}" for p in bn}
    assert names == expected


def test_semantic_fpn_upsamples_by_exactly_two() -> None:
    """On sizes that are not multiples of 32 mmseg upsamples each step by 2 and resizes once at the end; resizing
    each step to the finer level's size (the former head) gives other logits, equal ones on multiples of 32."""
    torch.manual_seed(0)
    head = SemanticFPNHead((8, 8, 8, 8), num_classes=3, fpn_channels=16, head_channels=8).eval()

    def stepwise(feats: list[torch.Tensor]) -> torch.Tensor:
        levels = head.neck(feats)
        out = head.scale_heads[0](levels[0])
        for i in range(1, 4):
            x = levels[i]
            for j in range(i):
                x = head.scale_heads[i][2 * j](x)
                x = F.interpolate(x, size=levels[i - j - 1].shape[-2:], mode="bilinear", align_corners=False)
            out = out + x
        return head.conv_seg(out)

    with torch.no_grad():
        square = _features((8, 8, 8, 8), 64, 96, batch=1)
        torch.testing.assert_close(head(square), stepwise(square), rtol=1e-5, atol=1e-6)
        odd = _features((8, 8, 8, 8), 256, 342, batch=1)  # maps 64 x 86, 32 x 43, 16 x 22, 8 x 11
        got, former = head(odd), stepwise(odd)
    assert got.shape == former.shape == (1, 3, 64, 86)
    assert (got - former).abs().max() > 1e-3 * got.abs().max()


def test_uper_head_param_count_and_names() -> None:
    c, classes, widths = 512, 150, (96, 192, 384, 768)
    head = UPerHead(widths, classes)
    bn = 2 * c
    ppm = 4 * (widths[-1] * c + bn)
    bottleneck = 9 * (widths[-1] + 4 * c) * c + bn
    lateral = sum(w * c + bn for w in widths[:-1])
    fpn = 3 * (9 * c * c + bn)
    fuse = 9 * 4 * c * c + bn
    assert _count(head) == ppm + bottleneck + lateral + fpn + fuse + c * classes + classes
    names = {n.rsplit(".", 2)[0] for n in head.state_dict() if n.endswith(".bn.weight")}
    assert names == {f"psp_modules.{j}.1" for j in range(4)} | {"bottleneck", "fpn_bottleneck"} | {
        f"lateral_convs.{i}" for i in range(3)} | {f"fpn_convs.{i}" for i in range(3)}
    assert not any(isinstance(m, torch.nn.LayerNorm | torch.nn.GroupNorm) for m in head.modules())


@pytest.mark.parametrize("size", [(64, 96), (70, 101), (256, 342)])
def test_uper_head_output_at_stride_4_for_any_size(size: tuple[int, int]) -> None:
    feats = _features((16, 24, 32, 40), *size, batch=2)
    head = UPerHead((16, 24, 32, 40), num_classes=5, channels=16).eval()
    out = head(feats)
    assert out.shape == (2, 5, *feats[0].shape[-2:]) and torch.isfinite(out).all()


def test_classifier_reset_keeps_the_rest() -> None:
    head = UPerHead((16, 24, 32, 40), num_classes=5, channels=16)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    head.reset_classifier(7)
    after = head.state_dict()
    assert after["conv_seg.weight"].shape == (7, 16, 1, 1) and after["conv_seg.bias"].abs().sum() == 0
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith("conv_seg."))


@pytest.mark.parametrize("size", [(64, 96), (70, 101), (33, 129)])
def test_semantic_fpn_output_at_stride_4_for_any_size(size: tuple[int, int]) -> None:
    feats = _features((16, 24, 32, 40), *size)
    head = SemanticFPNHead((16, 24, 32, 40), num_classes=5, fpn_channels=32, head_channels=16)
    out = head(feats)
    assert out.shape == (2, 5, *feats[0].shape[-2:])
    assert torch.isfinite(out).all()


def test_semantic_fpn_accepts_smp_feature_list() -> None:
    torch.manual_seed(0)
    feats = _features((16, 24, 32, 40), 64, 64)
    smp_list = [torch.randn(2, 3, 64, 64), torch.empty(2, 0, 32, 32), *feats]
    head = SemanticFPNHead((16, 24, 32, 40), num_classes=5, fpn_channels=32, head_channels=16).eval()
    torch.testing.assert_close(head(smp_list), head(feats))


def test_fpn_top_down_only() -> None:
    """The coarsest map reaches the finest pyramid level (top-down); the finest never reaches coarser ones."""
    torch.manual_seed(0)
    head = SemanticFPNHead((8, 8, 8, 8), num_classes=3, fpn_channels=16, head_channels=8).eval()
    feats = _features((8, 8, 8, 8), 64, 64)
    base = head.neck(feats)
    changed_coarse = head.neck([*feats[:3], feats[3] + 1.0])
    changed_fine = head.neck([feats[0] + 1.0, *feats[1:]])
    assert (changed_coarse[0] - base[0]).abs().max() > 1e-3
    torch.testing.assert_close(changed_fine[3], base[3])
    torch.testing.assert_close(changed_fine[1], base[1])


def test_semantic_fpn_backward_reaches_every_parameter() -> None:
    head = SemanticFPNHead((16, 24, 32, 40), num_classes=5, fpn_channels=32, head_channels=16).train()
    head(_features((16, 24, 32, 40), 70, 101)).square().mean().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    head = SemanticFPNHead((16, 24, 32, 40), num_classes=5, fpn_channels=32, head_channels=16)
    feats = _features((16, 24, 32, 40), 64, 64)
    head.eval()
    torch.testing.assert_close(head(feats), head(feats))
    head.train()
    assert not torch.allclose(head(feats), head(feats))


def test_aux_fcn_head_shape_and_param_count() -> None:
    in_ch, ch, classes = 320, 256, 150
    head = AuxFCNHead(in_ch, classes)
    expected = 9 * in_ch * ch + 2 * ch + ch * classes + classes  # conv (no bias) + BN + classifier
    assert _count(head) == expected == 776_342
    out = head.eval()(torch.randn(2, in_ch, 9, 13))
    assert out.shape == (2, classes, 9, 13)
    assert head.convs[0].conv.bias is None
    assert set(head.state_dict()) == {"convs.0.conv.weight", "conv_seg.weight", "conv_seg.bias"} | {
        f"convs.0.bn.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
