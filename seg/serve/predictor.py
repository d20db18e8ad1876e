"""Predictor: a segmentor with the facts of its data set and its inference settings. A photo in, labels out.

It is what ``python -m seg.train.pretrained`` writes, what the web demo and ``seg.serve.export`` load, and what a
user of a trained model needs::

    predictor = Predictor.from_pretrained("pretrained/demo")  # a folder or a Hugging Face Hub id
    labels = predictor.predict(rgb)  # uint8 (H, W, 3) -> (H, W) class indices, as `cli.py predict` computes them
    predictor.save_pretrained("pretrained/copy")  # config.json + model.safetensors + README.md (model card)

The files are the segmentor's own (:meth:`seg.model.Segmentor.save_pretrained`); the predictor adds the
``dataset`` (name, class names, palette, normalisation mean / std, evaluation rescale), ``inference`` and
``metrics`` sections to ``config.json`` and the model card (see :mod:`seg.model.hub`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from seg.data.ade20k import image_to_tensor
from seg.data.spec import ADE20K, DatasetSpec, SpecFacts, as_spec
from seg.data.transforms import eval_transform
from seg.model import hub
from seg.model.inference import InferenceConfig
from seg.model.segmentor import DECODERS, Segmentor
from seg.serve.limits import DEFAULT_MAX_PIXELS, check_pixels, labels_at, predict_labels

__all__ = ["DEFAULT_TEST_SCALE", "Predictor"]

DEFAULT_TEST_SCALE: tuple[int, int] = ADE20K.test_scale


@dataclass
class Predictor(SpecFacts):
    """A segmentor with the facts of its data set (classes, colours, ignore label, preprocessing) and its
    inference mode.

    Args:
        model: the network.
        spec: the data set's facts (:class:`~seg.data.spec.DatasetSpec`: class names, palette, ignore index,
            normalisation mean / std, evaluation rescale); None: ADE20K's for a model of ADE20K's class count,
            else unnamed classes (``class_0``, ...) with the defaults.
        inference: whole-image, sliding-window or multi-scale inference.
        metrics: validation scores, e.g. ``{"val/mIoU": 0.69}``, for the model card (None: not known).
        max_pixels: :meth:`predict` refuses larger photos (:class:`~seg.serve.limits.ImageTooLargeError`); None: no
            limit. Not saved: a setting of the machine that runs the model.
        source: the checkpoint the weights were converted from (file, sha256, kind, recipe, published scores;
            ``python -m seg.model.convert`` sets it), for config.json and the model card (None: trained here).
        head_stride_logits: in whole-image inference without flip, take the model's stride-4 logits
            (``full_size=False``) straight to the striped resize + argmax at the photo's size, skipping the
            model's resize to the network input (one bilinear resize instead of two: labels may differ at class
            boundaries). Not saved, like ``max_pixels``.
    """

    model: Segmentor
    spec: DatasetSpec | None = None
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    metrics: dict[str, float] | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    source: dict[str, Any] | None = None
    head_stride_logits: bool = False

    def __post_init__(self) -> None:
        k = self.model.num_classes
        if self.spec is None:
            self.spec = ADE20K if k == ADE20K.num_classes else DatasetSpec(num_classes=k, name="")
        self.spec = as_spec(self.spec)
        if self.spec.num_classes != k:
            raise ValueError(f"data set spec {self.spec.name!r} has {self.spec.num_classes} classes for a model of "
                             f"{k} classes")

    @property
    def palette(self) -> np.ndarray:
        """(K, 3) uint8 RGB colours (the spec's)."""
        return self.spec.palette_array

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.spec.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.spec.std

    @property
    def test_scale(self) -> tuple[int, int]:
        return self.spec.test_scale

    @property
    def dataset(self) -> str | None:
        """The data set's name (None: not known)."""
        return self.spec.name or None

    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike[str], map_location: str | torch.device = "cpu", **hub_kwargs: Any
    ) -> Predictor:
        """Load a folder or Hub repository written by :meth:`save_pretrained` (or by ``Segmentor.save_pretrained``:
        then the defaults stand in for the data-set facts). ``config.json`` is read and checked once.
        ``hub_kwargs``: revision, cache_dir, token, local_files_only, force_download.

        Raises:
            FileNotFoundError: a missing folder or file (named).
            ValueError: an unreadable file, a bad entry, or weights that do not match the config (named).
        """
        config_path = hub.resolve_file(source, hub.CONFIG_FILE, **hub_kwargs)
        weights_path = hub.resolve_file(source, hub.WEIGHTS_FILE, **hub_kwargs)
        config = hub.read_config(config_path, DECODERS)
        model = Segmentor.from_files(config, config_path, weights_path, map_location)
        try:
            spec = _spec(config["dataset"], model.num_classes)
            return cls(model, spec, _inference(config["inference"]), config["metrics"], source=config["source"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{config_path}: {err}") from err

    def config(self) -> dict[str, Any]:
        """The content of ``config.json``: the segmentor's arguments and the dataset / inference / metrics."""
        return {
            **self.model._hub_mixin_config,
            "dataset": self.dataset_facts(),
            "inference": dataclasses.asdict(self.inference),
            "metrics": self.metrics,
            **({"source": self.source} if self.source else {}),
        }

    def dataset_facts(self) -> dict[str, Any]:
        """The ``dataset`` section of ``config.json``: the spec's fields (``name`` null when not known)."""
        return {**self.spec.to_dict(), "name": self.dataset}

    def save_pretrained(self, directory: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the model card (``README.md``, kept if the folder
        already has one, as the mixin does) into ``directory``; ``kwargs`` go to the mixin (``push_to_hub=True,
        repo_id=...`` also uploads). Returns the folder."""
        card = {"dataset": self.dataset_facts(), "metrics": self.metrics, "source": self.source}
        self.model.save_pretrained(directory, config=self.config(), model_card_kwargs=card, **kwargs)
        return Path(directory)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the files of :meth:`save_pretrained` to a Hub repository (the mixin's ``push_to_hub``)."""
        card = {"dataset": self.dataset_facts(), "metrics": self.metrics, "source": self.source}
        return self.model.push_to_hub(repo_id, config=self.config(), model_card_kwargs=card, **kwargs)

    def transform(self) -> Any:
        """The evaluation pipeline: keep-ratio rescale into ``test_scale``, normalise."""
        return eval_transform(self.test_scale, self.mean, self.std)

    def _head_stride(self, x: Tensor) -> bool:
        """Whether :meth:`predict` takes the stride-4 logits for the normalised image x (B, 3, h, w)."""
        pad = self.model.pad_multiple
        return (self.head_stride_logits and self.inference.mode == "whole" and not self.inference.flip
                and x.shape[2] % pad == 0 and x.shape[3] % pad == 0)

    @torch.inference_mode()
    def predict(self, image: np.ndarray) -> np.ndarray:
        """Class indices (H, W) of one uint8 (H, W, 3) RGB image, at its size, as ``cli.py predict`` computes
        them (same rescale, normalisation and inference mode)."""
        check_pixels(image.shape[0], image.shape[1], self.max_pixels)
        self.model.eval()
        device = next(self.model.parameters()).device
        x = image_to_tensor(self.transform()(image=image)["image"])[None].to(device)  # (1, 3, h, w)
        if self._head_stride(x):
            labels = labels_at(self.model(x, full_size=False)["out"], tuple(image.shape[:2]))  # (1, H, W)
        else:
            labels = predict_labels(lambda t: self.model(t)["out"], x, self.inference, tuple(image.shape[:2]),
                                    self.test_scale)  # (1, H, W)
        return labels[0].cpu().numpy()


def _inference(entry: Mapping[str, Any] | None) -> InferenceConfig:
    """An ``inference`` section as an InferenceConfig (None: whole-image)."""
    if entry is None:
        return InferenceConfig()
    try:
        fields = {f.name for f in dataclasses.fields(InferenceConfig)}
        if set(entry) - fields:
            raise TypeError(f"unknown keys {sorted(set(entry) - fields)}")
        return InferenceConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()})
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"bad 'inference' entry: {err}") from err


def _spec(entry: Mapping[str, Any] | None, num_classes: int) -> DatasetSpec | None:
    """A ``dataset`` section as a spec of ``num_classes`` classes (None: no section, the defaults)."""
    if entry is None:
        return None
    if not isinstance(entry, Mapping):
        raise ValueError("'dataset' must be a mapping")
    fields = {k: v for k, v in entry.items() if v is not None and k != "num_classes"}
    return as_spec({**fields, "num_classes": num_classes, "name": entry.get("name") or ""})
