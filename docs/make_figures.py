"""Regenerate the README figures from a trained demo checkpoint, with the project's own CLI and callbacks.

    python docs/make_figures.py --ckpt logs/demo/checkpoints/best.ckpt

Runs ``validate`` with :class:`~seg.train.callbacks.report.SegmentationReport` and ``predict`` with
:class:`~seg.train.callbacks.prediction_writer.SegmentationWriter` on a few validation images, then copies the IoU chart
and the confusion matrix into ``docs/`` and joins the overlays side by side into ``docs/demo_overlay.jpg``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from seg.train.cli import cli_main

DOCS = Path(__file__).parent


def montage(paths: list[Path], gap: int = 8) -> Image.Image:
    """Pictures side by side on white, top-aligned."""
    pictures = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    height = max(p.shape[0] for p in pictures)
    width = sum(p.shape[1] for p in pictures) + gap * (len(pictures) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    x = 0
    for picture in pictures:
        canvas[: picture.shape[0], x : x + picture.shape[1]] = picture
        x += picture.shape[1] + gap
    return Image.fromarray(canvas)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="trained checkpoint of configs/demo.yaml")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--images", nargs="+", default=["demo_val_00000", "demo_val_00003", "demo_val_00007"],
                        help="stems of validation images shown in the overlay figure")
    parser.add_argument("--data-root", default="data/demo")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the CLI runs below read only their own argument lists
    common = ["--config", args.config, f"--ckpt_path={args.ckpt}", f"--data.root={args.data_root}",
              "--data.num_workers=0"]
    with tempfile.TemporaryDirectory() as tmp:
        report, inputs, outputs = Path(tmp) / "report", Path(tmp) / "inputs", Path(tmp) / "predictions"
        cli_main(["validate", *common, "--trainer.callbacks+=seg.train.callbacks.report.SegmentationReport",
                  f"--trainer.callbacks.output_dir={report}"])
        inputs.mkdir()
        for stem in args.images:
            shutil.copy(Path(args.data_root) / "images" / "validation" / f"{stem}.jpg", inputs)
        cli_main(["predict", *common, f"--data.predict_root={inputs}", "--return_predictions=false",
                  "--trainer.callbacks+=seg.train.callbacks.prediction_writer.SegmentationWriter",
                  f"--trainer.callbacks.output_dir={outputs}"])
        for name in ("per_class_iou.png", "confusion.png"):
            shutil.copy(report / name, DOCS / f"demo_{name}")
        overlays = [outputs / f"{stem}_overlay.jpg" for stem in args.images]
        montage(overlays).save(DOCS / "demo_overlay.jpg", quality=80)
    for path in sorted(DOCS.glob("demo_*")):
        print(f"{path}  {path.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
