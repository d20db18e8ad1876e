"""Cityscapes end to end through the CLI: the Cityscapes configs parse as the project's recipes, ``validate`` on a
prepared folder reports the 19 classes, predictions carry the Cityscapes trainIds and colours."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from _cityscapes import stems, write_archives
from _specs import spec_arg
from PIL import Image

from seg.data.prepare import main as prepare_main
from seg.data.spec import CITYSCAPES
from seg.train.cli import SegmentationCLI, cli_main
from seg.train.schedules import WarmupPolyLR

CONFIGS = Path(__file__).parents[1] / "configs"
CITYSCAPES_CONFIGS = sorted(CONFIGS.glob("*_cityscapes_*.yaml"))
PVT_CONFIG = CONFIGS / "flatten_pvt_tiny_fpn_cityscapes_80k.yaml"
TINY = dataclasses.replace(CITYSCAPES, test_scale=(64, 32))  # the tiny frames at their own size
HW = (32, 64)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Cityscapes folder prepared from archives laid out as the official downloads."""
    folder = tmp_path_factory.mktemp("cityscapes")
    images, labels = write_archives(folder / "downloads", HW)
    assert prepare_main([str(images), str(labels), "--out", str(folder), "--skip-count-check", "--workers", "1"]) == 0
    return folder / "cityscapes"


def test_every_cityscapes_config_is_a_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """mmseg's Cityscapes schedule (512x1024 crops, 80k iterations, batch 8) with each family's optimizer, the
    Cityscapes spec and layout, whole-image evaluation."""
    assert {p.stem for p in CITYSCAPES_CONFIGS} == {
        "flatten_pvt_tiny_fpn_cityscapes_80k", "pvt_tiny_fpn_cityscapes_80k",
        "flatten_swin_tiny_upernet_cityscapes_80k", "swin_tiny_upernet_cityscapes_80k"}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(SegmentationCLI, "instantiate_classes", lambda self: None)
    for config in CITYSCAPES_CONFIGS:
        cfg = cli_main(["--config", str(config)], run=False).config
        trainer, data, model = cfg.trainer, cfg.data, cfg.model.model.init_args
        assert trainer.devices * trainer.num_nodes * data.batch_size * trainer.accumulate_grad_batches == 8
        assert cfg.effective_batch.expected == 8 and trainer.max_steps == 80_000
        assert tuple(data.crop_size) == (512, 1024) and tuple(data.train_scale) == (2048, 1024)
        assert data.spec == "cityscapes" and data.root == "data/cityscapes"
        assert cfg.model.inference is None or cfg.model.inference.mode == "whole"
        softmax = not config.name.startswith("flatten_")
        assert (model.encoder_kwargs.get("attn_type") == "SSSS") == softmax
        upernet = "upernet" in config.name
        assert model.decoder == ("upernet" if upernet else "semantic_fpn") and model.aux_head == upernet
        assert model.encoder == ("flatten_swin_tiny" if upernet else "flatten_pvt_tiny")
        scheduler = cfg.model.scheduler
        assert scheduler.class_path == f"{WarmupPolyLR.__module__}.WarmupPolyLR"
        assert scheduler.init_args.warmup_steps == (1500 if upernet else 0)
        assert cfg.model.optimizer.init_args.lr == (6e-5 if upernet else 1e-4)


def test_validate_reports_the_19_classes(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's command on a prepared folder, with the tiny encoder and the frames at their own size."""
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["validate", "--config", str(PVT_CONFIG), "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
                    "--data.root", str(prepared), "--model.model.init_args.encoder_checkpoint", "null",
                    "--model.model.init_args.encoder=test_flatten_pvt", spec_arg(TINY), "--data.num_workers=0",
                    "--trainer.logger=false"])
    assert "val results (19 classes" in capsys.readouterr().out
    assert cli.datamodule.layout.name == "cityscapes" and len(cli.datamodule.val_set) == 2
    assert cli.model.last_scores["val"]["IoU"].shape == (19,)
    table = next(Path().rglob("per_class.csv")).read_text()
    assert all(name in table for name in CITYSCAPES.class_names)


def test_predictions_carry_trainids_and_colours(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    frames = prepared / "leftImg8bit" / "val"
    cli = cli_main(["predict", "--config", str(PVT_CONFIG), "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
                    "--config", str(CONFIGS / "predict.yaml"), "--data.root", str(prepared),
                    "--model.model.init_args.encoder_checkpoint", "null",
                    "--model.model.init_args.encoder=test_flatten_pvt", spec_arg(TINY), "--data.num_workers=0",
                    f"--data.predict_root={frames}", "--trainer.logger=false"])
    city, stem = stems("val")[0]
    labels = np.asarray(Image.open(Path("predictions") / city / f"{stem}_leftImg8bit.png"))
    assert labels.shape == HW and labels.max() < 19  # trainIds, no offset
    overlay = np.asarray(Image.open(Path("predictions") / city / f"{stem}_leftImg8bit_overlay.jpg"))
    assert overlay.shape[0] > HW[0]  # the legend band below the frame
    assert cli.model.spec.palette == CITYSCAPES.palette
    config = json.dumps(cli.model.spec.to_dict())
    assert '"name": "cityscapes"' in config and '"traffic light"' in config


@pytest.mark.slow
def test_the_issue_command_runs_on_a_prepared_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Exactly the command of the issue (FLatten-PVT-T, whole 1024x2048 frames) on two tiny validation frames."""
    images, labels = write_archives(tmp_path / "downloads", (64, 128))
    assert prepare_main([str(images), str(labels), "--out", str(tmp_path / "data"), "--skip-count-check"]) == 0
    monkeypatch.chdir(tmp_path)
    cli_main(["validate", "--config", str(PVT_CONFIG), "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
              "--data.root", "data/cityscapes", "--model.model.init_args.encoder_checkpoint", "null",
              "--data.num_workers=0"])
    assert "val results (19 classes" in capsys.readouterr().out
