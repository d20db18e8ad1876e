"""Predictor: a segmentor with the facts of its data set and its inference settings. A photo in, labels out.

It is what ``python -m seg.pretrained`` writes, what the web demo and ``seg.export`` load, and what a user of a
trained model needs::

    predictor = Predictor.from_pretrained("pretrained/demo")  # a folder or a Hugging Face Hub id
    labels = predictor.predict(rgb)  # uint8 (H, W, 3) -> (H, W) class indices, as `cli.py predict` computes them
    predictor.save_pretrained("pretrained/copy")  # config.json + model.safetensors + README.md (model card)

The files are the segmentor's own (:meth:`seg.models.Segmentor.save_pretrained`); the predictor adds the
``dataset`` (name, class names, palette, normalisation mean / std, evaluation rescale), ``inference`` and
``metrics`` sections to ``config.json`` and the model card (see :mod:`seg.hub`).
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

from seg import hub
from seg.data.ade20k import image_to_tensor
from seg.data.spec import ADE20K, IMAGENET_MEAN, IMAGENET_STD, UINT8_MAX, make_palette
from seg.data.transforms import eval_transform
from seg.inference import InferenceConfig
from seg.limits import DEFAULT_MAX_PIXELS, check_pixels, predict_labels
from seg.models import DECODERS, Segmentor

__all__ = ["DEFAULT_TEST_SCALE", "Predictor"]

DEFAULT_TEST_SCALE: tuple[int, int] = ADE20K.test_scale


@dataclass
class Predictor:
    """A segmentor with its classes, colours, preprocessing and inference mode.

    Args:
        model: the network.
        class_names: one name per class; None: the ADE20K names for a model of ADE20K's class count, else
            ``class_0``, ...
        palette: (K, 3) RGB colours, 8-bit integers; None: ``make_palette(K)``, the prediction writer's colours.
        mean: per-channel RGB mean on the 8-bit pixel scale, subtracted before the network.
        std: per-channel RGB standard deviation on the 8-bit pixel scale.
        test_scale: (long, short) box images are rescaled to fit (keeping their aspect ratio).
        inference: whole-image, sliding-window or multi-scale inference.
        dataset: name of the training data set, for the model card (None: not known).
        metrics: validation scores, e.g. ``{"val/mIoU": 0.69}``, for the model card (None: not known).
        max_pixels: :meth:`predict` refuses larger photos (:class:`~seg.limits.ImageTooLargeError`); None: no
            limit. Not saved: a setting of the machine that runs the model.
        source: the checkpoint the weights were converted from (file, sha256, kind, recipe, published scores;
            ``python -m seg.convert`` sets it), for config.json and the model card (None: trained here).
    """

    model: Segmentor
    class_names: list[str] | None = None
    palette: np.ndarray | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    test_scale: tuple[int, int] = DEFAULT_TEST_SCALE
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    dataset: str | None = None
    metrics: dict[str, float] | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    source: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        k = self.model.num_classes
        if self.class_names is None:
            same = k == ADE20K.num_classes
            self.class_names = list(ADE20K.class_names) if same else [f"class_{i}" for i in range(k)]
        self.class_names = [str(name) for name in self.class_names]
        self.palette = make_palette(len(self.class_names)) if self.palette is None else np.asarray(self.palette)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.test_scale = (int(self.test_scale[0]), int(self.test_scale[1]))
        problem = _check_dataset(k, self.class_names, self.palette, self.mean, self.std)
        if problem:
            raise ValueError(problem)

    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike[str], map_location: str | torch.device = "cpu", **hub_kwargs: Any
    ) -> Predictor:
        """Load a folder or Hub repository written by :meth:`save_pretrained` (or by ``Segmentor.save_pretrained``:
        then the defaults stand in for the data-set facts). ``hub_kwargs``: revision, cache_dir, token,
        local_files_only, force_download.

        Raises:
            FileNotFoundError: a missing folder or file (named).
            ValueError: an unreadable file, a bad entry, or weights that do not match the config (named).
        """
        config_path = hub.resolve_file(source, hub.CONFIG_FILE, **hub_kwargs)
        config = hub.read_config(config_path, DECODERS)
        dataset = config["dataset"] or {}
        if not isinstance(dataset, dict):
            raise ValueError(f"{config_path}: 'dataset' must be a mapping")
        model = Segmentor.from_pretrained(source, map_location=map_location, **hub_kwargs)
        try:
            return cls(model, dataset.get("class_names"), dataset.get("palette"),
                       tuple(dataset.get("mean", IMAGENET_MEAN)), tuple(dataset.get("std", IMAGENET_STD)),
                       tuple(dataset.get("test_scale", DEFAULT_TEST_SCALE)),
                       _inference(config["inference"]), dataset.get("name"), config["metrics"],
                       source=config["source"])
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
        """The ``dataset`` section of ``config.json``."""
        return {"name": self.dataset, "class_names": list(self.class_names), "palette": self.palette.tolist(),
                "mean": list(self.mean), "std": list(self.std), "test_scale": list(self.test_scale)}

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

    @torch.inference_mode()
    def predict(self, image: np.ndarray) -> np.ndarray:
        """Class indices (H, W) of one uint8 (H, W, 3) RGB image, at its size, as ``cli.py predict`` computes
        them (same rescale, normalisation and inference mode)."""
        check_pixels(image.shape[0], image.shape[1], self.max_pixels)
        self.model.eval()
        device = next(self.model.parameters()).device
        x = image_to_tensor(self.transform()(image=image)["image"])[None].to(device)  # (1, 3, h, w)
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


def _check_dataset(num_classes: int, class_names: Any, palette: np.ndarray, mean: Any, std: Any) -> str:
    """What is wrong with the class names, palette and normalisation of a ``num_classes`` model ("" if nothing)."""
    if not isinstance(class_names, list | tuple) or len(class_names) != num_classes:
        count = len(class_names) if isinstance(class_names, list | tuple) else "no list of"
        return f"{count} class names for a model of {num_classes} classes"
    if palette.shape != (num_classes, 3) or not np.issubdtype(palette.dtype, np.integer) \
            or palette.min(initial=0) < 0 or palette.max(initial=0) > UINT8_MAX:
        return f"palette must be {num_classes} RGB triples of integers 0..{UINT8_MAX}, got shape {palette.shape}"
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        return f"mean and std must be 3 values per RGB channel (std > 0), got {list(mean)} and {list(std)}"
    return ""
