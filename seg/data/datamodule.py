"""The Lightning data module for ADE20K-layout data sets (ADE20K itself or custom data in the same layout) and
for Cityscapes (its own layout, see :mod:`seg.data.layout`).

Batches (dicts):

- train: ``image`` float32 (B, 3, crop_h, crop_w), ``mask`` int64 (B, crop_h, crop_w).
- val / test (batch size 1): ``image`` float32 (1, 3, h, w) rescaled, ``mask`` int64 (1, H0, W0) the
  original-size label that metrics are computed against, ``name`` [stem].
- predict (batch size 1): ``image`` (1, 3, h, w), ``photo`` uint8 (1, H0, W0, 3) the decoded original (what the
  prediction writer draws on), ``path`` [path relative to ``predict_root``], ``orig_size`` int64 (1, 2) = (H0, W0).

Test runs on ``val_split`` (neither ADE20K nor Cityscapes publishes test labels).

Bad files (truncated images, label maps of the wrong size or with values beyond ``num_classes``) stop the run
with an error naming the file, also from inside DataLoader workers. With ``skip_bad_samples=True`` they are
passed over instead, each with a warning naming the file: in training the next good sample takes the place of
a bad one (batches keep their size: BatchNorm and DDP need that); in validation, test and predict the sample
is dropped (duplicating an image would bias the metrics). Each bad file is warned about once, when first met;
the number of distinct bad samples met so far is logged as ``data/skipped/<stage>`` (train, val, test) each
time it grows, summed up in a warning at the end of the run, and the problems are listed in
:attr:`SegmentationDataModule.skipped_samples`. A label value out of range is never clipped into a class.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from seg.data.ade20k import ImageFolder, SegmentationFolder
from seg.data.layout import LayoutName, layout_for
from seg.data.safety import DEFAULT_MAX_PIXELS
from seg.data.spec import ADE20K, ADE20K_CROP, ADE20K_SCALE, DatasetSpec, SpecFacts, as_spec
from seg.data.synthetic import ensure_demo_dataset
from seg.data.transforms import eval_transform, train_transform

__all__ = ["SegmentationDataModule", "SkipBadSamples", "SkipLedger", "SkippingDataLoader", "seed_worker"]


def _mixed_seed(base: int, rank: int) -> int:
    """A 63-bit seed mixing a torch seed and the process rank."""
    return int(np.random.SeedSequence([base % 2**63, rank]).generate_state(1, dtype=np.uint64)[0]) >> 1


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


class SkipBadSamples(Dataset):
    """Pass over samples whose files cannot be used instead of stopping the run.

    A sample is bad when reading or transforming it raises ``ValueError`` or ``OSError`` (the data sets name
    the file in those errors; other exceptions are bugs and propagate). With ``substitute`` the next good
    sample (index + 1, + 2, ..., wrapping) is returned in its place; otherwise a sample dict without
    ``image`` is returned, which :func:`collate_skipping` drops. Every sample carries ``skipped``: the
    messages of the bad samples passed over for it.

    Args:
        dataset: data set of sample dicts whose errors name the file (as the data sets here do).
        substitute: replace a bad sample by the next good one (training) or drop it (evaluation).
        max_consecutive: this many bad samples in a row raise: the data set or its settings
            (``num_classes``, ``reduce_zero_label``, the split) are wrong, not single files.
    """

    def __init__(self, dataset: Dataset, substitute: bool, max_consecutive: int = 32) -> None:
        self.dataset = dataset
        self.substitute = substitute
        self.max_consecutive = max_consecutive

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        problems: list[str] = []
        for step in range(min(self.max_consecutive, len(self.dataset))):
            try:
                sample = self.dataset[(index + step) % len(self.dataset)]
            except (ValueError, OSError) as err:
                problems.append(str(err))
                if not self.substitute:
                    return {"skipped": problems}
                continue
            sample["skipped"] = problems
            return sample
        raise ValueError(f"{len(problems)} samples in a row from index {index} cannot be used: the data set or "
                         f"its settings (num_classes, reduce_zero_label, split) are likely wrong. First problem: "
                         f"{problems[0]}")


def collate_skipping(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate the samples that hold an image; ``skipped`` lists the problems of the whole batch."""
    skipped = [problem for sample in samples for problem in sample.pop("skipped", [])]
    good = [sample for sample in samples if "image" in sample]
    batch = default_collate(good) if good else {}
    batch["skipped"] = skipped
    return batch


