"""Bad data, odd inputs, non-finite training and untrusted files: clear errors naming the file, nothing lost."""

from __future__ import annotations

import csv
import math
import os
import re
import tracemalloc
import warnings
from pathlib import Path

import cv2
import fsspec
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _files import write_pair
from _specs import small_spec, spec_arg
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.data import _update_dataloader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from seg.data.ade20k import ImageFolder, SegmentationFolder, read_rgb
from seg.data.datamodule import SegmentationDataModule, SkippingDataLoader
from seg.data.transforms import eval_transform
from seg.model.segmentor import Segmentor
from seg.train.callbacks.non_finite import NonFiniteError, NonFiniteGuard
from seg.train.cli import cli_main

# ---------------------------------------------------------------- helpers


def stripes(h: int = 40, w: int = 48, values: tuple[int, ...] = (0, 1, 2, 3, 4)) -> np.ndarray:
    """Vertical 4-pixel stripes cycling through ``values`` (raw labels: 0 unlabelled, 1..4 classes 0..3)."""
    return np.array(values, np.uint8)[(np.arange(w) // 4) % len(values)][None].repeat(h, 0)


def plant(root: Path, split: str, kind: str) -> Path:
    """Write one bad pair of the given kind; returns the file at fault."""
    image, label = write_pair(root, split, f"bad_{kind}", stripes())
    if kind == "truncated":
        data = image.read_bytes()
        image.write_bytes(data[: len(data) * 2 // 3])  # the header reads, the pixels do not
        return image
    if kind == "wrong_size":
        Image.fromarray(stripes(30, 48), mode="L").save(label)
        return label
    if kind == "value_200":
        Image.fromarray(np.where(stripes() == 4, 200, stripes()).astype(np.uint8), mode="L").save(label)
        return label
    if kind == "rgb_label":
        Image.fromarray(np.repeat(stripes()[:, :, None], 3, 2)).save(label)
        return label
    if kind == "text_as_jpg":
        image.write_text("a text file named .jpg")
        return image
    raise ValueError(kind)


BAD_KINDS = ["truncated", "wrong_size", "value_200", "rgb_label", "text_as_jpg"]
BAD_MESSAGES = {
    "truncated": "cannot decode image",
    "wrong_size": "is 48x30 \\(WxH\\) but its image",
    "value_200": "holds values \\[200\\] outside 1..4",
    "rgb_label": "has mode RGB",
    "text_as_jpg": "cannot decode image",
}


def good_set(root: Path, train: int = 4, val: int = 2) -> Path:
    for i in range(train):
        write_pair(root, "training", f"good_{i}", stripes())
    for i in range(val):
        write_pair(root, "validation", f"val_{i}", stripes())
    return root


def make_dm(root: Path, num_classes: int = 4, **kwargs) -> SegmentationDataModule:
    args = dict(root=str(root), spec=small_spec(num_classes, (64, 32)), crop_size=32, batch_size=2, num_workers=0,
                train_scale=(64, 32))
    return SegmentationDataModule(**(args | kwargs))


class PixelClassifier(pl.LightningModule):
    """A 1x1 convolution over the pixels: the smallest model that consumes the data module's batches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=1)
        self.batch_sizes: list[int] = []
        self.val_names: list[str] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.batch_sizes.append(len(batch["image"]))
        return F.cross_entropy(self.conv(batch["image"] / 60), batch["mask"], ignore_index=255)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_names += batch["name"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def quiet_trainer(**kwargs) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**(args | kwargs))


# ---------------------------------------------------------------- errors name the file, also through workers


def test_worker_errors_name_the_file(tmp_path: Path) -> None:
    bad = {kind: plant(tmp_path, "training", kind) for kind in BAD_KINDS}  # sorted stems: BAD_KINDS order
    loader = DataLoader(SegmentationFolder(tmp_path, "training", num_classes=4), num_workers=1)
    iterator = iter(loader)
    for kind in sorted(BAD_KINDS):  # a worker error is re-raised in the main process, then loading goes on
        with pytest.raises(ValueError) as error:
            next(iterator)
        message = str(error.value).splitlines()
        assert message[0] == "Caught ValueError in DataLoader worker process 0."
        assert str(bad[kind]) in message[-1] and re.search(BAD_MESSAGES[kind], message[-1])  # the last line says it


def test_training_with_workers_stops_with_the_file_name(tmp_path: Path) -> None:
    good_set(tmp_path, train=3)  # + 1 bad: two full batches, none dropped
    bad = plant(tmp_path, "training", "truncated")
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"(?s)DataLoader worker.*cannot decode image " + re.escape(str(bad))):
        trainer.fit(PixelClassifier(), datamodule=make_dm(tmp_path, num_workers=1))


# ---------------------------------------------------------------- skip_bad_samples


def test_skip_keeps_training_batches_full_and_counts(tmp_path: Path) -> None:
    good_set(tmp_path, train=4, val=3)
    bad_train = [plant(tmp_path, "training", kind) for kind in ("truncated", "value_200")]
    bad_val = plant(tmp_path, "validation", "wrong_size")
    model = PixelClassifier()
    trainer = quiet_trainer(max_epochs=2, logger=CSVLogger(tmp_path / "logs", name="skip"), log_every_n_steps=1)
    dm = make_dm(tmp_path, skip_bad_samples=True, num_workers=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    messages = [str(w.message) for w in record if "skipping a bad sample" in str(w.message)]
    assert len(messages) == 3  # one warning per bad file, not one per epoch
    for bad in [*bad_train, bad_val]:
        assert sum(str(bad) in m for m in messages) == 1
    assert model.batch_sizes == [2, 2, 2] * 2  # 6 samples, batch 2: every batch full although 2 files are bad
    assert model.val_names == ["val_0", "val_1", "val_2"] * 2  # the bad image is left out, none repeated
    assert [len(v) for v in dm.skipped_samples.values()] == [2, 1, 0, 0]  # train, val, test, predict
    assert any(str(bad_val) in m for m in dm.skipped_samples["val"])
    rows = list(csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))))
    logged_train = [float(r["data/skipped/train"]) for r in rows if r.get("data/skipped/train")]
    assert logged_train in ([1.0, 2.0], [2.0])  # logged when the count grows (both may sit in one batch)
    assert [float(r["data/skipped/val"]) for r in rows if r.get("data/skipped/val")] == [1.0]
    assert any("bad samples skipped so far (distinct files, this process): train 2, val 1" in str(w.message)
               for w in record)


def test_skipping_loader_survives_lightning_ddp_reinstantiation(tmp_path: Path) -> None:
    good_set(tmp_path)
    dm = make_dm(tmp_path, skip_bad_samples=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=1, shuffle=True)
    rebuilt = _update_dataloader(loader, sampler)  # what Lightning does to a train loader under DDP
    assert isinstance(rebuilt, SkippingDataLoader) and rebuilt.ledger is loader.ledger
    assert rebuilt.sampler is sampler and rebuilt.collate_fn is loader.collate_fn and rebuilt.batch_size == 2


def test_skipped_labels_are_never_clipped_into_a_class(tmp_path: Path) -> None:
    write_pair(tmp_path, "training", "good", stripes(values=(1, 2)))  # classes 0 and 1 only
    write_pair(tmp_path, "validation", "val", stripes(values=(1, 2)))
    write_pair(tmp_path, "training", "bad", stripes(values=(3, 200)))  # would clip into class 3
    dm = make_dm(tmp_path, skip_bad_samples=True, batch_size=1, crop_size=48, train_scale=(96, 48))
    dm.setup("fit")
    with pytest.warns(UserWarning, match="bad.png holds values \\[200\\]"):
        masks = [batch["mask"] for _ in range(3) for batch in dm.train_dataloader()]
    assert set(torch.cat([m.flatten() for m in masks]).unique().tolist()) <= {0, 1, 255}


def test_skip_refuses_a_wholly_bad_data_set(tmp_path: Path) -> None:
    good_set(tmp_path, train=3, val=2)
    dm = make_dm(tmp_path, skip_bad_samples=True, num_classes=2)  # raw labels 3, 4 are out of range everywhere
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"3 samples in a row .* are likely wrong\. First problem: .*good_\d\.png"):
        next(iter(dm.train_dataloader()))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"val: all 2 samples of the pass were bad"):
        list(dm.val_dataloader())


# ---------------------------------------------------------------- prediction inputs of every kind


def test_prediction_inputs_of_every_kind(tmp_path: Path) -> None:
    colour = np.zeros((15, 20, 3), np.uint8) + np.array([200, 100, 50], np.uint8)
    Image.fromarray(colour).save(tmp_path / "tiny.jpg")  # 20x15: smaller than any crop
    Image.fromarray(colour).convert("CMYK").save(tmp_path / "cmyk.jpg")
    palette = Image.fromarray(np.arange(4, dtype=np.uint8).repeat(5)[None].repeat(15, 0), mode="L").convert("P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756)
    palette.save(tmp_path / "palette.png")
    palette.save(tmp_path / "palette_alpha.png", transparency=3)
    cv2.imwrite(str(tmp_path / "rgb16.png"), (colour.astype(np.uint16) * 257)[:, :, ::-1])  # 48-bit PNG, BGR
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.4")
    with pytest.warns(UserWarning, match="skipping .*report.pdf: not an image file"):
        folder = ImageFolder(tmp_path, transform=eval_transform((2048, 512)))
    samples = {folder[i]["path"]: folder[i] for i in range(len(folder))}
    assert sorted(samples) == ["cmyk.jpg", "palette.png", "palette_alpha.png", "rgb16.png", "tiny.jpg"]
    for sample in samples.values():  # 20x15 fits (2048, 512) with factor 512 / 15: 683x512
        assert sample["image"].shape == (3, 512, 683) and sample["orig_size"].tolist() == [15, 20]
        assert torch.isfinite(sample["image"]).all()
    assert np.abs(read_rgb(tmp_path / "cmyk.jpg")[7, 10].astype(int) - [200, 100, 50]).max() <= 8
    assert read_rgb(tmp_path / "rgb16.png")[0, 0].tolist() == [200, 100, 50]
    assert read_rgb(tmp_path / "palette_alpha.png")[0, ::5].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255],
                                                                        [9, 9, 9]]


def test_very_large_image_runs_through_the_eval_transform(tmp_path: Path) -> None:
    ramp = np.linspace(0, 255, 5000, dtype=np.float32).astype(np.uint8)
    Image.fromarray(np.stack([ramp[None].repeat(3000, 0)] * 3, axis=2)).save(tmp_path / "huge.jpg", quality=80)
    folder = ImageFolder(tmp_path, transform=eval_transform((2048, 512)))
    tracemalloc.start()
    sample = folder[0]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sample["image"].shape == (3, 512, 853) and sample["orig_size"].tolist() == [3000, 5000]
    assert peak < 120 * 2**20  # 5000x3000 RGB is 45 MB decoded: at most two copies, nothing at full size in float


def test_truncated_prediction_image_is_named_or_skipped(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "ok.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    for skip in (False, True):  # prediction skips unreadable photos whatever skip_bad_samples says
        dm = make_dm(tmp_path / "unused", predict_root=str(tmp_path), skip_bad_samples=skip)
        dm.setup("predict")
        with pytest.warns(UserWarning, match="predict: skipping a bad sample: cannot decode image .*cut.jpg"):
            batches = list(dm.predict_dataloader())
        assert [b["path"] for b in batches] == [["ok.png"]]
        assert len(dm.skipped_samples["predict"]) == 1


def test_decompression_bomb_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1200 pixels > 2 x the limit: PIL refuses
    with pytest.raises(ValueError, match=r"big.png: .*decompression bomb.*MAX_IMAGE_PIXELS"):
        read_rgb(tmp_path / "big.png")


# ---------------------------------------------------------------- NonFiniteGuard


class Toy(pl.LightningModule):
    """Linear regression whose loss is NaN at chosen batches; records the weight after every batch."""

    def __init__(self, nan_at: set[int] = frozenset(), poison_buffer_at: int | None = None) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.register_buffer("running", torch.zeros(1))  # stands for BatchNorm statistics
        self.nan_at = nan_at
        self.poison_buffer_at = poison_buffer_at
        self.history: list[torch.Tensor] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        return loss * math.nan if batch_idx in self.nan_at else loss

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self.history.append(self.layer.weight.detach().clone())
        if batch_idx == self.poison_buffer_at:
            self.running.fill_(math.nan)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.1, weight_decay=0.5)  # decay would move even zero grads


def toy_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=1)


def checkpointing(tmp_path: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)


def test_guard_stops_naming_step_and_last_checkpoint(tmp_path: Path) -> None:
    model = Toy(nan_at={3})
    trainer = quiet_trainer(max_steps=6, callbacks=[NonFiniteGuard(), checkpointing(tmp_path)],
                            enable_checkpointing=True)
    last = tmp_path / "ckpt" / "last.ckpt"
    message = rf"non-finite training loss nan at global step 3 .*{re.escape(str(last))}"
    with pytest.raises(NonFiniteError, match=message):
        trainer.fit(model, toy_loader())
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 3
    assert torch.equal(saved["state_dict"]["layer.weight"], model.layer.weight.detach())  # nothing after the NaN


def test_guard_skips_steps_without_touching_weights(tmp_path: Path) -> None:
    model = Toy(nan_at={2, 3})
    guard = NonFiniteGuard(action="skip")
    trainer = quiet_trainer(max_steps=6, callbacks=[guard], logger=CSVLogger(tmp_path, name="toy"),
                            log_every_n_steps=1)
    with pytest.warns(UserWarning, match="non-finite training loss at global step 3: optimizer step skipped"):
        trainer.fit(model, toy_loader())
    weights = model.history
    assert torch.equal(weights[2], weights[1]) and torch.equal(weights[3], weights[1])  # no update, no decay
    assert not torch.equal(weights[4], weights[3]) and torch.isfinite(model.layer.weight).all()
    assert trainer.global_step == 6 and guard.skipped_steps == 2
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert [float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")] == [0, 0, 1, 2, 2, 2]


def test_guard_stops_after_too_many_skips() -> None:
    trainer = quiet_trainer(max_steps=8, callbacks=[NonFiniteGuard(action="skip", max_consecutive_skips=2)])
    with pytest.warns(UserWarning), pytest.raises(NonFiniteError, match="3 optimizer steps in a row .* step 3"):
        trainer.fit(Toy(nan_at={1, 2, 3, 4}), toy_loader())


def test_guard_never_overwrites_a_good_checkpoint_with_nan_weights(tmp_path: Path) -> None:
    trainer = quiet_trainer(max_steps=6, callbacks=[NonFiniteGuard(), checkpointing(tmp_path)],
                            enable_checkpointing=True)
    last = tmp_path / "ckpt" / "last.ckpt"
    message = rf"non-finite weights \(running\) at global step 4 .*{re.escape(str(last))}"
    with pytest.raises(NonFiniteError, match=message):
        trainer.fit(Toy(poison_buffer_at=2), toy_loader())  # the loss stays finite: only the save can notice
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 3 and saved["state_dict"]["running"].item() == 0.0
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt"]


def test_guard_from_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "guard.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: seg.train.callbacks.non_finite.NonFiniteGuard\n"
                      "      init_args: {action: skip}\n")
    cli = cli_main(["--config", str(config), "--data.root=x", "--model.model.class_path=seg.model.Segmentor",
                    "--model.model.init_args.encoder=test_flatten_pvt", "--trainer.logger=false"], run=False)
    (guard,) = [c for c in cli.trainer.callbacks if isinstance(c, NonFiniteGuard)]
    assert guard.action == "skip"
    config.write_text(config.read_text().replace("skip", "skipp"))
    with pytest.raises(SystemExit):
        cli_main(["--config", str(config), "--data.root=x", "--print_config"], run=False)
    assert "Expected a typing.Literal['stop', 'skip']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'stop' or 'skip'"):
        NonFiniteGuard(action="ignore")  # type: ignore[arg-type]


# ---------------------------------------------------------------- untrusted files


class Payload:
    """Pickles to a call that creates a file when unpickled: what a malicious checkpoint would do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.target,))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return good_set(tmp_path_factory.mktemp("data") / "tiny", train=2, val=1)


def cli_args(root: Path) -> list[str]:
    return [
        "--config", str(Path(__file__).parents[1] / "configs" / "flatten_pvt_tiny_fpn_ade20k_80k.yaml"),
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
        "--trainer.sync_batchnorm=false", "--trainer.logger=false",
        "--model.model.init_args.encoder=test_flatten_pvt", "--model.model.init_args.encoder_checkpoint=null",
        f"--data.root={root}", spec_arg(small_spec(4, (64, 32))), "--data.num_workers=0",
    ]


def test_encoder_checkpoint_with_pickled_code_is_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"patch_embed1.proj.weight": Payload(tmp_path / "pwned")}}, evil)
    with pytest.raises(Exception, match="weights_only|Weights only load failed|Unsupported global"):
        Segmentor("test_flatten_pvt", "semantic_fpn", num_classes=4, encoder_checkpoint=str(evil))
    assert not (tmp_path / "pwned").exists()


