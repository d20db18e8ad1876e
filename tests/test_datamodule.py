"""SegmentationDataModule: batch shapes per stage, class names, DDP samplers, seeding and config parsing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_lightning import seed_everything
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

from seg.data.datamodule import SegmentationDataModule
from seg.data.spec import ADE20K, DatasetSpec


def write_pair(root: Path, split: str, stem: str, h: int, w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for sub in ("images", "annotations"):
        (root / sub / split).mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "images" / split / f"{stem}.jpg")
    grid = rng.integers(0, 5, (h // 8 + 1, w // 8 + 1))  # raw labels 0..4 in 8x8 blocks
    label = np.kron(grid, np.ones((8, 8), dtype=np.int64))[:h, :w].astype(np.uint8)
    Image.fromarray(label, mode="L").save(root / "annotations" / split / f"{stem}.png")


@pytest.fixture()
def tiny_root(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    for i in range(5):
        write_pair(root, "training", f"train_{i}", 60, 80, seed=i)
    write_pair(root, "validation", "val_0", 60, 80, seed=10)
    write_pair(root, "validation", "val_1", 90, 45, seed=11)
    write_pair(root, "validation", "val_2", 40, 40, seed=12)
    return root


def make_dm(root: Path, num_classes: int = 4, **kwargs) -> SegmentationDataModule:
    spec = DatasetSpec(num_classes=num_classes, name="tiny", test_scale=(64, 32))
    args = dict(root=str(root), spec=spec, crop_size=32, batch_size=2, num_workers=0, train_scale=(64, 32))
    return SegmentationDataModule(**(args | kwargs))


def test_batches_per_stage(tiny_root: Path, tmp_path: Path) -> None:
    predict_dir = tmp_path / "photos"
    (predict_dir / "nested").mkdir(parents=True)
    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(predict_dir / "nested" / "wide.png")
    dm = make_dm(tiny_root, predict_root=str(predict_dir))
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 2  # 5 images, batch 2, last partial batch dropped
    batch = train[0]
    assert set(batch) == {"image", "mask"}
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (2, 32, 32) and batch["mask"].dtype == torch.int64
    assert set(torch.unique(batch["mask"]).tolist()) <= {0, 1, 2, 3, 255}  # raw 0 -> 255, k -> k - 1

    val = list(dm.val_dataloader())
    assert [b["name"] for b in val] == [["val_0"], ["val_1"], ["val_2"]]
    # 60x80 fits (64, 32) with factor min(64/80, 32/60): 32x43; the mask keeps the original 60x80
    assert val[0]["image"].shape == (1, 3, 32, 43) and val[0]["mask"].shape == (1, 60, 80)
    assert val[1]["image"].shape == (1, 3, 64, 32) and val[1]["mask"].shape == (1, 90, 45)
    assert val[0]["mask"].dtype == torch.int64

    dm.setup("test")
    assert len(dm.test_dataloader()) == 3

    dm.setup("predict")
    (pred,) = list(dm.predict_dataloader())
    assert pred["image"].shape == (1, 3, 32, 64)
    assert pred["path"] == ["nested/wide.png"]
    assert pred["orig_size"].tolist() == [[50, 100]] and pred["orig_size"].dtype == torch.int64
    assert pred["photo"].shape == (1, 50, 100, 3) and pred["photo"].dtype == torch.uint8  # for the writer


def test_facts_come_from_the_spec(tiny_root: Path) -> None:
    dm = make_dm(tiny_root)
    assert dm.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert dm.num_classes == 4 and dm.ignore_index == 255 and dm.test_scale == (64, 32)
    ade = SegmentationDataModule(str(tiny_root), spec="ade20k")
    assert ade.spec is ADE20K and ade.num_classes == 150 and ade.class_names[:2] == ["wall", "building"]
    named = make_dm(tiny_root, spec=DatasetSpec(num_classes=4, class_names=("sky", "road", "car", "tree"),
                                                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), test_scale=(64, 32)))
    assert named.class_names == ["sky", "road", "car", "tree"]
    named.setup("validate")
    image = next(iter(named.val_dataloader()))["image"]
    assert image.min() >= 0 and image.max() > 10  # the spec's normalisation (none here), not ImageNet's
    assert dm.hparams["spec"]["num_classes"] == 4 and isinstance(dm.hparams["spec"]["class_names"], list)
    with pytest.raises(ValueError, match="unknown data set spec 'ade'; known: ade20k, cityscapes, demo"):
        SegmentationDataModule(str(tiny_root), spec="ade")


def test_missing_root_and_predict_root(tmp_path: Path) -> None:
    dm = make_dm(tmp_path / "data" / "demo")
    with pytest.raises(FileNotFoundError, match=r"data/demo does not exist.*README.*ADE20K"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="predict_root"):
        dm.setup("predict")


def test_label_out_of_range_names_file(tiny_root: Path) -> None:
    dm = make_dm(tiny_root, num_classes=3)  # raw label 4 -> class 3: out of range
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"val_0.png holds values \[4\] outside 1..3"):
        next(iter(dm.val_dataloader()))


def test_distributed_eval_loaders_do_not_repeat_images(tiny_root: Path) -> None:
    seen = []
    for rank in range(2):
        dm = make_dm(tiny_root)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        dm.setup("validate")
        loader = dm.val_dataloader()
        assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
        seen += [b["name"][0] for b in loader]
    assert sorted(seen) == ["val_0", "val_1", "val_2"]  # 3 images over 2 ranks: none padded or repeated


def test_training_batches_follow_seed_everything(tiny_root: Path) -> None:
    def first_batch(seed: int) -> torch.Tensor:
        seed_everything(seed, verbose=False)
        dm = make_dm(tiny_root)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["image"]

    assert torch.equal(first_batch(3), first_batch(3))
    assert not torch.equal(first_batch(3), first_batch(4))
    seed_everything(3, verbose=False)
    dm = make_dm(tiny_root)
    dm.setup("fit")
    first, reloaded = (next(iter(dm.train_dataloader()))["image"] for _ in range(2))
    assert not torch.equal(first, reloaded)  # a reloaded loader continues the stream, it does not repeat it


def test_loader_options(tiny_root: Path) -> None:
    dm = make_dm(tiny_root, num_workers=2, batch_size=8)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2 and loader.worker_init_fn is not None
    assert not loader.drop_last  # 5 images < batch 8: keep the partial batch rather than none
    assert dm.val_dataloader().batch_size == 1


def test_parses_from_config() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SegmentationDataModule, "data")
    cfg = parser.parse_args(["--data.root=x", "--data.train_scale=[1024, 256]", "--data.spec=demo"])
    assert cfg.data.train_scale == (1024, 256) and cfg.data.spec == "demo"
    assert cfg.data.crop_size == 512 and cfg.data.predict_root is None
