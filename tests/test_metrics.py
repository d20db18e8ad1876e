"""SegmentationMetric against a plain numpy implementation of the mmseg definitions (its ``IoUMetric``)."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _ranks import run_ranks
from torchmetrics.classification import MulticlassJaccardIndex

from seg.train.metrics import SegmentationMetric, confusion_matrix

IGNORE = 255


def reference_scores(preds: np.ndarray, target: np.ndarray, num_classes: int) -> dict:
    """Per-class counts by masks, one class at a time, straight from the SPEC formulas."""
    valid = target != IGNORE
    inter, pred_area, label_area = (np.zeros(num_classes) for _ in range(3))
    for c in range(num_classes):
        inter[c] = np.sum(valid & (preds == c) & (target == c))
        pred_area[c] = np.sum(valid & (preds == c))
        label_area[c] = np.sum(valid & (target == c))
    union = pred_area + label_area - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(label_area > 0, inter / label_area, np.nan)
    return {
        "IoU": iou,
        "Acc": acc,
        "mIoU": float(np.nanmean(iou)),
        "mAcc": float(np.nanmean(acc)),
        "aAcc": float(inter.sum() / label_area.sum()),
    }


def random_maps(seed: int, shape: tuple[int, ...] = (4, 17, 23)) -> tuple[torch.Tensor, torch.Tensor]:
    """7 classes: class 5 never occurs (NaN IoU and Acc), class 6 is only predicted (NaN Acc, IoU 0)."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 5, shape, generator=gen)
    target[torch.rand(shape, generator=gen) < 0.2] = IGNORE
    preds = torch.tensor([0, 1, 2, 3, 4, 6])[torch.randint(0, 6, shape, generator=gen)]
    return preds, target


def assert_matches_reference(result: dict[str, torch.Tensor], ref: dict) -> None:
    for key in ("mIoU", "mAcc", "aAcc"):
        assert abs(float(result[key]) - ref[key]) < 1e-9, key
    for key in ("IoU", "Acc"):
        got = result[key].numpy()
        assert result[key].dtype == torch.float64
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref[key]))
        np.testing.assert_allclose(got, ref[key], rtol=0, atol=1e-9)


def test_random_maps_match_numpy_reference() -> None:
    preds, target = random_maps(0)
    metric = SegmentationMetric(num_classes=7)
    metric.update(preds, target)
    result = metric.compute()
    ref = reference_scores(preds.numpy(), target.numpy(), 7)
    assert_matches_reference(result, ref)
    # the fixture really has the absent-class cases the test is about
    assert math.isnan(ref["IoU"][5]) and math.isnan(ref["Acc"][5])
    assert ref["IoU"][6] == 0 and math.isnan(ref["Acc"][6])
    assert 0 < float(result["mIoU"]) < 1


def test_hand_computed_example() -> None:
    target = torch.tensor([[[0, 0, 1], [2, IGNORE, 1]]])
    preds = torch.tensor([[[0, 1, 1], [0, 2, 1]]])
    metric = SegmentationMetric(num_classes=4)
    metric.update(preds, target)
    result = metric.compute()
    # rows = label, cols = prediction; the ignored pixel (predicted 2) is not counted; class 3 never appears
    expected_cm = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(result["confusion_matrix"], expected_cm)
    assert result["confusion_matrix"].dtype == torch.int64
    # I = (1, 2, 0, 0), L = (2, 2, 1, 0), P = (2, 3, 0, 0), union = (3, 3, 1, 0)
    iou, acc = result["IoU"].tolist(), result["Acc"].tolist()
    assert iou[:3] == pytest.approx([1 / 3, 2 / 3, 0.0], abs=1e-12) and math.isnan(iou[3])
    assert acc[:3] == pytest.approx([1 / 2, 1.0, 0.0], abs=1e-12) and math.isnan(acc[3])
    assert float(result["mIoU"]) == pytest.approx(1 / 3, abs=1e-12)
    assert float(result["mAcc"]) == pytest.approx(1 / 2, abs=1e-12)
    assert float(result["aAcc"]) == pytest.approx(3 / 5, abs=1e-12)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert result[key].ndim == 0


def test_logits_equal_argmax_input() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 11, 13, generator=gen)
    _, target = random_maps(1, (3, 11, 13))
    from_logits, from_index = SegmentationMetric(6), SegmentationMetric(6)
    from_logits.update(logits, target)
    from_index.update(logits.argmax(1), target)
    assert torch.equal(from_logits.confmat, from_index.confmat)
    assert from_logits.confmat.sum() == (target != IGNORE).sum()


