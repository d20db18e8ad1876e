"""Scaling out: trainer configs compose with the experiments, effective batch and learning-rate scaling,
the SyncBatchNorm guard, and mixed precision on CPU."""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from _specs import DEMO_SMALL, spec_arg
from pytorch_lightning.callbacks import Callback

from seg.data import DEMO_CLASS_NAMES, SegmentationDataModule, make_demo_dataset
from seg.model.backbones.pvt import Block
from seg.model.backbones.soft import SoftBlock
from seg.model.backbones.swin import SwinBlock
from seg.model.segmentor import Segmentor
from seg.train.callbacks.effective_batch import EffectiveBatch, lr_factor
from seg.train.callbacks.sync_batchnorm import SyncBatchNormCheck
from seg.train.cli import SegmentationCLI, cli_main
from seg.train.schedules import WarmupPolyLR
from seg.train.task import SegmentationTask

REPO = Path(__file__).parents[1]
EXPERIMENT = REPO / "configs" / "flatten_pvt_tiny_fpn_ade20k_80k.yaml"
TRAINER_CONFIGS = REPO / "configs" / "trainer"
NUM_CLASSES = len(DEMO_CLASS_NAMES)
LR = 1e-3


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "demo", num_train=4, num_val=2, min_size=64, max_size=96)


def make_task(lr: float = LR) -> SegmentationTask:
    model = Segmentor("test_flatten_pvt", decoder="semantic_fpn", num_classes=NUM_CLASSES, aux_head=False,
                      decoder_channels=32)
    return SegmentationTask(model, optimizer=functools.partial(torch.optim.AdamW, lr=lr),
                            scheduler=functools.partial(WarmupPolyLR, power=0.9, max_steps=100))


def make_data(root: Path, **kwargs) -> SegmentationDataModule:
    args = dict(root=str(root), crop_size=64, batch_size=2, num_workers=0, spec=DEMO_SMALL,
                train_scale=(128, 64))
    return SegmentationDataModule(**(args | kwargs))


def make_trainer(**kwargs) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0)
    return pl.Trainer(**(args | kwargs))


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


# ------------------------------------------------------------------------------------------------ trainer configs


def printed_config(*configs: Path) -> None:
    """Print the fully resolved fit config of the experiment composed with ``configs``."""
    args = ["fit", "--config", str(EXPERIMENT)]
    for config in configs:
        args += ["--config", str(config)]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*args, "--print_config"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize(
    ("name", "devices", "nodes", "strategy", "sync_bn", "accumulation", "batch"),
    [
        ("cpu", 1, 1, "auto", False, 1, 2),
        ("gpu1", 1, 1, "auto", False, 8, 16),
        ("gpu8_ddp", 8, 1, "ddp", True, 1, 16),
        ("multinode", 8, 2, "ddp", True, 1, 32),
        ("fsdp", 8, 1, "pytorch_lightning.strategies.FSDPStrategy", True, 1, 16),
    ],
)
def test_trainer_config_composes(name: str, devices: int, nodes: int, strategy: str, sync_bn: bool,
                                 accumulation: int, batch: int, capsys: pytest.CaptureFixture) -> None:
    path = TRAINER_CONFIGS / f"{name}.yaml"
    assert set(yaml.safe_load(path.read_text())) == {"trainer"}  # composes with any experiment
    printed_config(path)
    config = yaml.safe_load(capsys.readouterr().out)
    trainer = config["trainer"]
    assert trainer["devices"] == devices and trainer["num_nodes"] == nodes
    got_strategy = trainer["strategy"] if isinstance(trainer["strategy"], str) else trainer["strategy"]["class_path"]
    assert got_strategy == strategy
    assert trainer["sync_batchnorm"] is sync_bn
    assert trainer["accumulate_grad_batches"] == accumulation
    assert devices * nodes * config["data"]["batch_size"] * accumulation == batch
    assert config["trainer"]["max_steps"] == 80000  # the experiment's own settings survive


@pytest.mark.parametrize(("name", "precision"), [("fp16", "16-mixed"), ("bf16", "bf16-mixed")])
def test_precision_configs(name: str, precision: str, capsys: pytest.CaptureFixture) -> None:
    printed_config(TRAINER_CONFIGS / "gpu8_ddp.yaml", TRAINER_CONFIGS / f"{name}.yaml")
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["precision"] == precision
    assert trainer["devices"] == 8 and trainer["strategy"] == "ddp"  # switches stack on a hardware config


