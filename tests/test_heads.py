"""Tests for the Semantic FPN and auxiliary FCN heads."""

from __future__ import annotations

import pytest
import torch

from seg.heads import AuxFCNHead, SemanticFPNHead

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
    assert [len(s.blocks) for s in head.scale_heads] == [1, 1, 2, 3]
    norms = [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 7
    convs = [m for s in head.scale_heads for m in s.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 7 and all(m.bias is None for m in convs)


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
    assert head.conv[0].bias is None