class SkipLedger:
    """Skipped samples of one stage in this process: one warning per bad file, a running count logged.

    Args:
        stage: ``train``, ``val``, ``test`` or ``predict``.
        log: ``log(name, value)`` called with ``data/skipped/<stage>`` and the number of distinct bad samples
            met so far, whenever it grows; None: warnings only.
    """

    def __init__(self, stage: str, log: Callable[[str, float], None] | None = None) -> None:
        self.stage = stage
        self.log = log
        self.problems: dict[str, int] = {}  # message (naming the file) -> times skipped
        self._in_pass = 0

    def add(self, problems: list[str]) -> None:
        """Record the problems of one batch; warn about each the first time it is met."""
        new = [problem for problem in dict.fromkeys(problems) if problem not in self.problems]
        for problem in problems:
            self.problems[problem] = self.problems.get(problem, 0) + 1
        for problem in new:
            warnings.warn(f"{self.stage}: skipping a bad sample: {problem}", stacklevel=3)
        if new and self.log is not None:
            self.log(f"data/skipped/{self.stage}", float(len(self.problems)))
        self._in_pass += len(problems)

    def start_pass(self) -> None:
        """A new pass over the loader begins."""
        self._in_pass = 0

    def end_pass(self, kept_batches: int) -> None:
        """Close a pass that ran to its end; raises when every sample of it was bad."""
        skipped, self._in_pass = self._in_pass, 0
        if skipped and not kept_batches:
            raise ValueError(f"{self.stage}: all {skipped} samples of the pass were bad; e.g. "
                             f"{next(reversed(self.problems))}")


