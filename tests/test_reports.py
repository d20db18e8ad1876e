"""Evaluation reports: JSON and tables from known scores, readable charts, and the callback inside real runs."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from _specs import DEMO_SMALL, spec_arg
from PIL import Image
from pytorch_lightning.loggers import CSVLogger

from seg.data import ADE20K_CLASSES, DatasetSpec, SegmentationDataModule, make_demo_dataset
from seg.model.segmentor import Segmentor
from seg.train.callbacks.report import SegmentationReport
from seg.train.cli import cli_main
from seg.train.metrics import scores_from_confusion
from seg.train.reports import class_table, most_confused, summary_text, write_report
from seg.train.task import SegmentationTask

CONFIGS = Path(__file__).parents[1] / "configs"
REPORT_FILES = {"metrics.json", "per_class.md", "per_class.csv", "per_class_iou.png", "confusion.png"}
NAMES = ["sky", "road", "car", "boat"]

# rows = label, columns = prediction. IoU: sky 8/11, road 5/12, car 0 (predicted, never labelled), boat NaN.
CONFMAT = torch.tensor([[8, 2, 0, 0], [1, 5, 4, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


@pytest.fixture
def scores() -> dict[str, torch.Tensor]:
    return scores_from_confusion(CONFMAT)


def test_table_sorted_by_iou_with_nan_last(scores: dict[str, torch.Tensor]) -> None:
    table = class_table(scores, NAMES)
    assert [r["name"] for r in table] == ["sky", "road", "car", "boat"]
    assert table[0]["IoU"] == pytest.approx(8 / 11) and table[1]["IoU"] == pytest.approx(5 / 12)
    assert table[2]["IoU"] == 0.0 and table[2]["Acc"] is None  # predicted 4 times, never labelled
    assert table[3]["IoU"] is None and table[3]["label_pixels"] == 0
    assert [(r["label_pixels"], r["pred_pixels"]) for r in table[:3]] == [(10, 9), (10, 7), (0, 4)]
    reordered = scores_from_confusion(CONFMAT[[3, 2, 1, 0]][:, [3, 2, 1, 0]])  # boat, car, road, sky
    assert [r["name"] for r in class_table(reordered, NAMES[::-1])] == ["sky", "road", "car", "boat"]


def test_summary_block_has_the_numbers(scores: dict[str, torch.Tensor]) -> None:
    text = summary_text(scores, NAMES, stage="val")
    miou = (8 / 11 + 5 / 12 + 0) / 3  # 38.13 %
    assert f"mIoU {100 * miou:.2f}" == "mIoU 38.13" and "mIoU 38.13" in text
    assert "mAcc 65.00" in text and "aAcc 65.00" in text  # (0.8 + 0.5) / 2; 13 / 20
    assert "worst IoU: car 0.00, road 41.67, sky 72.73" in text
    assert "1 never seen" in text


def test_files_round_trip(scores: dict[str, torch.Tensor], tmp_path: Path) -> None:
    files = write_report(tmp_path / "report", scores, NAMES, stage="test", extra={"global_step": 7})
    assert {p.name for p in (tmp_path / "report").iterdir()} == REPORT_FILES == set(files)
    data = json.loads(files["metrics.json"].read_text())
    assert data["stage"] == "test" and data["global_step"] == 7 and data["num_classes"] == 4
    assert data["mIoU"] == pytest.approx(float(scores["mIoU"]), abs=1e-12)
    assert data["per_class"] == class_table(scores, NAMES)  # NaN stored as null, read back as None
    assert data["per_class"][3] == {"id": 3, "name": "boat", "IoU": None, "Acc": None, "label_pixels": 0,
                                    "pred_pixels": 0}
    rows = list(csv.DictReader(files["per_class.csv"].open()))
    assert [r["name"] for r in rows] == ["sky", "road", "car", "boat"]
    assert float(rows[1]["IoU"]) == pytest.approx(5 / 12, abs=1e-6) and rows[3]["IoU"] == rows[2]["Acc"] == ""
    markdown = files["per_class.md"].read_text()
    assert "# test: mIoU 38.13, mAcc 65.00, aAcc 65.00" in markdown
    assert "| 1 | sky | 72.73 | 80.00 | 10 |" in markdown and "| 4 | boat | - | - | 0 |" in markdown


def ade_like_scores(seed: int = 0) -> dict[str, torch.Tensor]:
    """150 classes, 10 never seen; classes 5 and 7 confuse each other heavily."""
    g = torch.Generator().manual_seed(seed)
    confmat = torch.diag(torch.randint(1000, 20000, (150,), generator=g))
    confmat += (torch.rand(150, 150, generator=g) ** 6 * 400).long()
    confmat[5, 7] = confmat[7, 5] = 200_000
    confmat[140:] = 0
    confmat[:, 140:] = 0
    return scores_from_confusion(confmat)


def test_most_confused_picks_the_planted_pair() -> None:
    confmat = ade_like_scores()["confusion_matrix"].numpy()
    chosen = most_confused(confmat, max_classes=20)
    assert len(chosen) == 20 and set(chosen[:2]) == {5, 7}
    assert most_confused(confmat[:12, :12], max_classes=20) == list(range(12))  # few classes: all, in order


def test_charts_are_real_images(tmp_path: Path) -> None:
    files = write_report(tmp_path, ade_like_scores(), ADE20K_CLASSES)
    with Image.open(files["per_class_iou.png"]) as img:  # best 20 + a gap row + worst 20 of 140 scored classes
        assert img.size == (700, round(100 * (1.2 + 0.24 * 41)))
        pixels = np.asarray(img.convert("L"))
    with Image.open(files["confusion.png"]) as img:  # 20 classes + "other classes": 21 columns
        side = 2.5 + 0.42 * 21
        assert img.size == (round(100 * (side + 1.0)), round(100 * side))
    assert 20_000 < files["per_class_iou.png"].stat().st_size < 150_000
    assert 20_000 < files["confusion.png"].stat().st_size < 150_000
    assert pixels.std() > 20  # not a blank page


def tiny_task() -> SegmentationTask:
    torch.manual_seed(0)
    model = Segmentor("test_flatten_pvt", "semantic_fpn", num_classes=12, aux_head=False)
    return SegmentationTask(model, spec=DatasetSpec(num_classes=12, class_names=tuple(f"c{k}" for k in range(12))))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "tiny", num_train=4, num_val=2, min_size=64,
                             max_size=96)


def run(tiny_root: Path, tmp_path: Path, stage: str, report: SegmentationReport) -> pl.Trainer:
    dm = SegmentationDataModule(str(tiny_root), crop_size=64, batch_size=2, num_workers=0, spec=DEMO_SMALL,
                                train_scale=(128, 64))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=CSVLogger(tmp_path / "logs"), callbacks=[report],
                         max_steps=2, val_check_interval=1, num_sanity_val_steps=1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(trainer, stage)(tiny_task(), datamodule=dm)
    return trainer


def test_validate_and_test_write_into_the_log_dir(tiny_root: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    trainer = run(tiny_root, tmp_path, "test", SegmentationReport())
    log_dir = Path(trainer.log_dir)
    assert REPORT_FILES <= {p.name for p in log_dir.iterdir()}
    data = json.loads((log_dir / "metrics.json").read_text())
    scores = trainer.lightning_module.last_scores["test"]
    assert data["stage"] == "test" and data["mIoU"] == pytest.approx(float(scores["mIoU"]))
    assert f"mIoU {100 * float(scores['mIoU']):.2f}" in capsys.readouterr().out


def test_fit_reports_only_when_asked(tiny_root: Path, tmp_path: Path) -> None:
    quiet = run(tiny_root, tmp_path / "a", "fit", SegmentationReport())
    assert not any(p.suffix == ".png" for p in Path(quiet.log_dir).rglob("*"))  # neither sanity check nor fit
    every = run(tiny_root, tmp_path / "b", "fit", SegmentationReport(during_fit=True))
    folders = sorted(p.name for p in Path(every.log_dir).glob("report_val_step*"))
    assert folders == ["report_val_step1", "report_val_step2"]  # after each validation, not the sanity check
    assert REPORT_FILES <= {p.name for p in (Path(every.log_dir) / folders[0]).iterdir()}


def test_cli_validate_writes_report(tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = cli_main([
            "validate", "--config", str(CONFIGS / "demo.yaml"),
            "--model.model.init_args.encoder=test_flatten_pvt", f"--data.root={tiny_root}", "--data.demo=false",
            "--data.num_workers=0", spec_arg(DEMO_SMALL),
            "--trainer.callbacks+=seg.train.callbacks.report.SegmentationReport",
            "--trainer.callbacks.output_dir=report",
        ])
    assert {p.name for p in (tmp_path / "report").iterdir()} == REPORT_FILES
    data = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert data["num_classes"] == 12 and data["ckpt_path"] is None
    assert {r["name"] for r in data["per_class"]} == set(cli.model.class_names)
    assert not math.isnan(data["aAcc"]) and "val results (12 classes" in capsys.readouterr().out
