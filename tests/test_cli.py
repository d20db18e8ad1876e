"""The CLI end to end: every paper-setting config parses and trains a step on a tiny ADE20K-layout folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from _specs import DEMO_SMALL, spec_arg

from seg.data import make_demo_dataset
from seg.train.cli import cli_main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*_ade20k_*.yaml"))  # the paper settings


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "tiny"
    return make_demo_dataset(root, num_train=4, num_val=2, min_size=64, max_size=96)


def tiny_overrides(config: Path, root: Path) -> list[str]:
    """Shrink a paper setting to CPU size, keeping its decoder, schedule, optimizer and pipeline."""
    if config.name.startswith("soft_"):
        encoder = "test_soft"
    elif config.name.startswith(("agent_", "mlla_", "ravlt_", "mala_")):  # the family's own tiny variant
        family = config.name.split("_")[0]
        encoder = {"agent": "test_agent_swin" if "swin" in config.name else "test_agent_pvt",
                   "mlla": "test_mlla", "ravlt": "test_ravlt", "mala": "test_mala"}[family]
    elif "swin" in config.name:
        encoder = "test_flatten_swin"
    else:
        encoder = "test_flatten_pvt"  # also the PVT skeleton with SOFT stages (attn_type from the config)
    return [
        "--config", str(config),
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
        "--trainer.sync_batchnorm=false",
        f"--model.model.init_args.encoder={encoder}", "--model.model.init_args.encoder_checkpoint=null",
        f"--data.root={root}", spec_arg(DEMO_SMALL), "--data.crop_size=64", "--data.batch_size=2",
        "--data.num_workers=0", "--data.train_scale=[128, 64]",
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_prints(config: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: seg.model.Segmentor" in printed
    assert "max_steps:" in printed


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_fast_dev_run(config: Path, tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", *tiny_overrides(config, tiny_root), "--trainer.fast_dev_run=true"])
    assert cli.trainer.global_step == 1
    assert cli.model.model.num_classes == 12  # linked from the data module's spec
    assert cli.model.class_names[0] == "h-stripes" and cli.model.spec == cli.datamodule.spec


def test_fit_then_validate_from_checkpoint(tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[1] / "configs" / "flatten_pvt_tiny_fpn_ade20k_80k.yaml"
    args = tiny_overrides(config, tiny_root)
    cli_main(["fit", *args, "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    checkpoints = sorted(Path("logs").rglob("*.ckpt"))
    assert {p.name for p in checkpoints} == {"best.ckpt", "last.ckpt"}
    best = next(p for p in checkpoints if p.name == "best.ckpt")
    cli = cli_main(["validate", *args, f"--ckpt_path={best}"])
    scores = cli.model.last_scores["val"]
    assert 0.0 <= float(scores["mIoU"]) <= 1.0
    assert scores["IoU"].shape == (12,)


def test_resume_from_last_continues_the_same_run(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[1] / "configs" / "flatten_pvt_tiny_fpn_ade20k_80k.yaml"
    args = tiny_overrides(config, tiny_root)
    cli_main(["fit", *args, "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    resumed = cli_main(["fit", *args, "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--ckpt_path=last"])
    assert resumed.trainer.ckpt_path.endswith("flatten_pvt_tiny_fpn_ade20k_80k/checkpoints/last.ckpt")
    assert resumed.trainer.global_step == 4
