"""The Lightning data module for ADE20K-layout data sets (ADE20K itself or custom data in the same layout).

Batches (dicts):

- train: ``image`` float32 (B, 3, crop, crop), ``mask`` int64 (B, crop, crop).
- val / test (batch size 1): ``image`` float32 (1, 3, h, w) rescaled, ``mask`` int64 (1, H0, W0) the
  original-size label that metrics are computed against, ``name`` [stem].
- predict (batch size 1): ``image`` (1, 3, h, w), ``path`` [path relative to ``predict_root``], ``orig_size``
  int64 (1, 2) = (H0, W0).

Test runs on ``val_split`` (ADE20K publishes no test labels).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, get_worker_info

from seg.data.ade20k import ADE20K_CLASSES, ImageFolder, SegmentationFolder, load_class_names
from seg.data.synthetic import ensure_demo_dataset
from seg.data.transforms import eval_transform, train_transform

__all__ = ["SegmentationDataModule", "seed_worker"]

CLASS_NAMES_FILE = "class_names.txt"


def _mixed_seed(base: int, rank: int) -> int:
    """A 63-bit seed mixing a torch seed and the process rank."""
    return int(np.random.SeedSequence([base % 2**63, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _reseed(dataset: Dataset, seed: int) -> None:
    """Reseed ``dataset`` (or the data set it wraps, e.g. a Subset) when it has a random pipeline."""
    while dataset is not None:
        if hasattr(dataset, "reseed"):
            dataset.reseed(seed)
            return
        dataset = getattr(dataset, "dataset", None)


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """DataLoader ``worker_init_fn``: reseed this worker's augmentation pipeline.

    The seed mixes ``torch.initial_seed()`` (the loader's base seed + worker id: different per worker, fixed
    by ``seed_everything``) with the global rank, so workers and processes draw different augmentations and
    runs are reproducible.
    """
    info = get_worker_info()
    if info is not None:
        _reseed(info.dataset, _mixed_seed(torch.initial_seed(), rank))


class SegmentationDataModule(pl.LightningDataModule):
    """ADE20K-layout data: ``root/images/{split}/*.jpg|png`` and ``root/annotations/{split}/*.png``.

    Args:
        root: data set root (e.g. ``data/ADEChallengeData2016``).
        crop_size: square training crop side in pixels.
        batch_size: training images per device (val / test / predict always use 1).
        num_workers: DataLoader worker processes per loader.
        num_classes: number of training classes (150 for ADE20K).
        ignore_index: label of unlabelled pixels.
        class_names: path to a class names file (text, one per line, or a YAML list). Default:
            ``root/class_names.txt`` if present, else the ADE20K names when ``num_classes == 150``,
            else ``class_0``, ``class_1``, ...
        reduce_zero_label: raw label 0 -> ignore, k -> k - 1 (ADE20K).
        train_scale: (long, short) training rescale box before the random ratio in [0.5, 2].
        test_scale: (long, short) box the evaluation images are rescaled to fit.
        train_split: training split folder name.
        val_split: validation (and test) split folder name.
        predict_root: folder (recursive) or image file to predict on.
        demo: the bundled synthetic demo set: generate it into ``root`` on first use (deterministic,
            seconds, no download); a complete copy is reused.
    """

    def __init__(
        self,
        root: str,
        crop_size: int = 512,
        batch_size: int = 2,
        num_workers: int = 4,
        num_classes: int = 150,
        ignore_index: int = 255,
        class_names: str | None = None,
        reduce_zero_label: bool = True,
        train_scale: tuple[int, int] = (2048, 512),
        test_scale: tuple[int, int] = (2048, 512),
        train_split: str = "training",
        val_split: str = "validation",
        predict_root: str | None = None,
        demo: bool = False,
    ) -> None:
        super().__init__()
        if crop_size < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError(f"need crop_size >= 1, batch_size >= 1, num_workers >= 0; got {crop_size}, "
                             f"{batch_size}, {num_workers}")
        self.save_hyperparameters()
        self.root = Path(root)
        if demo:  # before anything reads root (class names are linked into the model at instantiation)
            ensure_demo_dataset(self.root)
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._num_classes = num_classes
        self._ignore_index = ignore_index
        self.class_names_path = class_names
        self.reduce_zero_label = reduce_zero_label
        self.train_scale = (int(train_scale[0]), int(train_scale[1]))
        self.test_scale = (int(test_scale[0]), int(test_scale[1]))
        self.train_split = train_split
        self.val_split = val_split
        self.predict_root = predict_root
        self.train_set: SegmentationFolder | None = None
        self.val_set: SegmentationFolder | None = None
        self.predict_set: ImageFolder | None = None
        self._class_names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        """Number of training classes."""
        return self._num_classes

    @property
    def ignore_index(self) -> int:
        """Label of unlabelled pixels, excluded from loss and metrics."""
        return self._ignore_index

    @property
    def class_names(self) -> list[str]:
        """One name per training class (length ``num_classes``)."""
        if self._class_names is None:
            self._class_names = self._resolve_class_names()
        return self._class_names

    def _resolve_class_names(self) -> list[str]:
        path = Path(self.class_names_path) if self.class_names_path else self.root / CLASS_NAMES_FILE
        if self.class_names_path or path.is_file():
            names = load_class_names(path)
            if len(names) != self.num_classes:
                raise ValueError(f"class names file {path} holds {len(names)} names but num_classes is "
                                 f"{self.num_classes}")
            return names
        if self.num_classes == len(ADE20K_CLASSES):
            return list(ADE20K_CLASSES)
        return [f"class_{i}" for i in range(self.num_classes)]

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data set root {self.root} does not exist. Download ADEChallengeData2016.zip and run "
                "`python -m seg.data.prepare ADEChallengeData2016.zip --out data` (see the README, section "
                "'ADE20K'), or point `root` at a folder in the same layout."
            )

    def _folder(self, split: str, train: bool) -> SegmentationFolder:
        if train:
            transform = train_transform(self.crop_size, self.train_scale, ignore_index=self.ignore_index)
        else:
            transform = eval_transform(self.test_scale)
        return SegmentationFolder(
            self.root,
            split,
            transform=transform,
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
            reduce_zero_label=self.reduce_zero_label,
            original_mask=not train,
        )

    def setup(self, stage: str | None = None) -> None:
        """Index the splits that ``stage`` (fit / validate / test / predict; None: all) needs."""
        if stage in ("fit", "validate", "test", None):
            self._check_root()
            _ = self.class_names  # fail early on a bad class names file
            if stage in ("fit", None) and self.train_set is None:
                self.train_set = self._folder(self.train_split, train=True)
            if self.val_set is None:
                self.val_set = self._folder(self.val_split, train=False)
        if stage == "predict" or (stage is None and self.predict_root):
            if not self.predict_root:
                raise ValueError("predict needs `predict_root`: a folder of images or one image file")
            if self.predict_set is None:
                self.predict_set = ImageFolder(self.predict_root, transform=eval_transform(self.test_scale))

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        rank, _ = self._rank_and_world()
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=functools.partial(seed_worker, rank=rank),
            **kwargs,
        )

    def _eval_loader(self, dataset: Dataset | None, stage: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"call setup('{stage}') before asking for the {stage} loader")
        rank, world = self._rank_and_world()
        sampler = None
        if world > 1:  # the default DistributedSampler would repeat images to even out the ranks
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return self._loader(dataset, batch_size=1, shuffle=False, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("call setup('fit') before asking for the train loader")
        rank, world = self._rank_and_world()
        if self.num_workers == 0:  # no worker runs seed_worker: draw from the global torch RNG as workers do
            base = int(torch.empty((), dtype=torch.int64).random_().item())
            self.train_set.reseed(_mixed_seed(base, rank))
        # full batches only (BatchNorm in the heads needs > 1 image), unless the data set is tiny
        drop_last = len(self.train_set) >= self.batch_size * world
        return self._loader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set, "validate")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set, "test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_set, "predict")
