"""The LightningModule: loss, metrics per stage, inference modes and optimizer parameter groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from seg.data.spec import DatasetSpec, SpecFacts, as_spec
from seg.model.inference import InferenceConfig, SettingError, run_inference
from seg.model.legacy import upgrade_state
from seg.model.segmentor import Segmentor
from seg.model.weights import load_segmentor_weights
from seg.serve.limits import predict_labels
from seg.train.metrics import SegmentationMetric
from seg.train.schedules import WarmupPolyLR
from seg.train.weight_decay import DecayPlan, NoDecayRule, param_groups, plan_weight_decay

__all__ = ["SegmentationTask"]


def _class_path(obj: object) -> str:
    """The dotted path of an object's class, as jsonargparse names it."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01)


class SegmentationTask(SpecFacts, pl.LightningModule):
    """Semantic segmentation with a :class:`~seg.model.Segmentor`.

    Args:
        model: encoder + decoder (its ``num_classes`` is linked from the data module's spec by the CLI).
        spec: the data set's facts (linked from the data module by the CLI): ignore label (excluded from loss and
            metrics), class names (per-class metrics, reports, prediction files), palette and evaluation scale
            (multi-scale views). None: ``model.num_classes`` unnamed classes with the usual ignore label, and
            multi-scale views sized from an attached data module's ``test_scale`` (else from the input).
        aux_weight: weight of the auxiliary head's cross-entropy (0.4 in the recipes).
        optimizer: optimizer factory; it receives the model's parameter groups: a decayed group and, unless
            ``no_decay`` is ``decay_all``, a group with ``weight_decay=0``.
        scheduler: learning-rate scheduler factory, stepped every optimizer step. A
            :class:`~seg.train.schedules.WarmupPolyLR` without ``max_steps`` takes the trainer's step count.
        inference: how validation, test and predict turn an image into logits.
        compile: run the training forward under ``torch.compile`` (static shapes: training crops share one
            size; validation, test and predict images each have their own size and run eagerly). Checkpoint
            keys do not change. Off by default: see BENCHMARKS.md for what it gains on each machine measured.
        no_decay: which parameters get no weight decay (:func:`~seg.train.weight_decay.no_decay_names`): ``decay_all``
            (PVT's Semantic FPN recipe), ``norms_tables`` (Swin's UperNet recipe: norms, position tables,
            ``positional_encoding``, ``scale``) or ``norms_biases_tables`` (those and all biases). The groups are
            worked out from the unwrapped model in :meth:`configure_model`, so they are the same on one device,
            under DDP and under FSDP with ``use_orig_params=True``. FSDP with ``use_orig_params=False`` leaves one
            flattened parameter per unit: only ``decay_all`` works there, other rules raise.
        weights: a trained segmentor to start from (:func:`~seg.model.weights.load_segmentor_weights`): a saved model
            folder (e.g. a published segmenter converted by ``python -m seg.model.convert``), a ``.safetensors`` file or
            a Lightning checkpoint. It takes the place of the encoder's ImageNet ``encoder_checkpoint`` (the CLI
            does not read that file then). On another class count only the classifiers start fresh.
    """

    def __init__(
        self,
        model: Segmentor,
        spec: DatasetSpec | str | None = None,
        aux_weight: float = 0.4,
        optimizer: OptimizerCallable = _default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        inference: InferenceConfig | None = None,
        compile: bool = False,
        no_decay: NoDecayRule = "norms_biases_tables",
        weights: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler", "spec", "weights"])
        if "_instantiator" in self.hparams:  # built by LightningCLI: load_from_checkpoint rebuilds through it
            # the architecture, not the CLI's arguments: an ImageNet `encoder_checkpoint` is not needed (the
            # checkpoint holds the weights) and may not exist where the checkpoint is loaded
            self.hparams["model"] = {"class_path": _class_path(model), "init_args": model.arguments}
        self._spec_given = spec is not None
        self.spec = as_spec(spec) if spec is not None else DatasetSpec(num_classes=model.num_classes)
        if self.spec.num_classes != model.num_classes:
            raise ValueError(f"data set spec {self.spec.name!r} has {self.spec.num_classes} classes but the model "
                             f"predicts {model.num_classes}")
        self.hparams["spec"] = self.spec.to_dict() if spec is not None else None  # plain values (weights_only)
        self.model = model
        if weights is not None:
            rank_zero_info(load_segmentor_weights(model, weights))
        self.aux_weight = aux_weight
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        if inference is not None:  # also one unpickled from a checkpoint's hyper-parameters (no __post_init__)
            try:
                inference.validate()
            except SettingError as err:
                raise SettingError(f"inference: {err}") from err
        self.inference = inference or InferenceConfig()
        self.val_metric = SegmentationMetric(self.spec.num_classes, self.spec.ignore_index)
        self.test_metric = SegmentationMetric(self.spec.num_classes, self.spec.ignore_index)
        self.last_scores: dict[str, dict[str, Tensor]] = {}
        self.compile_model = compile
        self._train_forward: Callable[[Tensor], dict[str, Tensor]] | None = None  # compiled in configure_model
        self.no_decay = no_decay
        self._decay_plan: DecayPlan | None = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> SegmentationTask:
        """Lightning's loader; hyper-parameters that fail their construction checks are refused with the file
        and the field named."""
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except SettingError as err:
            raise SettingError(f"{checkpoint_path}: hyper_parameters.{err}") from err

    def configure_model(self) -> None:
        """Work out the weight-decay groups from the unwrapped model, then compile the training forward when
        asked (Lightning calls this before the strategy wraps the model).

        Only the training forward is compiled, with static shapes: dynamic image sizes make the compiler
        specialise per size or fail inside inductor (torch 2.14), while the training crops have one size."""
        if self._decay_plan is None:
            self._decay_plan = plan_weight_decay(self, self.no_decay)
        if self.compile_model and self._train_forward is None:
            self._train_forward = torch.compile(self.model.forward, dynamic=False)

    def forward(self, image: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
        """Inference: normalised images (B, 3, H, W) -> logits (B, K, H', W'), ``out_size`` or input size.

        ``out_size`` is the original image size; multi-scale views are sized from it and the spec's
        ``test_scale`` box, as mmseg does.
        """
        return run_inference(lambda x: self.model(x)["out"], image, self.inference, out_size, self._test_scale())

    def _test_scale(self) -> tuple[int, int] | None:
        """The (long, short) test resize box: the spec's, else an attached data module's, else None."""
        if self._spec_given:
            return self.spec.test_scale
        trainer = self._trainer
        scale = getattr(getattr(trainer, "datamodule", None), "test_scale", None) if trainer is not None else None
        return (int(scale[0]), int(scale[1])) if scale is not None else None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        outputs = (self._train_forward or self.model)(batch["image"])
        loss = F.cross_entropy(outputs["out"], batch["mask"], ignore_index=self.ignore_index)
        self.log("train/loss_main", loss, batch_size=len(batch["image"]))
        if "aux" in outputs and self.aux_weight > 0:
            aux = F.cross_entropy(outputs["aux"], batch["mask"], ignore_index=self.ignore_index)
            self.log("train/loss_aux", aux, batch_size=len(batch["image"]))
            loss = loss + self.aux_weight * aux
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def _evaluate(self, batch: dict[str, Tensor], metric: SegmentationMetric, stage: str) -> None:
        target = batch["mask"]  # (B, H0, W0) labels at the original size
        logits = self(batch["image"], out_size=tuple(target.shape[-2:]))
        metric.update(logits.argmax(dim=1), target)
        if (target != self.ignore_index).any():
            loss = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index)
            self.log(f"{stage}/loss", loss, batch_size=len(target), sync_dist=True)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metric, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metric, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Label maps (B, H0, W0) at each image's original size, with the batch's paths."""
        size = tuple(int(s) for s in batch["orig_size"][0])
        labels = predict_labels(lambda x: self.model(x)["out"], batch["image"], self.inference, size,
                                self._test_scale())  # (B, H0, W0), resized in stripes
        return {"labels": labels, "path": batch["path"]}

    def _finish(self, metric: SegmentationMetric, stage: str) -> None:
        scores = metric.compute()
        metric.reset()
        self.last_scores[stage] = scores
        summary = {f"{stage}/{key}": scores[key].float() for key in ("mIoU", "mAcc", "aAcc")}
        if self.trainer.sanity_checking:
            rank_zero_info(f"before training: {stage} mIoU {summary[f'{stage}/mIoU']:.4f} "
                           f"(sanity check over {self.trainer.num_sanity_val_batches[0]} images)")
            return
        self.log_dict(summary, prog_bar=True)
        for name, iou in zip(self.class_names, scores["IoU"].tolist(), strict=True):
            if iou == iou:  # skip NaN: classes absent from labels and predictions
                self.log(f"{stage}/IoU/{name}", iou)

    def on_validation_epoch_end(self) -> None:
        self._finish(self.val_metric, "val")

    def on_test_epoch_end(self) -> None:
        self._finish(self.test_metric, "test")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before the mmseg heads: the auxiliary head's names upgraded, an earlier
        ``upernet`` / ``semantic_fpn`` refused with what changed (:mod:`seg.model.legacy`)."""
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = upgrade_state(checkpoint["state_dict"], self.model.decoder_name,
                                                     "the checkpoint", prefix="model.")

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (:func:`~seg.train.weight_decay.param_groups`), over the parameters as the
        strategy left them, against the plan made from the unwrapped model in :meth:`configure_model`."""
        if self._decay_plan is None:  # e.g. a direct call without a trainer: the model is still unwrapped
            self._decay_plan = plan_weight_decay(self, self.no_decay)
        return param_groups(self.named_parameters(), self._decay_plan)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.param_groups())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupPolyLR) and scheduler.max_steps is None:
            scheduler.max_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