class SkippingDataLoader(DataLoader):
    """A DataLoader over :class:`SkipBadSamples` with :func:`collate_skipping`: it hands each batch's skipped
    samples to ``ledger`` (in the main process, also with workers) and leaves out batches left empty.

    Args:
        ledger: where skipped samples are counted.
        *args, **kwargs: as for ``DataLoader``.
    """

    def __init__(self, *args: Any, ledger: SkipLedger, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ledger = ledger

    def __iter__(self) -> Iterator[dict[str, Any]]:
        kept = 0
        self.ledger.start_pass()
        for batch in super().__iter__():
            self.ledger.add(batch.pop("skipped", []))
            if "image" in batch:
                kept += 1
                yield batch
        self.ledger.end_pass(kept)


class SegmentationDataModule(SpecFacts, pl.LightningDataModule):
    """ADE20K-layout data (``root/images/{split}/*.jpg|png``, ``root/annotations/{split}/*.png``) or Cityscapes
    (``root/leftImg8bit/{split}/<city>/*_leftImg8bit.png``, ``root/gtFine/{split}/<city>/*_labelTrainIds.png``).

    Args:
        root: data set root (e.g. ``data/ADEChallengeData2016``, ``data/cityscapes``).
        spec: the data set's facts (:class:`~seg.data.spec.DatasetSpec`: classes, ignore label, zero-label rule,
            names, palette, normalisation, evaluation scale), or the name of a known one (``ade20k``,
            ``cityscapes``, ``demo``). The CLI links its class count into the model and its ignore label and
            names into the task.
        layout: folder layout, ``ade20k`` or ``cityscapes``; None: the layout of the data set the spec names
            (Cityscapes' for the ``cityscapes`` spec, ADE20K's for every other).
        crop_size: training crop (height, width) in pixels, or one side of a square crop.
        batch_size: training images per device (val / test / predict always use 1).
        num_workers: DataLoader worker processes per loader.
        train_scale: (long, short) training rescale box before the random ratio in [0.5, 2].
        train_split: training split folder name; None: the layout's (``training``, ``train``).
        val_split: validation (and test) split folder name; None: the layout's (``validation``, ``val``).
        predict_root: folder (recursive) or image file to predict on.
        demo: the bundled synthetic demo set: generated into ``root`` by :meth:`prepare_data` when a run
            fits, validates or tests (deterministic, seconds, no download; a complete copy is reused), never
            for predict.
        skip_bad_samples: pass over unusable samples with a warning naming the file, and count them (see the
            module docstring), instead of stopping with an error. Prediction always skips them.
        max_pixels: prediction skips (with a warning naming the file, counted) images with more pixels than
            this, before decoding them; None: no limit.
    """

    def __init__(
        self,
        root: str,
        spec: DatasetSpec | str = ADE20K.name,
        layout: LayoutName | None = None,
        crop_size: int | tuple[int, int] = ADE20K_CROP,
        batch_size: int = 2,
        num_workers: int = 4,
        train_scale: tuple[int, int] = ADE20K_SCALE,
        train_split: str | None = None,
        val_split: str | None = None,
        predict_root: str | None = None,
        demo: bool = False,
        skip_bad_samples: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__()
        crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(int(v) for v in crop_size)
        if len(crop) != 2 or min(crop) < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError(f"need crop_size >= 1 (one side or (height, width)), batch_size >= 1, num_workers >= 0; "
                             f"got {crop_size}, {batch_size}, {num_workers}")
        self.spec = as_spec(spec)
        self.layout = layout_for(layout, self.spec.name)
        self.save_hyperparameters(ignore=["spec"])
        self.hparams["spec"] = self.spec.to_dict()  # plain values: checkpoints load with weights_only=True
        self.root = Path(root)
        self.demo = demo
        self.crop_size: tuple[int, int] = crop  # (height, width)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_scale = (int(train_scale[0]), int(train_scale[1]))
        self.train_split = train_split or self.layout.train_split
        self.val_split = val_split or self.layout.val_split
        self.predict_root = predict_root
        self.train_set: SegmentationFolder | None = None
        self.val_set: SegmentationFolder | None = None
        self.predict_set: ImageFolder | None = None
        self.skip_bad_samples = skip_bad_samples
        self.max_pixels = max_pixels
        self._ledgers = {stage: SkipLedger(stage, self._log_metric) for stage in ("train", "val", "test")}
        self._ledgers["predict"] = SkipLedger("predict")

    @property
    def skipped_samples(self) -> dict[str, list[str]]:
        """Per stage (train / val / test / predict), the distinct problems (each naming its file) met so far in
        this process."""
        return {stage: list(ledger.problems) for stage, ledger in self._ledgers.items()}

    def _log_metric(self, name: str, value: float) -> None:
        trainer = self.trainer
        if trainer is None or getattr(trainer, "sanity_checking", False):
            return
        for logger in getattr(trainer, "loggers", []):
            logger.log_metrics({name: value}, step=trainer.global_step)

    @property
    def test_scale(self) -> tuple[int, int]:
        """(long, short) box the evaluation and prediction images are rescaled to fit (the spec's)."""
        return self.spec.test_scale

    def _check_root(self) -> None:
        if not self.root.is_dir():
            downloads = {"cityscapes": ("leftImg8bit_trainvaltest.zip gtFine_trainvaltest.zip", "Cityscapes")}
            archives, section = downloads.get(self.layout.name, ("ADEChallengeData2016.zip", "ADE20K"))
            raise FileNotFoundError(
                f"data set root {self.root} does not exist. Download {archives} and run "
                f"`python -m seg.data.prepare {archives} --out data` (see the README, section "
                f"'{section}'), or point `root` at a folder in the same layout."
            )

    def _folder(self, split: str, train: bool) -> SegmentationFolder:
        spec = self.spec
        if train:
            transform = train_transform(self.crop_size, self.train_scale, ignore_index=spec.ignore_index,
                                        mean=spec.mean, std=spec.std)
        else:
            transform = eval_transform(spec.test_scale, spec.mean, spec.std)
        return SegmentationFolder(
            self.root,
            split,
            transform=transform,
            num_classes=spec.num_classes,
            ignore_index=spec.ignore_index,
            reduce_zero_label=spec.reduce_zero_label,
            original_mask=not train,
            layout=self.layout,
        )

    def prepare_data(self) -> None:
        """Generate the demo set into ``root`` (``demo=True``; once per machine, before ``setup``), unless the run
        only predicts."""
        trainer = self.trainer
        predicting = trainer is not None and trainer.state.fn == "predict"
        if self.demo and not predicting:
            ensure_demo_dataset(self.root)

    def setup(self, stage: str | None = None) -> None:
        """Index the splits that ``stage`` (fit / validate / test / predict; None: all) needs."""
        if stage in ("fit", "validate", "test", None):
            self._check_root()
            if stage in ("fit", None) and self.train_set is None:
                self.train_set = self._folder(self.train_split, train=True)
            if self.val_set is None:
                self.val_set = self._folder(self.val_split, train=False)
        if stage == "predict" or (stage is None and self.predict_root):
            if not self.predict_root:
                raise ValueError("predict needs `predict_root`: a folder of images or one image file")
            if self.predict_set is None:
                transform = eval_transform(self.spec.test_scale, self.spec.mean, self.spec.std)
                self.predict_set = ImageFolder(self.predict_root, transform, self.max_pixels)

    def teardown(self, stage: str) -> None:
        """At the end of a run: one warning summing up the samples skipped so far, if any."""
        counts = {name: len(ledger.problems) for name, ledger in self._ledgers.items() if ledger.problems}
        if counts:
            listed = ", ".join(f"{name} {count}" for name, count in counts.items())
            warnings.warn(f"bad samples skipped so far (distinct files, this process): {listed}; they are named in "
                          "the warnings above and in `skipped_samples`", stacklevel=2)

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, dataset: Dataset, stage: str, **kwargs: Any) -> DataLoader:
        rank, _ = self._rank_and_world()
        kwargs.update(
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=functools.partial(seed_worker, rank=rank),
        )
        if not self.skip_bad_samples and stage != "predict":
            return DataLoader(dataset, **kwargs)
        wrapped = SkipBadSamples(dataset, substitute=stage == "train")
        return SkippingDataLoader(wrapped, ledger=self._ledgers[stage], collate_fn=collate_skipping, **kwargs)

    def _eval_loader(self, dataset: Dataset | None, stage: str) -> DataLoader:
        if dataset is None:
            setup_stage = "validate" if stage == "val" else stage
            raise RuntimeError(f"call setup('{setup_stage}') before asking for the {setup_stage} loader")
        rank, world = self._rank_and_world()
        sampler = None
        if world > 1:  # the default DistributedSampler would repeat images to even out the ranks
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return self._loader(dataset, stage, batch_size=1, shuffle=False, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("call setup('fit') before asking for the train loader")
        rank, world = self._rank_and_world()
        if self.num_workers == 0:  # no worker runs seed_worker: draw from the global torch RNG as workers do
            base = int(torch.empty((), dtype=torch.int64).random_().item())
            self.train_set.reseed(_mixed_seed(base, rank))
        # full batches only (BatchNorm in the heads needs > 1 image), unless the data set is tiny
        drop_last = len(self.train_set) >= self.batch_size * world
        return self._loader(self.train_set, "train", batch_size=self.batch_size, shuffle=True, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set, "val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set, "test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_set, "predict")
