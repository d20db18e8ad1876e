"""Predictions never touch their inputs; a truncated photo is skipped and counted, the run completes."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from _specs import DEMO_SMALL, spec_arg
from PIL import Image

from seg.data import make_demo_dataset
from seg.data.safety import UnsafeOutputError, check_output_location
from seg.train.cli import cli_main, main

CONFIGS = Path(__file__).parents[1] / "configs"


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def photos(folder: Path) -> Path:
    """Three photos, one named like an overlay, and a truncated JPEG whose header still reads."""
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (24, 36, 3), dtype=np.uint8)).save(folder / "b_overlay.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(folder / "sub" / "c.jpg")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "broken.jpg", quality=95)
    data = (folder / "broken.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(data[: len(data) // 3])  # truncated: the header opens, decoding fails
    return folder


def run_predict(tmp_path: Path, inputs: Path, output: Path, entry: Callable[[list[str]], object] = cli_main) -> None:
    """``predict`` with the demo config from ``inputs`` into ``output``, through ``entry`` (``cli_main``, or
    ``main`` as ``python cli.py`` runs)."""
    root = make_demo_dataset(tmp_path / "tiny", num_train=2, num_val=2, min_size=64, max_size=96)
    entry([
        "predict", "--config", str(CONFIGS / "demo.yaml"),
        "--model.model.init_args.encoder=test_flatten_pvt", f"--data.root={root}", "--data.demo=false",
        "--data.num_workers=0", spec_arg(DEMO_SMALL), f"--data.predict_root={inputs}",
        "--trainer.callbacks+=seg.train.callbacks.prediction_writer.SegmentationWriter",
        f"--trainer.callbacks.output_dir={output}",
        "--return_predictions=false", "--trainer.logger=false",
    ])


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_predict_into_the_inputs_is_refused(where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    inputs = photos(tmp_path / "work" / "photos")
    output = {"same": inputs, "inside": inputs / "sub" / "preds", "parent": tmp_path / "work"}[where]
    before = digests(tmp_path / "work")
    with warnings.catch_warnings(), pytest.raises(UnsafeOutputError, match="input folder") as err:
        warnings.simplefilter("ignore")
        run_predict(tmp_path, inputs, output)
    assert str(output) in str(err.value)
    assert digests(tmp_path / "work") == before  # every input byte-identical, nothing added


def test_cli_reports_the_refusal_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python cli.py predict`` into the inputs: exit status 1 with the reason, no traceback, nothing written."""
    monkeypatch.chdir(tmp_path)
    inputs = photos(tmp_path / "photos")
    before = digests(inputs)
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
        warnings.simplefilter("ignore")
        run_predict(tmp_path, inputs, inputs, entry=main)
    message = str(exit_.value.code)
    assert message.startswith("error: output folder") and str(inputs) in message and "\n" not in message
    assert digests(inputs) == before


def test_output_file_equal_to_an_input_file_is_refused(tmp_path: Path) -> None:
    photo = tmp_path / "x.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(photo)
    with pytest.raises(UnsafeOutputError, match="would overwrite the input"):
        check_output_location(tmp_path, photo, outputs=[tmp_path / "x.png"], inputs=[photo])
    check_output_location(tmp_path / "out", photo, outputs=[tmp_path / "out" / "x.png"], inputs=[photo])


def test_link_to_the_input_folder_is_refused(tmp_path: Path) -> None:
    inputs = tmp_path / "photos"
    inputs.mkdir()
    (tmp_path / "alias").symlink_to(inputs)
    with pytest.raises(UnsafeOutputError, match="is the input folder"):
        check_output_location(tmp_path / "alias", inputs)


def test_truncated_jpeg_is_skipped_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    inputs = photos(tmp_path / "photos")
    before = digests(inputs)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        run_predict(tmp_path, inputs, tmp_path / "predictions")
    broken = [w for w in caught if "broken.jpg" in str(w.message) and "skipping a bad sample" in str(w.message)]
    assert len(broken) == 1
    written = sorted(p.relative_to(tmp_path / "predictions").as_posix() for p in (tmp_path / "predictions").rglob("*"))
    assert written == ["a.png", "a_overlay.jpg", "b_overlay.png", "b_overlay_overlay.jpg", "sub", "sub/c.png",
                       "sub/c_overlay.jpg"]
    assert "predictions of 3 images written" in caplog.text and "1 unreadable images skipped" in caplog.text
    assert digests(inputs) == before
