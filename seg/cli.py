"""LightningCLI for fit / validate / test / predict, with the project's links and trainer defaults."""

from __future__ import annotations

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from seg.data import SegmentationDataModule
from seg.task import SegmentationTask

__all__ = ["SegmentationCLI", "cli_main"]

TRAINER_DEFAULTS = {
    "logger": [
        {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "logs"}},
        {"class_path": "pytorch_lightning.loggers.TensorBoardLogger", "init_args": {"save_dir": "logs"}},
    ],
    "callbacks": [
        {
            "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
            "init_args": {"monitor": "val/mIoU", "mode": "max", "save_last": True, "filename": "best",
                          "auto_insert_metric_name": False, "enable_version_counter": False},
        },
        {"class_path": "pytorch_lightning.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
        {"class_path": "pytorch_lightning.callbacks.TQDMProgressBar"},
    ],
}


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
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )
