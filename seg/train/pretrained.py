"""``python -m seg.train.pretrained``: a run's Lightning checkpoint as a saved model (a Predictor: the segmentor with
its classes, preprocessing and inference mode), built from the training config exactly as training built it::

    python -m seg.train.pretrained --config configs/demo.yaml --ckpt_path logs/demo/checkpoints/best.ckpt \\
        --out pretrained/demo

writes ``config.json``, ``model.safetensors`` and ``README.md`` (the model card; see :mod:`seg.model.hub`); load it
with ``Predictor.from_pretrained("pretrained/demo")`` or ``Segmentor.from_pretrained("pretrained/demo")``.
``--push_to_hub user/name`` also uploads it (needs a Hugging Face login).

:func:`from_config` is the commands' one way from a config and a checkpoint to a model (``seg.serve.app`` and
``seg.serve.export`` use it); the weights are read by :func:`seg.model.checkpoint.load_checkpoint`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seg.data import SegmentationDataModule
from seg.model.checkpoint import best_score, load_checkpoint
from seg.model.hub import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE
from seg.serve.predictor import Predictor
from seg.train.cli import SegmentationArgumentParser, SegmentationCLI
from seg.train.task import SegmentationTask

__all__ = ["from_checkpoint", "from_config", "main"]


class _BuildOnlyCLI(SegmentationCLI):
    """The training CLI's parsing, links and instantiation of the data module and task, without a trainer (its
    accelerator may not exist on this machine)."""

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        return None


def from_config(cli_args: Sequence[str], ckpt_path: str | None = None) -> Predictor:
    """The model ``cli.py`` builds from ``cli_args`` (``--config ...`` and overrides), with the segmentor weights
    of a Lightning checkpoint (None: the initial weights), the data module's class names and test scale, and the
    task's inference mode. With a checkpoint, an ImageNet ``encoder_checkpoint`` of the config is not read."""
    args = list(cli_args)
    if ckpt_path is not None:
        args.append("--model.model.init_args.encoder_checkpoint=null")  # the checkpoint replaces those weights
    with warnings.catch_warnings():  # the arguments are this program's own, passed on: nothing to warn about
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = _BuildOnlyCLI(SegmentationTask, SegmentationDataModule, args=args, run=False,
                            parser_class=SegmentationArgumentParser, seed_everything_default=0)
    task: SegmentationTask = cli.model
    data: SegmentationDataModule = cli.datamodule
    metrics = None
    if ckpt_path is not None:
        configs = " ".join(a for a in cli_args if a.endswith((".yaml", ".yml"))) or "the command line"
        checkpoint = load_checkpoint(task.model, ckpt_path, built_from=configs)
        metrics = best_score(checkpoint, ckpt_path)
    # the data set's facts, as training read them
    return Predictor(task.model.eval(), data.spec, inference=task.inference, metrics=metrics)


def from_checkpoint(cli_args: Sequence[str], ckpt_path: str) -> Predictor:
    """:func:`from_config` with a checkpoint (required)."""
    return from_config(cli_args, ckpt_path)


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m seg.train.pretrained --config <experiment>.yaml --ckpt_path <file>.ckpt --out <folder>``."""
    parser = argparse.ArgumentParser(
        prog="python -m seg.train.pretrained",
        description="Write a saved model (config.json + model.safetensors + README.md) from a Lightning checkpoint. "
        "Every other argument (--config, --model..., --data...) is read as by `python cli.py`.",
    )
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint (.ckpt) of the run")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="also upload to this Hugging Face Hub repository")
    args, cli_args = parser.parse_known_args(argv)
    if not cli_args:
        parser.error("give the run's config: --config configs/<experiment>.yaml")
    predictor = from_checkpoint(cli_args, args.ckpt_path)
    folder = predictor.save_pretrained(args.out)
    print(f"wrote {folder / CONFIG_FILE}, {folder / WEIGHTS_FILE} and {folder / CARD_FILE}")
    if args.push_to_hub:
        print(f"uploaded: {predictor.push_to_hub(args.push_to_hub)}")
    return folder


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
