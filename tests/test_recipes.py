"""Every paper-setting config against the published recipe, read through the CLI parser as training reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from seg.data.spec import as_spec
from seg.train.cli import SegmentationCLI, cli_main
from seg.train.schedules import WarmupPolyLR

CONFIGS = Path(__file__).parents[1] / "configs"

# Published values: the PVT Semantic FPN and Swin UperNet recipes on ADE20K (batch 16, crop 512; AdamW betas are
# torch's defaults (0.9, 0.999) where the recipe states none) and the papers' drop path rates (FLatten-PVT-T 0.1;
# FLatten-Swin-T 0.3 for segmentation; Swin-S 0.3). The no-decay rules are
# the recipes' mmseg optimizer configs: PVT's has no paramwise_cfg (everything decays); Swin's exempts norms and
# position tables (and FLatten adds positional_encoding and scale). SOFT publishes no segmentation schedule: it
# follows the UperNet recipe, with its ImageNet drop path 0.1.
SEMANTIC_FPN = dict(optimizer="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, warmup_steps=0,
                    power=0.9, max_steps=80_000, aux_weight=None, no_decay="decay_all")
UPERNET = dict(optimizer="AdamW", lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01, warmup_steps=1500,
               warmup_ratio=1e-6, power=1.0, max_steps=160_000, aux_weight=0.4, no_decay="norms_tables")
PUBLISHED: dict[str, dict[str, Any]] = {
    "flatten_pvt_tiny_fpn_ade20k_80k": {**SEMANTIC_FPN, "drop_path": 0.1},
    "pvt_tiny_fpn_ade20k_80k": {**SEMANTIC_FPN, "drop_path": 0.1},
    "flatten_pvt_tiny_soft_fpn_ade20k_80k": {**SEMANTIC_FPN, "drop_path": 0.1},
    "flatten_swin_tiny_upernet_ade20k_160k": {**UPERNET, "drop_path": 0.3},
    "swin_tiny_upernet_ade20k_160k": {**UPERNET, "drop_path": 0.3},
    "flatten_swin_small_upernet_ade20k_160k": {**UPERNET, "drop_path": 0.3},
    "swin_small_upernet_ade20k_160k": {**UPERNET, "drop_path": 0.3},
    "soft_small_norm_upernet_ade20k_160k": {**UPERNET, "drop_path": 0.1},
    # /work/shared/SPEC-family.md section 4: MLLA-B UperNet (Swin's recipe; decay exempts names with 'norm'), dp 0.5
    "mlla_base_upernet_ade20k_160k": {**UPERNET, "drop_path": 0.5},
}
# Agent attention, /work/shared/SPEC-family.md section 4: Agent-PVT's Semantic FPN runs 40k iterations at lr 2e-4
# (drop path .1/.1/.2/.1), Agent-Swin the UperNet recipe (drop path .3/.3/.5; its custom_keys also exempt the agent
# bias tables, which norms_tables covers); both with the configs' downstream agent grids.
AGENT_FPN = {**SEMANTIC_FPN, "lr": 2e-4, "max_steps": 40_000, "agent_shapes": [12, 16, 28, 28]}
PUBLISHED.update({
    "agent_pvt_tiny_fpn_ade20k_40k": {**AGENT_FPN, "drop_path": 0.1},
    "agent_pvt_small_fpn_ade20k_40k": {**AGENT_FPN, "drop_path": 0.1},
    "agent_pvt_medium_fpn_ade20k_40k": {**AGENT_FPN, "drop_path": 0.2},
    "agent_pvt_large_fpn_ade20k_40k": {**AGENT_FPN, "drop_path": 0.1},
    "agent_swin_tiny_upernet_ade20k_160k": {**UPERNET, "drop_path": 0.3, "agent_shapes": [9, 12, 14, 7]},
    "agent_swin_small_upernet_ade20k_160k": {**UPERNET, "drop_path": 0.3, "agent_shapes": [9, 12, 7, 7]},
    "agent_swin_base_upernet_ade20k_160k": {**UPERNET, "drop_path": 0.5, "agent_shapes": [9, 12, 14, 7]},
})

# RAVLT (qhfan/RALA segmentation/configs/RALA/RALA_{FPN_*_1x,Uper_*_2x}.py; /work/shared/SPEC-family.md section 4):
# Semantic FPN 80k with poly 0.9 down to min_lr 1e-6 (mmseg's schedule_80k.py) in float32; UperNet 160k as Swin's,
# no decay on 'norm' names, float16 (Fp16OptimizerHook). 2 images per GPU, GPU count unstated (8 assumed: batch 16).
# Drop path: the ImageNet rates, S 0.15, B 0.4, L 0.55.
# RAVLT-T: only the Semantic FPN checkpoint is published (no config): the small config with the tiny encoder.
for _size, _drop in (("tiny", 0.1), ("small", 0.15), ("base", 0.4), ("large", 0.55)):
    PUBLISHED[f"ravlt_{_size}_fpn_ade20k_80k"] = {**SEMANTIC_FPN, "drop_path": _drop, "min_lr": 1e-6,
                                                 "precision": "32-true"}
    if _size != "tiny":
        PUBLISHED[f"ravlt_{_size}_upernet_ade20k_160k"] = {**UPERNET, "drop_path": _drop, "precision": "16-mixed"}
# MALA (qhfan/MALA segmentation/configs/MALA/{FPN_*_1x,Uper_*_2x}.py; /work/shared/SPEC-family.md section 8): RAVLT's
# rows value for value, T and S configs both published. Published mIoU: not verified (no row in seg.model.published).
for _size, _drop in (("tiny", 0.1), ("small", 0.15)):
    PUBLISHED[f"mala_{_size}_fpn_ade20k_80k"] = {**SEMANTIC_FPN, "drop_path": _drop, "min_lr": 1e-6,
                                                "precision": "32-true"}
    PUBLISHED[f"mala_{_size}_upernet_ade20k_160k"] = {**UPERNET, "drop_path": _drop, "precision": "16-mixed"}
# the published Agent-PVT segmentation backbone: no output norms, flooring patch embeddings (SPEC-family part 12)
for _name in [n for n in PUBLISHED if n.startswith("agent_pvt_")]:
    PUBLISHED[_name]["encoder_extra"] = {"feature_norms": False, "patch_floor": True}
CROP, BATCH = 512, 16  # both recipes


def test_every_paper_config_has_a_row() -> None:
    assert {p.stem for p in CONFIGS.glob("*_ade20k_*.yaml")} == set(PUBLISHED)


def test_every_published_segmenter_names_its_config() -> None:
    """The published scores the converter and README quote belong to configs that exist, and every published
    segmentation config (Agent, MLLA, RAVLT) has its published score."""
    from seg.model.published import PUBLISHED as SCORES

    assert set(SCORES) <= set(PUBLISHED)
    assert {n for n in PUBLISHED if n.startswith(("agent_", "mlla_", "ravlt_"))} == set(SCORES)


def _parse(config: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> SegmentationCLI:
    """The config as the CLI parses it (defaults, trainer_defaults.yaml and links applied), not instantiated."""
    monkeypatch.setattr(SegmentationCLI, "instantiate_classes", lambda self: None)
    return cli_main(["--config", str(config), *overrides], run=False)


def _tiny_encoder(name: str) -> str:
    if name.startswith("mlla_"):
        return "test_mlla"
    if name.startswith("agent_"):
        return "test_agent_swin" if "swin" in name else "test_agent_pvt"
    if name.startswith("ravlt_"):
        return "test_ravlt"
    if name.startswith("mala_"):
        return "test_mala"
    return "test_soft" if name.startswith("soft_") else "test_flatten_swin" if "swin" in name else "test_flatten_pvt"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_matches_published_recipe(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    expected = PUBLISHED[name]
    monkeypatch.chdir(tmp_path)
    config = CONFIGS / f"{name}.yaml"
    cfg = _parse(config, monkeypatch).config
    # effective batch as the config states it: devices x nodes x per-device batch x accumulation
    trainer = cfg.trainer
    assert trainer.devices * trainer.num_nodes * cfg.data.batch_size * trainer.accumulate_grad_batches == BATCH
    assert cfg.effective_batch.expected == BATCH
    assert trainer.max_steps == expected["max_steps"]
    assert cfg.data.crop_size == CROP
    assert tuple(cfg.data.train_scale) == as_spec(cfg.data.spec).test_scale == (2048, 512)  # ADE20K's spec
    model = cfg.model.model.init_args
    assert model.encoder_kwargs["drop_path_rate"] == expected["drop_path"]
    assert list(model.encoder_kwargs.get("agent_shapes", [])) == expected.get("agent_shapes", [])
    for key, value in expected.get("encoder_extra", {}).items():
        assert model.encoder_kwargs[key] == value
    assert model.aux_head == (expected["aux_weight"] is not None)
    if expected["aux_weight"] is not None:
        assert cfg.model.aux_weight == expected["aux_weight"]
    assert cfg.model.no_decay == expected["no_decay"]
    assert cfg.model.inference is None or cfg.model.inference.mode == "whole"  # single-scale whole image
    if "precision" in expected:
        assert str(trainer.precision) == expected["precision"]

    # instantiated with a tiny encoder on CPU (the recipe values under test are unchanged by that)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["--config", str(config), "--trainer.accelerator=cpu", "--trainer.devices=1",
                    "--trainer.strategy=auto", "--trainer.sync_batchnorm=false",
                    f"--model.model.init_args.encoder={_tiny_encoder(name)}",
                    "--model.model.init_args.encoder_checkpoint=null"], run=False)
    task = cli.model
    optimizer = task.optimizer_factory(task.param_groups())
    assert type(optimizer).__name__ == expected["optimizer"]
    defaults = optimizer.defaults
    assert defaults["lr"] == pytest.approx(expected["lr"], rel=1e-12)
    assert tuple(defaults["betas"]) == expected["betas"]
    assert defaults["weight_decay"] == pytest.approx(expected["weight_decay"], rel=1e-12)
    assert [g.get("weight_decay") for g in optimizer.param_groups[1:]] == (
        [] if expected["no_decay"] == "decay_all" else [0.0])
    scheduler = task.scheduler_factory(optimizer)
    assert isinstance(scheduler, WarmupPolyLR)
    assert scheduler.max_steps in (None, expected["max_steps"])  # None: the trainer's max_steps
    assert scheduler.power == expected["power"] and scheduler.min_lr == expected.get("min_lr", 0.0)
    assert scheduler.warmup_steps == expected["warmup_steps"]
    if expected["warmup_steps"]:
        assert scheduler.warmup_ratio == expected["warmup_ratio"]
        scheduler.max_steps = expected["max_steps"]
        lr = expected["lr"]
        assert scheduler.factor(0, lr) == pytest.approx(lr * expected["warmup_ratio"])
        assert scheduler.factor(expected["warmup_steps"], lr) == pytest.approx(
            lr * (1 - expected["warmup_steps"] / expected["max_steps"]) ** expected["power"])
    assert task.aux_weight == (expected["aux_weight"] or task.aux_weight)
    assert isinstance(task.param_groups()[0]["params"][0], torch.nn.Parameter)


def test_a_drifting_config_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The table catches an edited value: a drop path override is seen through the parser."""
    monkeypatch.chdir(tmp_path)
    config = CONFIGS / "flatten_swin_tiny_upernet_ade20k_160k.yaml"
    cfg = _parse(config, monkeypatch, "--model.model.init_args.encoder_kwargs={drop_path_rate: 0.2}").config
    assert cfg.model.model.init_args.encoder_kwargs["drop_path_rate"] != PUBLISHED[config.stem]["drop_path"]
