"""Hostile pretrained folders and checkpoints: refused before anything is built, with the file and field named."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _specs import named_spec

from seg.model.hub import CONFIG_FILE, WEIGHTS_FILE
from seg.model.inference import InferenceConfig
from seg.model.segmentor import Segmentor
from seg.serve.predictor import Predictor

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = Segmentor("test_flatten_pvt", "semantic_fpn", num_classes=3, decoder_channels=16, aux_head=False).eval()
    folder = tmp_path_factory.mktemp("pretrained") / "tiny"
    Predictor(model, named_spec(["a", "b", "c"], (128, 64)), inference=InferenceConfig("slide", 64, 48)) \
        .save_pretrained(folder)
    return folder


def planted(saved: Path, folder: Path, edit) -> Path:
    """A copy of the saved folder with ``edit`` applied to its config.json (a dict, or text to write as is)."""
    folder.mkdir()
    (folder / WEIGHTS_FILE).write_bytes((saved / WEIGHTS_FILE).read_bytes())
    config = json.loads((saved / CONFIG_FILE).read_text())
    result = edit(config)
    (folder / CONFIG_FILE).write_text(result if isinstance(result, str) else json.dumps(config))
    return folder


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def test_saved_folder_still_loads(saved: Path) -> None:
    predictor = Predictor.from_pretrained(saved)
    assert predictor.class_names == ["a", "b", "c"] and predictor.inference.stride == 48


def test_million_channel_decoder_refused_before_building(saved: Path, tmp_path: Path) -> None:
    folder = planted(saved, tmp_path / "wide", lambda c: c.update(decoder_channels=1_000_000))
    before, start = max_rss_mib(), time.perf_counter()
    for load in (Predictor.from_pretrained, Segmentor.from_pretrained):
        with pytest.raises(ValueError, match=rf"{folder / CONFIG_FILE}: field 'decoder_channels' must be in "
                                             r"\[1, 4096\], got 1000000"):
            load(folder)
    assert time.perf_counter() - start < 5.0
    assert max_rss_mib() - before < 100  # building it would take gigabytes


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda c: c["dataset"].update(test_scale=[0, 0]), r"dataset.test_scale\[0\]' must be in \[16, 8192\], got 0"),
        (lambda c: c["inference"].update(stride=1), r"inference.stride' must be in \[16, 64\], got 1"),
        (lambda c: c["inference"].update(stride=[48, 1]), r"inference.stride\[1\]' must be in \[16, 64\], got 1"),
        (lambda c: c["inference"].update(scales=[0.5] * 100), "inference.scales' must hold at most 16 values"),
        (lambda c: c["inference"].update(scales=[1e9]), r"inference.scales\[0\]' must be in"),
        (lambda c: c.update(num_classes=10**9), r"num_classes' must be in \[1, 1024\]"),
        (lambda c: c["dataset"].update(palette=[[0, 0, 0]] * 2 + [[0, 0, 256]]), r"dataset.palette\[2\]\[2\]"),
        (lambda c: c["dataset"].update(palette=[[0, 0]] * 3), r"dataset.palette\[0\]' must hold 3 values"),
        (lambda c: c["dataset"].update(std=[1.0, 0.0, 1.0]), r"dataset.std\[1\]' must be in"),
        (lambda c: c.update(decoder_channels="wide"), "decoder_channels' must be an integer"),
        (lambda c: c.update(encoder_kwargs={"embed_dims": [10**9]}), r"encoder_kwargs.embed_dims\[0\]' must be in"),
        (lambda c: c.update(encoder_kwargs={"pretrained_cfg_overlay": {"file": "/etc/passwd"}}),
         "encoder_kwargs.pretrained_cfg_overlay' is not allowed"),
        (lambda c: c.update(encoder_checkpoint="/etc/passwd"), "encoder_checkpoint' is not a Segmentor argument"),
        (lambda c: c.update(aux_head="yes"), "aux_head' must be true or false"),
    ],
    ids=["test_scale", "stride", "stride_pair", "many_scales", "huge_scale", "classes", "palette_value",
         "palette_shape", "std", "channels_type", "kwargs_int", "kwargs_file", "checkpoint_key", "flag"],
)
def test_out_of_range_fields_are_named(saved: Path, tmp_path: Path, edit, field: str) -> None:
    folder = planted(saved, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=rf"{folder / CONFIG_FILE}: field '{field}"):
        Predictor.from_pretrained(folder)


def test_hub_encoder_refused_offline_without_waiting(saved: Path, tmp_path: Path) -> None:
    folder = planted(saved, tmp_path / "remote", lambda c: c.update(encoder="hf-hub:timm/vit_base_patch16_224"))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="field 'encoder' 'hf-hub:timm/vit_base_patch16_224' names a remote model"):
        Segmentor.from_pretrained(folder)
    assert time.perf_counter() - start < 2.0


def test_deep_and_huge_json_refused(saved: Path, tmp_path: Path) -> None:
    deep = planted(saved, tmp_path / "deep", lambda c: "[" * 100_000 + "]" * 100_000)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"{deep / CONFIG_FILE} nests 100000 levels deep; .* at most 16"):
        Predictor.from_pretrained(deep)
    huge = planted(saved, tmp_path / "huge", lambda c: c.update(padding=" " * (2 << 20)))
    with pytest.raises(ValueError, match=rf"{huge / CONFIG_FILE} is \d+ bytes; .* at most 1048576"):
        Predictor.from_pretrained(huge)
    assert time.perf_counter() - start < 5.0


def test_export_names_a_bad_checkpoint_in_one_line(tmp_path: Path) -> None:
    """A text file as --ckpt_path: one line naming the file, no traceback, nothing written; a missing file named."""
    from seg.serve.export import main

    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint\n")
    args = ["--config", str(ROOT / "configs/demo.yaml"), "--model.model.init_args.encoder=test_flatten_pvt",
            "--out", str(tmp_path / "m.onnx")]
    run = subprocess.run([sys.executable, "-m", "seg.serve.export", *args, "--ckpt_path", str(text)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 1 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"cannot read checkpoint {text}: not a PyTorch checkpoint" in errors[0]
    gone = tmp_path / "gone.ckpt"
    with pytest.raises(FileNotFoundError, match=f"checkpoint {gone} does not exist"):
        main([*args, "--ckpt_path", str(gone)])
    assert not (tmp_path / "m.onnx").exists()
