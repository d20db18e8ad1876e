"""Throughput of the ADE20K training pipeline on one CPU core: read + decode + transform, crop 512.

Writes N random 683x512 JPEGs (ADE20K's typical size) with block label maps into a temporary folder, then
times ``SegmentationFolder[i]`` with the recipe's training pipeline in this process (one DataLoader worker
does the same work). Prints images/s per worker, the median over repeats, and the machine.

    python benchmarks/data_pipeline.py [--images 40] [--repeats 5] [--crop 512]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import albumentations
import cv2
import numpy as np
import PIL
import torch
from PIL import Image

from seg.data.ade20k import SegmentationFolder, read_label, read_rgb
from seg.data.transforms import train_transform


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_images(root: Path, count: int, height: int = 512, width: int = 683) -> None:
    """Random-noise-over-gradient JPEGs (quality 90) and 16x16-block label maps with raw values 0..150."""
    rng = np.random.default_rng(0)
    (root / "images" / "training").mkdir(parents=True)
    (root / "annotations" / "training").mkdir(parents=True)
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    for i in range(count):
        noise = rng.normal(0, 25, (height, width, 3)).astype(np.float32)
        pixels = np.clip(ramp + noise + rng.uniform(0, 55, 3), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / "training" / f"img_{i:04d}.jpg", quality=90)
        grid = rng.integers(0, 151, (height // 16 + 1, width // 16 + 1))
        label = np.kron(grid, np.ones((16, 16), dtype=np.int64))[:height, :width].astype(np.uint8)
        Image.fromarray(label, mode="L").save(root / "annotations" / "training" / f"img_{i:04d}.png")


def time_pass(fn, count: int) -> float:
    """Images per second of ``fn(i)`` over ``count`` indices."""
    start = time.perf_counter()
    for i in range(count):
        fn(i)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--crop", type=int, default=512)
    args = parser.parse_args()

    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # DataLoader workers run single-threaded OpenCV
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root, args.images)
        dataset = SegmentationFolder(root, "training", train_transform(args.crop, (2048, 512), seed=0))
        decode = lambda i: (read_rgb(dataset.samples[i][0], False), read_label(dataset.samples[i][1]))
        stages = {"read + decode only": decode, "full sample (decode, check, transform)": dataset.__getitem__}
        time_pass(dataset.__getitem__, min(4, args.images))  # warm-up
        results = {}
        for name, fn in stages.items():
            rates = [time_pass(fn, args.images) for _ in range(args.repeats)]
            results[name] = (statistics.median(rates), min(rates), max(rates))

    print(f"machine: {cpu_model()}, {os.cpu_count()} logical cores; one worker = one process, 1 thread")
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"albumentations {albumentations.__version__}, opencv {cv2.__version__}, pillow {PIL.__version__}, "
          f"numpy {np.__version__}")
    print(f"{args.images} images 683x512 JPEG, crop {args.crop}, scale (2048, 512) x U[0.5, 2.0], "
          f"median of {args.repeats} passes")
    for name, (median, low, high) in results.items():
        print(f"  {name:45s} {median:7.1f} images/s per worker  (range {low:.1f}-{high:.1f})")


if __name__ == "__main__":
    main()
