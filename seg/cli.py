"""LightningCLI for fit / validate / test / predict, with the project's links and trainer defaults."""

from __future__ import annotations

from pathlib import Path

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from seg.data import SegmentationDataModule
from seg.task import SegmentationTask

__all__ = ["SegmentationCLI", "cli_main"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEFAULTS_FILE = Path(__file__).with_name("trainer_defaults.yaml")  # loggers and callbacks of every run


class SegmentationCLI(LightningCLI):
    """States each fact once: the data module's class count, ignore label and names feed the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.model.init_args.num_classes")
        parser.link_arguments("data.ignore_index", "model.ignore_index")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")


def cli_main(args: list[str] | None = None, run: bool = True) -> SegmentationCLI:
    """Entry point of ``python cli.py``; ``args`` lets tests drive it in-process."""
    return SegmentationCLI(
        SegmentationTask,
        SegmentationDataModule,
        args=args,
        run=run,
        parser_kwargs={cmd: {"default_config_files": [str(DEFAULTS_FILE)]} for cmd in SUBCOMMANDS},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )
