"""Cityscapes: the label table, prepare on archives laid out as the official downloads (complete, partial, cut
short, extracted), and the data module reading the prepared layout."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _cityscapes import FRAMES, OUTSIDE_TABLE, label_ids, stems, write_archives
from PIL import Image

from seg.data.check import main as check_main
from seg.data.cityscapes import label_id_to_train_id, to_train_ids
from seg.data.datamodule import SegmentationDataModule
from seg.data.prepare import main as prepare_main
from seg.data.spec import CITYSCAPES, CITYSCAPES_LABELS, as_spec

HW = (32, 64)


def expected_train_ids(ids: np.ndarray) -> np.ndarray:
    """The official table applied pixel by pixel, written out independently of the converter's lookup table."""
    table = {label.label_id: label.train_id for label in CITYSCAPES_LABELS}
    out = np.empty_like(ids)
    for (y, x), value in np.ndenumerate(ids):
        out[y, x] = table.get(int(value), CITYSCAPES.ignore_index)
    return out


def train_id_path(root: Path, split: str, city: str, stem: str) -> Path:
    return root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png"


def test_spec_and_table_hold_the_official_facts() -> None:
    assert as_spec("cityscapes") is CITYSCAPES
    assert CITYSCAPES.num_classes == 19 and CITYSCAPES.ignore_index == 255 and not CITYSCAPES.reduce_zero_label
    assert CITYSCAPES.test_scale == (2048, 1024)
    assert CITYSCAPES.class_names[:3] == ("road", "sidewalk", "building")
    assert CITYSCAPES.class_names[-3:] == ("train", "motorcycle", "bicycle")
    assert CITYSCAPES.palette[0] == (128, 64, 128) and CITYSCAPES.palette[13] == (0, 0, 142)  # road, car
    assert CITYSCAPES.palette[18] == (119, 11, 32)  # bicycle
    assert CITYSCAPES.mean == pytest.approx((123.675, 116.28, 103.53))
    lut = label_id_to_train_id()
    facts = {7: 0, 8: 1, 11: 2, 17: 5, 23: 10, 24: 11, 26: 13, 31: 16, 33: 18,  # evaluated
             0: 255, 1: 255, 6: 255, 9: 255, 10: 255, 14: 255, 18: 255, 29: 255, 30: 255,  # not evaluated
             34: 255, 100: 255, 255: 255}  # outside the table
    assert {k: int(lut[k]) for k in facts} == facts
    assert sorted(lut[lut != 255].tolist()) == list(range(19))  # each class from exactly one labelId
    with pytest.raises(ValueError, match="uint8"):
        to_train_ids(np.zeros((2, 2), np.int32))


def test_prepare_converts_the_official_archives(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, labels = write_archives(tmp_path / "downloads", HW)
    out = tmp_path / "data"
    assert prepare_main([str(images), str(labels), "--out", str(out), "--workers", "2"]) == 1  # counts: a tiny copy
    root = out / "cityscapes"
    text = capsys.readouterr().out
    assert "3 of 2975 frames and 3 of 2975 label maps: 2972 frames and 2972 label maps missing" in text
    assert "2 of 500 frames and 2 of 500 label maps: 498 frames and 498 label maps missing" in text
    assert "summary: 2 problems (count: 2)" in text
    for split in FRAMES:
        for city, stem in stems(split):
            assert (root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png").is_file()
            written = train_id_path(root, split, city, stem)
            with Image.open(written) as img:
                assert img.mode == "L"
                converted = np.asarray(img)
            ids = label_ids(stem, HW)
            np.testing.assert_array_equal(converted, expected_train_ids(ids))
            assert set(np.unique(converted[np.isin(ids, OUTSIDE_TABLE)])) == {255}
    # the extracted folder works too: nothing left to convert, nothing rewritten, clean without the count check
    written = train_id_path(root, "val", "frankfurt", "frankfurt_000000_000294")
    stamp = written.stat().st_mtime_ns
    assert prepare_main([str(root), "--skip-count-check", "--workers", "1"]) == 0
    assert "summary: OK" in capsys.readouterr().out and written.stat().st_mtime_ns == stamp


def test_a_frame_without_its_label_map_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lost = "bochum_000000_000313"
    images, labels = write_archives(tmp_path, HW, drop_label=lost)
    assert prepare_main([str(images), str(labels), "--out", str(tmp_path / "data"), "--skip-count-check"]) == 1
    text = capsys.readouterr().out
    assert f"[missing label] {tmp_path / 'data' / 'cityscapes' / 'leftImg8bit' / 'train' / 'bochum'}" in text
    assert f"{lost}_leftImg8bit.png: no " in text and f"{lost}_gtFine_labelIds.png" in text
    assert "summary: 1 problems (missing label: 1)" in text
    assert train_id_path(tmp_path / "data" / "cityscapes", "train", "aachen", "aachen_000000_000019").is_file()


def test_a_download_cut_short_is_converted_as_far_as_it_goes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, labels = write_archives(tmp_path, HW)
    with zipfile.ZipFile(labels) as zf:  # cut the gtFine archive inside the member after the first frame's maps
        members = zf.infolist()
        cut = next(m for m in members if m.filename.endswith("bochum_000000_000313_gtFine_labelIds.png"))
    labels.write_bytes(labels.read_bytes()[: cut.header_offset + 60])
    out = tmp_path / "data"
    assert prepare_main([str(images), str(labels), "--out", str(out), "--skip-count-check"]) == 1
    text = capsys.readouterr().out
    assert "no central directory" in text
    root = out / "cityscapes"
    assert train_id_path(root, "train", "aachen", "aachen_000000_000020").is_file()  # arrived before the cut
    assert not train_id_path(root, "train", "bochum", "bochum_000000_000313").exists()
    assert "[missing label]" in text and "bochum_000000_000313_leftImg8bit.png" in text
    assert "[missing folder]" in text and str(root / "gtFine" / "val") in text  # whole split lost
    # with the count check: the numbers missing per split
    assert prepare_main([str(root), "--workers", "1"]) == 1
    missing = "3 of 2975 frames and 2 of 2975 label maps: 2972 frames and 2973 label maps missing"
    assert missing in capsys.readouterr().out


def test_bad_inputs_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, labels = write_archives(tmp_path, HW)
    out = tmp_path / "data"
    assert prepare_main([str(images), str(labels), "--out", str(out), "--skip-count-check"]) == 0
    root = out / "cityscapes"
    city = root / "gtFine" / "val" / "frankfurt"
    rgb = city / "frankfurt_000000_000294_gtFine_labelIds.png"
    Image.fromarray(np.zeros((*HW, 3), np.uint8)).save(rgb)
    small = city / "frankfurt_000000_000576_gtFine_labelIds.png"
    Image.fromarray(np.zeros((8, 16), np.uint8)).save(small)
    capsys.readouterr()
    assert prepare_main([str(root), "--skip-count-check", "--workers", "1"]) == 1
    text = capsys.readouterr().out
    assert f"[label mode] {rgb}: has mode RGB" in text
    assert f"[size mismatch] {small}: 16x8 (WxH) but frame frankfurt_000000_000576_leftImg8bit.png is 64x32" in text
    assert prepare_main([str(tmp_path / "absent.zip")]) == 2
    assert prepare_main([str(root), str(images)]) == 2
    assert "give the two official archives or one extracted folder" in capsys.readouterr().err


def test_the_data_module_reads_the_cityscapes_layout(tmp_path: Path) -> None:
    images, labels = write_archives(tmp_path, HW)
    assert prepare_main([str(images), str(labels), "--out", str(tmp_path), "--skip-count-check"]) == 0
    spec = CITYSCAPES.to_dict() | {"test_scale": [64, 32]}  # keep the tiny frames at their size
    dm = SegmentationDataModule(str(tmp_path / "cityscapes"), spec=as_spec(spec), crop_size=(16, 32), batch_size=2,
                                num_workers=0, train_scale=(128, 64))
    assert dm.layout.name == "cityscapes" and (dm.train_split, dm.val_split) == ("train", "val")
    dm.setup("fit")
    assert len(dm.train_set) == 3 and len(dm.val_set) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 32) and batch["mask"].shape == (2, 16, 32)
    val = next(iter(dm.val_dataloader()))
    assert val["name"] == ["frankfurt_000000_000294"] and val["image"].shape == (1, 3, *HW)
    expected = expected_train_ids(label_ids("frankfurt_000000_000294", HW))
    torch.testing.assert_close(val["mask"][0], torch.from_numpy(expected).long())
    ade = SegmentationDataModule(str(tmp_path), spec="ade20k", layout="cityscapes")
    assert ade.layout.name == "cityscapes"
    with pytest.raises(ValueError, match="unknown folder layout 'coco'; known: ade20k, cityscapes"):
        SegmentationDataModule(str(tmp_path), spec="cityscapes", layout="coco")  # type: ignore[arg-type]
    missing = SegmentationDataModule(str(tmp_path / "nowhere"), spec="cityscapes")
    with pytest.raises(FileNotFoundError, match="leftImg8bit_trainvaltest.zip gtFine_trainvaltest.zip"):
        missing.setup("validate")


def test_check_decodes_the_prepared_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, labels = write_archives(tmp_path, HW)
    assert prepare_main([str(images), str(labels), "--out", str(tmp_path), "--skip-count-check"]) == 0
    root = tmp_path / "cityscapes"
    capsys.readouterr()
    assert check_main([str(root), "--spec", "cityscapes", "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "train: labels use 19 of 19 classes" in text and "summary: OK" in text
    bad = train_id_path(root, "val", "frankfurt", "frankfurt_000000_000576")
    Image.fromarray(np.full(HW, 30, np.uint8)).save(bad)  # a labelId left unconverted
    assert check_main([str(root), "--spec", "cityscapes", "--workers", "1"]) == 1
    assert f"[label values] {bad}: values [30]" in capsys.readouterr().out
    assert check_main([str(root), "--workers", "1"]) == 2  # ADE20K's layout is not there
    assert "holds no images/ and annotations/ folders (the ade20k layout)" in capsys.readouterr().err