def test_cli_checkpoint_with_pickled_code_is_refused(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    checkpoint = {"state_dict": {}, "pytorch-lightning_version": pl.__version__, "extra": Payload(tmp_path / "pwned")}
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="Weights only load failed"):
        cli_main(["validate", *cli_args(tiny_root), f"--ckpt_path={tmp_path / 'evil.ckpt'}"])
    assert not (tmp_path / "pwned").exists()

    # A checkpoint that is not a local file (fsspec URL) skips the CLI's own safe pre-read; torch's
    # "unsafe load" switch then decides, unless weights_only is set explicitly.
    with fsspec.open("memory://evil.ckpt", "wb") as f:
        torch.save(checkpoint, f)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    try:
        with pytest.raises(Exception, match="Weights only load failed"):
            cli_main(["validate", *cli_args(tiny_root), "--ckpt_path=memory://evil.ckpt", "--weights_only=true"])
    finally:
        fsspec.filesystem("memory").rm("/evil.ckpt")
    assert not (tmp_path / "pwned").exists()


def test_config_files_are_parsed_safely(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "evil.yaml"
    config.write_text(f"data:\n  root: !!python/object/apply:os.system ['touch {tmp_path / 'pwned'}']\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 2
    assert "could not determine a constructor for the tag" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_unknown_keys_fail_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--data.root=x", "--data.crop_sise", "5", "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --data.crop_sise 5" in err and "--data.crop_size" in err  # usage lists options
    config = tmp_path / "typo.yaml"
    config.write_text("data:\n  root: x\n  crop_sise: 5\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 2
    assert "Group 'data' does not accept option 'crop_sise'" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["typo.yaml"]  # nothing written


def test_trainer_defaults_load_checkpoints_as_tensors_only(tiny_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with fsspec.open("memory://evil_default.ckpt", "wb") as f:
        torch.save({"state_dict": {}, "pytorch-lightning_version": pl.__version__,
                    "extra": Payload(tmp_path / "pwned")}, f)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    try:
        with pytest.raises(Exception, match="Weights only load failed"):
            cli_main(["validate", *cli_args(tiny_root), "--ckpt_path=memory://evil_default.ckpt"])
    finally:
        fsspec.filesystem("memory").rm("/evil_default.ckpt")
    assert not (tmp_path / "pwned").exists()


def test_unknown_keys_list_the_valid_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text("data:\n  root: x\n  crop_sise: 5\n")
    for args in (["--config", str(config)], ["--data.root=x", "--data.crop_sise", "5"]):
        with pytest.raises(SystemExit):
            cli_main(["fit", *args, "--print_config"])
        err = capsys.readouterr().err
        assert "valid options for 'data': batch_size, crop_size, demo," in err
        assert "did you mean 'crop_size'?" in err