def test_fsdp_auto_wrap_policy_resolves_to_encoder_blocks() -> None:
    class ParseOnly(SegmentationCLI):
        def instantiate_classes(self) -> None:  # FSDP needs GPUs: parse, do not build the trainer
            pass

    cli = ParseOnly(SegmentationTask, SegmentationDataModule, run=False,
                    args=["--config", str(EXPERIMENT), "--config", str(TRAINER_CONFIGS / "fsdp.yaml")])
    init_args = cli.config.trainer.strategy.init_args
    assert set(init_args.auto_wrap_policy) == {Block, SwinBlock, SoftBlock}
    assert cli.config.trainer.strategy.dict_kwargs == {"use_orig_params": True}  # per-parameter weight decay
    from pytorch_lightning.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    strategy = FSDPStrategy(auto_wrap_policy=init_args.auto_wrap_policy, sharding_strategy=init_args.sharding_strategy,
                            state_dict_type=init_args.state_dict_type)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], ModuleWrapPolicy)


def test_cpu_config_runs_with_effective_batch(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    cli = cli_main([
        "fit", "--config", str(EXPERIMENT), "--config", str(TRAINER_CONFIGS / "cpu.yaml"),
        "--model.model.init_args.encoder=test_flatten_pvt", "--model.model.init_args.encoder_checkpoint=null",
        f"--data.root={demo_root}", spec_arg(DEMO_SMALL), "--data.crop_size=64",
        "--data.num_workers=0", "--data.train_scale=[128, 64]",
        "--trainer.callbacks+=seg.train.callbacks.effective_batch.EffectiveBatch", "--trainer.callbacks.expected=16",
        "--trainer.fast_dev_run=true",
    ])
    callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, EffectiveBatch))
    assert callback.effective_batch == 2
    assert "1 devices x 1 nodes x 2 per-device batch x 1 accumulation = 2" in caplog.text
    # the experiment's AdamW lr 1e-4 was tuned for batch 16: linear rule gives 1e-4 * 2 / 16 (one parameter
    # group: the PVT recipe decays every parameter)
    assert [new for _, new in callback.lr_changes] == pytest.approx([1.25e-5])


# ---------------------------------------------------------------------------------------------- effective batch


def test_lr_factor_rules() -> None:
    assert lr_factor(32, 16, "linear") == 2.0
    assert lr_factor(4, 16, "sqrt") == 0.5
    assert lr_factor(64, 16, "none") == 1.0
    with pytest.raises(ValueError, match="valid options: linear, sqrt, none"):
        lr_factor(8, 16, "cubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be >= 1"):
        lr_factor(0, 16, "linear")
    with pytest.raises(ValueError, match="unknown lr_rule 'square'"):
        EffectiveBatch(16, "square")  # type: ignore[arg-type]


@pytest.mark.parametrize(("rule", "factor"), [("linear", 0.25), ("sqrt", 0.5)])
def test_effective_batch_rescales_optimizer_and_scheduler(demo_root: Path, rule: str, factor: float,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    task, callback = make_task(), EffectiveBatch(expected=16, lr_rule=rule)
    trainer = make_trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[callback])
    trainer.fit(task, datamodule=make_data(demo_root))
    assert callback.effective_batch == 4  # 1 device x 1 node x 2 images x 2 accumulation
    assert "1 devices x 1 nodes x 2 per-device batch x 2 accumulation = 4" in caplog.text
    assert callback.lr_changes == [(pytest.approx(LR), pytest.approx(LR * factor))] * 2  # both param groups
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == pytest.approx([LR * factor] * 2)
    # one step later the schedule continues from the scaled base rate: poly(1 / 100) ** 0.9
    expected = LR * factor * (1 - 1 / 100) ** 0.9
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == pytest.approx([expected] * 2)


def test_effective_batch_none_rule_only_warns(demo_root: Path) -> None:
    task, callback = make_task(), EffectiveBatch(expected=16, lr_rule="none")
    trainer = make_trainer(max_steps=1, callbacks=[callback])
    with pytest.warns(UserWarning, match="effective batch 2 differs from the stated batch 16"):
        trainer.fit(task, datamodule=make_data(demo_root))
    assert callback.lr_changes == []
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([LR, LR])


def test_effective_batch_resume_keeps_or_rescales_checkpoint_rates(demo_root: Path, tmp_path: Path) -> None:
    trainer = make_trainer(max_steps=1, callbacks=[EffectiveBatch(expected=16)])
    trainer.fit(make_task(), datamodule=make_data(demo_root))
    checkpoint = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)  # resumable as every run loads: tensors only
    assert saved["lr_schedulers"][0]["base_lrs"] == pytest.approx([LR / 8] * 2)  # batch 2 of 16
    assert saved["effective_batch"] == {"lr_batch": 2, "effective_batch": 2}

    same = EffectiveBatch(expected=16)
    resumed = make_trainer(max_steps=2, callbacks=[same])
    resumed.fit(make_task(), datamodule=make_data(demo_root), ckpt_path=checkpoint, weights_only=True)
    assert same.lr_changes == []  # the checkpoint's rates already match batch 2: not divided by 8 again
    assert resumed.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([LR / 8] * 2)

    doubled = EffectiveBatch(expected=16)
    resumed = make_trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[doubled])
    resumed.fit(make_task(), datamodule=make_data(demo_root), ckpt_path=checkpoint, weights_only=True)
    assert doubled.effective_batch == 4
    assert resumed.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([LR / 4] * 2)  # from 2 to 4


def test_effective_batch_configured_twice_acts_once(demo_root: Path) -> None:
    first, second = EffectiveBatch(expected=16), EffectiveBatch(expected=16)
    trainer = make_trainer(max_steps=1, callbacks=[first, second])
    trainer.fit(make_task(), datamodule=make_data(demo_root))
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([LR / 8] * 2)  # not LR / 64
    assert len(first.lr_changes) == 2 and second.lr_changes == []
    clash = make_trainer(max_steps=1, callbacks=[EffectiveBatch(expected=16), EffectiveBatch(expected=8)])
    with pytest.raises(ValueError, match=r"2 EffectiveBatch callbacks with different settings"):
        clash.fit(make_task(), datamodule=make_data(demo_root))


# ------------------------------------------------------------------------------------------------ SyncBatchNorm


def test_sync_batchnorm_check_explains_cpu_ddp() -> None:
    module = make_task()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", sync_batchnorm=True, logger=False)
    with pytest.raises(ValueError, match="sync_batchnorm=true needs CUDA devices.*2 CPU processes.*cpu.yaml"):
        SyncBatchNormCheck().setup(trainer, module, "fit")
    SyncBatchNormCheck().setup(trainer, module, "validate")  # eval-mode SyncBatchNorm needs no sync: allowed
    plain = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", sync_batchnorm=False, logger=False)
    SyncBatchNormCheck().setup(plain, module, "fit")
    single = pl.Trainer(accelerator="cpu", devices=1, sync_batchnorm=True, logger=False)
    SyncBatchNormCheck().setup(single, module, "fit")  # Lightning ignores the flag on one device


# ---------------------------------------------------------------------------------------------- mixed precision


def test_bf16_mixed_trains_on_cpu_close_to_fp32(demo_root: Path) -> None:
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        pl.seed_everything(0)
        task, recorder = make_task(), LossRecorder()
        trainer = make_trainer(max_steps=3, precision=precision, callbacks=[recorder])
        trainer.fit(task, datamodule=make_data(demo_root))
        runs[precision] = (task, trainer, recorder.losses)
    task, trainer, losses = runs["bf16-mixed"]
    assert trainer.precision == "bf16-mixed"
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert losses[0] == pytest.approx(runs["32-true"][2][0], abs=0.02)  # same weights and batch at step 1
    assert all(p.dtype == torch.float32 for p in task.parameters())  # master weights stay fp32

    dm = make_data(demo_root)
    dm.setup("fit")
    images = next(iter(dm.train_dataloader()))["image"]
    task.eval()
    with torch.no_grad():
        reference = task.model(images)["out"]
        with trainer.precision_plugin.forward_context():
            mixed = task.model(images)["out"]
    assert mixed.dtype == torch.bfloat16  # autocast really ran in bf16
    error = (mixed.float() - reference).abs().max() / reference.abs().max()
    assert error < 0.05  # bf16 keeps 8 mantissa bits: a few % of the logit range
    agreement = (mixed.argmax(1) == reference.argmax(1)).float().mean()
    assert agreement > 0.9


def test_fp16_mixed_falls_back_to_bf16_on_cpu() -> None:
    with pytest.warns(UserWarning, match="bf16-mixed"):
        trainer = pl.Trainer(accelerator="cpu", devices=1, precision="16-mixed", logger=False)
    assert trainer.precision == "bf16-mixed"
