"""The project's SegFormer head against smp's SegformerDecoder-based head it replaces: same parameter names, same
logits and gradients in training and eval (BatchNorm folded), any input size."""

from __future__ import annotations

import pytest
import torch
from segmentation_models_pytorch.decoders.segformer.decoder import SegformerDecoder

from seg.model.heads import SegFormerHead
from seg.model.segmentor import Segmentor, SmpDecodeHead

CHANNELS = [3, 0, 16, 32, 48, 64]  # smp's list for a 4-stage transformer encoder


def _pair(seed: int = 0) -> tuple[SegFormerHead, SmpDecodeHead]:
    torch.manual_seed(seed)
    ours = SegFormerHead(CHANNELS[-4:], num_classes=7, channels=24).double()
    smp = SmpDecodeHead(SegformerDecoder(CHANNELS, encoder_depth=5, segmentation_channels=24), 24, 7, 0.0).double()
    bn = ours.decoder.fuse_stage[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    smp.load_state_dict(ours.state_dict())  # strict: the names match
    return ours, smp


def _features(size: tuple[int, int], batch: int = 2) -> list[torch.Tensor]:
    H, W = size
    maps = [torch.randn(batch, 3, H, W, dtype=torch.float64), torch.zeros(batch, 0, H // 2, W // 2)]
    for c, s in zip(CHANNELS[2:], (4, 8, 16, 32), strict=True):  # encoder grids: ceil(H / s)
        maps.append(torch.randn(batch, -(-H // s), -(-W // s), c, dtype=torch.float64).permute(0, 3, 1, 2))
    return maps


@pytest.mark.parametrize("size", [(64, 96), (70, 45)])
def test_eval_logits_equal_smp(size: tuple[int, int]) -> None:
    ours, smp = _pair()
    ours.eval(), smp.eval()
    features = _features(size)
    with torch.no_grad():
        got, want = ours(features), smp(features)
    assert got.shape == want.shape == (2, 7, size[0] // 4, size[1] // 4)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_training_logits_gradients_and_statistics_equal_smp() -> None:
    ours, smp = _pair(1)
    ours.train(), smp.train()
    features = _features((64, 64))
    leaves = [[f.clone().requires_grad_(f.numel() > 0) for f in features] for _ in range(2)]
    got, want = ours(leaves[0]), smp(leaves[1])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(got)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    for (name, p), q in zip(ours.named_parameters(), smp.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=name)
    for a, b in zip(leaves[0][2:], leaves[1][2:], strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10)
    for key, value in ours.decoder.fuse_stage[1].state_dict().items():
        torch.testing.assert_close(value, smp.decoder.fuse_stage[1].state_dict()[key])


def test_segmentor_segformer_keeps_saved_names(tmp_path) -> None:
    model = Segmentor("test_flatten_pvt_v2", decoder="segformer", num_classes=5, aux_head=False).eval()
    assert isinstance(model.decode_head, SegFormerHead)
    names = set(model.decode_head.state_dict())
    assert {"decoder.mlp_stage.0.linear.weight", "decoder.fuse_stage.0.weight", "decoder.fuse_stage.1.running_var",
            "classifier.bias"} <= names
    model.save_pretrained(tmp_path)
    loaded = Segmentor.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 75, 61)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["out"], model(x)["out"])


def test_a_folder_saved_with_smps_decoder_loads_with_equal_logits(tmp_path) -> None:
    torch.manual_seed(2)
    old = Segmentor("test_flatten_pvt_v2", decoder="segformer", num_classes=4, aux_head=False)
    channels = list(old.encoder.out_channels)
    old.decode_head = SmpDecodeHead(SegformerDecoder(channels, encoder_depth=5, segmentation_channels=256), 256, 4,
                                    0.0)  # the earlier versions' segformer head
    bn = old.decode_head.decoder.fuse_stage[1]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    old.eval().save_pretrained(tmp_path)
    new = Segmentor.from_pretrained(tmp_path)
    assert isinstance(new.decode_head, SegFormerHead)
    x = torch.randn(1, 3, 66, 90)
    with torch.no_grad():
        torch.testing.assert_close(new(x)["out"], old(x)["out"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [(64, 96), (70, 45)])
def test_the_exported_arrangement_equals_smp(size: tuple[int, int], monkeypatch) -> None:
    """The sum the head traces under ``torch.export`` (1x1 convs on the level maps, the bias on the stride-4 level)
    gives smp's logits too, also where the stride-4 grid is not the target (70 x 45: every level resized)."""
    import seg.model.heads.segformer as segformer

    ours, smp = _pair()
    ours.eval(), smp.eval()
    monkeypatch.setattr(segformer, "exporting", lambda: True)
    features = _features(size)
    with torch.no_grad():
        torch.testing.assert_close(ours(features), smp(features), rtol=1e-10, atol=1e-10)