def test_several_updates_equal_one_big_update() -> None:
    batches = [random_maps(seed, (2, 9, 14)) for seed in range(4)]
    split, whole = SegmentationMetric(7), SegmentationMetric(7)
    for preds, target in batches:
        split.update(preds, target)
    all_preds, all_target = torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches])
    whole.update(all_preds, all_target)
    assert torch.equal(split.confmat, whole.confmat)
    assert_matches_reference(split.compute(), reference_scores(all_preds.numpy(), all_target.numpy(), 7))


def test_reset_clears_state() -> None:
    metric = SegmentationMetric(7)
    metric.update(*random_maps(2))
    metric.compute()
    metric.reset()
    assert int(metric.confmat.sum()) == 0
    preds, target = random_maps(3)
    metric.update(preds, target)
    assert_matches_reference(metric.compute(), reference_scores(preds.numpy(), target.numpy(), 7))


def test_mIoU_equals_torchmetrics_jaccard_macro() -> None:
    preds, target = random_maps(4)
    ours = SegmentationMetric(7)
    ours.update(preds, target)
    theirs = MulticlassJaccardIndex(num_classes=7, ignore_index=IGNORE, average="macro")
    theirs.update(preds, target)
    assert abs(float(ours.compute()["mIoU"]) - float(theirs.compute())) < 1e-6


def test_out_of_range_target_raises_with_values() -> None:
    preds = torch.zeros(1, 2, 3, dtype=torch.long)
    target = torch.tensor([[[0, 7, IGNORE], [-1, 7, 1]]])
    with pytest.raises(ValueError, match=r"\[-1, 7\]"):
        SegmentationMetric(5).update(preds, target)


def test_out_of_range_prediction_and_bad_shapes_raise() -> None:
    target = torch.zeros(1, 2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[9\]"):
        confusion_matrix(torch.full((1, 2, 3), 9), target, 5)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(1, 3, 2, dtype=torch.long), target, 5)
    with pytest.raises(ValueError, match="channels"):
        confusion_matrix(torch.zeros(1, 4, 2, 3), target, 5)


def test_other_ignore_index() -> None:
    preds, target = random_maps(5)
    shifted = torch.where(target == IGNORE, -1, target)
    a, b = SegmentationMetric(7), SegmentationMetric(7, ignore_index=-1)
    a.update(preds, target)
    b.update(preds, shifted)
    assert torch.equal(a.confmat, b.confmat)


def ddp_worker(rank: int, world_size: int, store: str, data: str, out_dir: str) -> None:
    """One rank of the test below: its share of the samples (uneven: 1 sample vs the rest), then compute()."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world_size), rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))  # a lost peer fails a collective in 60 s, not 30 min
    try:
        preds, target = torch.load(data, weights_only=True)
        metric = SegmentationMetric(7)
        share = range(0, 1) if rank == 0 else range(1, len(preds))
        for i in share:
            metric.update(preds[i : i + 1], target[i : i + 1])
        result = metric.compute()
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank closes its connections while the other may still be in the last collective
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_single_process(tmp_path: Path) -> None:
    preds, target = random_maps(6, (5, 12, 16))
    target[0][target[0] == 4] = 3  # rank 0 never sees class 4 in its labels
    single = SegmentationMetric(7)
    single.update(preds, target)
    expected = single.compute()
    torch.save((preds, target), tmp_path / "maps.pt")
    # fresh interpreters meeting through a file: no fork of this process, no port (see tests/_ranks.py)
    run_ranks("test_metrics:ddp_worker", 2, tmp_path / "ranks", 180, str(tmp_path / "maps.pt"), str(tmp_path))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(result["confusion_matrix"], expected["confusion_matrix"])
        for key in ("mIoU", "mAcc", "aAcc"):
            assert float(result[key]) == float(expected[key])
        for key in ("IoU", "Acc"):
            assert torch.equal(result[key].isnan(), expected[key].isnan())
            assert torch.equal(result[key].nan_to_num(-1), expected[key].nan_to_num(-1))


def test_empty_batch_counts_nothing() -> None:
    metric = SegmentationMetric(3)
    metric.update(torch.zeros(0, 4, 4, dtype=torch.long), torch.zeros(0, 4, 4, dtype=torch.long))
    result = metric.compute()
    assert int(result["confusion_matrix"].sum()) == 0
    assert math.isnan(float(result["mIoU"])) and math.isnan(float(result["aAcc"]))
