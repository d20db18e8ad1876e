"""The evaluation report callback: files and a printed summary after ``validate`` and ``test`` runs (see
:mod:`seg.train.reports` for the files). Only global rank 0 writes."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn

from seg.train.reports import summary_text, write_report

__all__ = ["SegmentationReport"]


class SegmentationReport(Callback):
    """Write the report files and print the summary at the end of ``validate`` and ``test`` runs.

    Reads ``pl_module.last_scores[stage]`` (stage ``val`` / ``test``) and the class names and colours of
    ``pl_module.spec`` (else ``pl_module.class_names``); never runs during the sanity check.

    Args:
        output_dir: folder for the files; default: the run's log folder (``trainer.log_dir``).
        during_fit: also report after every validation inside ``fit``, into
            ``<folder>/report_val_step<global step>/``.
        max_confused: most classes in the confusion matrix.
    """

    def __init__(self, output_dir: str | None = None, during_fit: bool = False, max_confused: int = 20) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.during_fit = during_fit
        self.max_confused = max_confused
        self.last_files: dict[str, Path] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        fitting = trainer.state.fn == "fit"
        if not fitting or self.during_fit:
            self._report(trainer, pl_module, "val", fitting)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module, "test", fitting=False)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, fitting: bool) -> None:
        directory = Path(self.output_dir or trainer.log_dir or ".")  # log_dir broadcasts: every rank asks
        if fitting:
            directory = directory / f"report_{stage}_step{trainer.global_step}"
        if not trainer.is_global_zero:
            return
        scores = getattr(pl_module, "last_scores", {}).get(stage)
        if scores is None:
            rank_zero_warn(f"SegmentationReport: {type(pl_module).__name__} has no last_scores[{stage!r}]; no report")
            return
        spec = getattr(pl_module, "spec", None)
        names = list(getattr(pl_module, "class_names", None) or [f"class_{k}" for k in range(len(scores["IoU"]))])
        palette = spec.palette_array if spec is not None else None
        extra = {"global_step": trainer.global_step, "ckpt_path": trainer.ckpt_path}
        if spec is not None:
            extra["dataset"] = spec.name
        self.last_files = write_report(directory, scores, names, stage, extra, self.max_confused, palette)
        print(f"{summary_text(scores, names, stage)}\n  report: {directory}", flush=True)
