"""The data set spec: the built-in ones, checks, a custom spec from YAML reaching the model and the metrics, and no
data-set number typed anywhere else in seg/."""

from __future__ import annotations

import ast
import dataclasses
import io
import re
import tokenize
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from seg.data import ADE20K, DEMO, DatasetSpec, as_spec, make_demo_dataset, make_palette
from seg.data.scenes import DEMO_CLASS_NAMES
from seg.train.cli import cli_main

SEG = Path(__file__).parents[1] / "seg"
SPEC_FILE = SEG / "data" / "spec.py"
FACTS = (150, 255)  # ADE20K's class count and the ignore label / 8-bit maximum: typed in spec.py only
_AS_TEXT = re.compile(r"(?<![\w])(?<!\d\.)(?:150|255)(?![\w])(?!\.\d)")  # the numbers as words, anywhere


def literal_hits(text: str, python: bool = True) -> list[str]:
    """Lines of ``text`` that hold 150 or 255: as a word anywhere (code, strings, comments) or, in Python, as a
    number literal of that value in any spelling (0xFF, 255.0, 1_50)."""
    hits = {number: line for number, line in enumerate(text.splitlines(), 1) if _AS_TEXT.search(line)}
    if python:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.NUMBER and ast.literal_eval(token.string) in FACTS:
                hits.setdefault(token.start[0], token.line.rstrip("\n"))
    return [f"{number}: {line.strip()}" for number, line in sorted(hits.items())]


@pytest.mark.parametrize("text", [
    "x = 255", "clip(x, 0, 255)", "x = 0xFF", "x = 0o377", "x = 255.0", "x = 1_50", "k = 150  # classes",
    "msg = 'labels 0..255'", "# the 150 classes", "y = (150)",
])
def test_the_scan_finds_the_numbers(text: str) -> None:
    assert literal_hits(text) == [f"1: {text}"]


@pytest.mark.parametrize("text", [
    "x = 1500", "x = 2550", "x = 12550", "x = 0.150", "x = 1.255", "x = 255.5", "x255 = 1", "v150b = 2",
    "x = 256", "x = 0x100", "x = 15.0", "x = 1_500",
])
def test_the_scan_leaves_other_numbers(text: str) -> None:
    assert literal_hits(text) == []


def test_no_data_set_number_outside_the_spec() -> None:
    files = sorted(p for p in SEG.rglob("*") if p.suffix in (".py", ".yaml", ".yml") and p != SPEC_FILE)
    assert len(files) > 40 and SEG / "data" / "datamodule.py" in files
    found = {str(p.relative_to(SEG)): hits for p in files if (hits := literal_hits(p.read_text(), p.suffix == ".py"))}
    assert found == {}, "data-set facts belong in seg/data/spec.py (read them from a DatasetSpec):\n" + "\n".join(
        f"  seg/{name}:{hit}" for name, hits in found.items() for hit in hits)
    assert literal_hits(SPEC_FILE.read_text())  # the facts are there


def test_builtin_specs() -> None:
    assert ADE20K.num_classes == 150 and ADE20K.ignore_index == 255 and ADE20K.reduce_zero_label
    assert ADE20K.class_names[0] == "wall" and ADE20K.test_scale == (2048, 512)
    assert ADE20K.mean == pytest.approx((123.675, 116.28, 103.53))
    assert ADE20K.std == pytest.approx((58.395, 57.12, 57.375))
    assert DEMO.class_names == DEMO_CLASS_NAMES and DEMO.num_classes == 12 and DEMO.test_scale == (800, 200)
    np.testing.assert_array_equal(DEMO.palette_array, make_palette(12))
    assert as_spec("demo") is DEMO and as_spec(DEMO) is DEMO
    assert as_spec(DEMO.to_dict()) == DEMO  # what checkpoints and configs store reads back equal


def test_defaults_and_checks() -> None:
    spec = as_spec({"num_classes": 3, "class_names": ["a", "b", "c"], "test_scale": [64, 32]})
    assert spec.class_names == ("a", "b", "c") and spec.test_scale == (64, 32) and len(spec.palette) == 3
    assert DatasetSpec(num_classes=2).class_names == ("class_0", "class_1")
    for fields, message in [
        ({"num_classes": 3, "class_names": ["a", "b"]}, "2 class names for 3 classes"),
        ({"num_classes": 2, "class_names": ["a", "a"]}, r"class names repeat: \['a'\]"),
        ({"num_classes": 300}, "need 0 < num_classes <= 255"),
        ({"num_classes": 4, "ignore_index": 2}, "ignore_index 2 is one of the 4 classes"),
        ({"num_classes": 2, "palette": [[0, 0, 0], [0, 0, 256]]}, "palette must be 2 RGB triples"),
        ({"num_classes": 2, "std": [1.0, 0.0, 1.0]}, "std > 0"),
        ({"num_classes": 2, "name": "x", "classes": 2}, r"unknown data set spec fields \['classes'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            as_spec(fields)
    with pytest.raises(ValueError, match="unknown data set spec 'ade'"):
        as_spec("ade")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ADE20K.num_classes = 3  # type: ignore[misc]


CUSTOM = """\
data:
  root: {root}
  spec:
    name: roads
    num_classes: 3
    ignore_index: 99
    reduce_zero_label: false
    class_names: [road, sky, car]
    palette: [[10, 20, 30], [40, 50, 60], [70, 80, 90]]
    test_scale: [96, 48]
"""


def test_custom_spec_from_yaml_reaches_model_metrics_and_writer(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "data", num_train=2, num_val=1, min_size=64, max_size=80)
    config = tmp_path / "roads.yaml"
    config.write_text(CUSTOM.format(root=root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = cli_main(["--config", str(Path(__file__).parents[1] / "configs" / "demo.yaml"), "--config", str(config),
                        "--data.demo=false", "--model.model.init_args.encoder=test_flatten_pvt"], run=False)
    task, data = cli.model, cli.datamodule
    assert data.spec.name == "roads" and task.spec == data.spec
    assert task.model.num_classes == 3
    assert task.model.eval()(torch.zeros(1, 3, 64, 64))["out"].shape == (1, 3, 64, 64)  # the spec's classes
    assert task.val_metric.ignore_index == 99 and task.test_metric.num_classes == 3
    assert task.ignore_index == 99 and task.class_names == ["road", "sky", "car"]
    assert task._test_scale() == (96, 48)
    assert task.spec.palette == ((10, 20, 30), (40, 50, 60), (70, 80, 90))
    assert task.hparams["spec"]["class_names"] == ["road", "sky", "car"]  # plain values: weights_only loads


def test_task_refuses_a_spec_of_another_class_count() -> None:
    from seg.model.segmentor import Segmentor
    from seg.train.task import SegmentationTask

    model = Segmentor("test_flatten_pvt", "semantic_fpn", num_classes=4, aux_head=False)
    with pytest.raises(ValueError, match="data set spec 'demo' has 12 classes but the model predicts 4"):
        SegmentationTask(model, spec="demo")
    assert SegmentationTask(model).class_names == ["class_0", "class_1", "class_2", "class_3"]
