"""The ADE20K segmentation recipe (mmseg semantics) as albumentations 2.0.8 pipelines.

Training: random keep-ratio rescale into (long * r, short * r), r ~ U[0.5, 2.0]; random crop retried until no
class covers >= ``cat_max_ratio`` of the labelled pixels; horizontal flip p=0.5; photometric distortion;
ImageNet normalisation on 8-bit RGB; pad to the crop size (image 0, label ignore). Evaluation: keep-ratio
rescale into ``scale`` and normalisation only. Masks are always resized with nearest neighbour.

All randomness is drawn from the transforms' ``py_random`` / ``random_generator``, which
:func:`seed_pipeline` replaces by one shared, seeded pair (per DataLoader worker, see the data module).
"""

from __future__ import annotations

import random
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.core.type_definitions import Targets

from seg.data.spec import ADE20K_CROP, ADE20K_SCALE, IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, UINT8_MAX

__all__ = [
    "CatMaxRatioCrop",
    "PhotometricDistortion",
    "RandomRescale",
    "eval_transform",
    "fit_size",
    "seed_pipeline",
    "train_transform",
]



def fit_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Size (h, w) of an image rescaled, keeping its aspect ratio, to fit a (long, short) box.

    The factor is min(long / long_side, short / short_side), as in mmseg's keep-ratio resize; sizes round
    half up.
    """
    long_target, short_target = max(scale), min(scale)
    factor = min(long_target / max(height, width), short_target / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


class RandomRescale(A.DualTransform):
    """Keep-ratio rescale into (long * r, short * r) with r ~ U[ratio_range] (r = 1 for evaluation).

    Args:
        scale: (long, short) box in pixels, e.g. (2048, 512).
        ratio_range: range of r; (1.0, 1.0) gives the deterministic evaluation resize.
        p: probability of applying.
    """

    _targets = (Targets.IMAGE, Targets.MASK)

    def __init__(
        self,
        scale: tuple[int, int] = ADE20K_SCALE,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        if min(scale) < 1 or not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"RandomRescale needs positive scale and 0 < ratio_range[0] <= ratio_range[1], "
                             f"got scale={scale}, ratio_range={ratio_range}")
        self.scale = (int(scale[0]), int(scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        ratio = self.py_random.uniform(*self.ratio_range)
        box = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        height, width = params["shape"][:2]
        return {"size": fit_size(height, width, box)}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)  # cv2 takes (W, H)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale", "ratio_range")


class CatMaxRatioCrop(A.DualTransform):
    """Random crop that avoids crops dominated by one class (mmseg ``cat_max_ratio``).

    A crop is accepted when it holds more than one labelled class and the most common one covers less than
    ``cat_max_ratio`` of the labelled (non-ignore) pixels; otherwise a new position is drawn, at most
    ``max_tries`` times, after which the last drawn crop is used. A side shorter than the crop is kept whole
    (padding comes later).

    Args:
        crop_size: (height, width) in pixels.
        cat_max_ratio: largest accepted share of one class; 1.0 disables the check.
        ignore_index: label not counted.
        max_tries: re-draws after the first crop.
        p: probability of applying.
    """

    _targets = (Targets.IMAGE, Targets.MASK)

    def __init__(
        self,
        crop_size: tuple[int, int] = (ADE20K_CROP, ADE20K_CROP),
        cat_max_ratio: float = 0.75,
        ignore_index: int = IGNORE_INDEX,
        max_tries: int = 10,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)
        self.max_tries = int(max_tries)

    def _random_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) of a crop position drawn uniformly."""
        top = self.py_random.randint(0, max(height - self.crop_size[0], 0))
        left = self.py_random.randint(0, max(width - self.crop_size[1], 0))
        return top, left, min(top + self.crop_size[0], height), min(left + self.crop_size[1], width)

    def _accept(self, crop: np.ndarray) -> bool:
        if crop.dtype == np.uint8:  # OpenCV's histogram: ~10x faster than bincount, exact below 2^24 pixels
            counts = cv2.calcHist([np.ascontiguousarray(crop)], [0], None, [256], [0, 256]).ravel()
        else:
            counts = np.bincount(crop.ravel().astype(np.int64), minlength=self.ignore_index + 1)
        if self.ignore_index < counts.size:
            counts[self.ignore_index] = 0
        return bool(np.count_nonzero(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum())

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        box = self._random_box(height, width)
        mask = data.get("mask")
        if mask is not None and self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries):
                if self._accept(mask[box[0] : box[2], box[1] : box[3]]):
                    break
                box = self._random_box(height, width)
        return {"box": box}

    def apply(self, img: np.ndarray, box: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        return np.ascontiguousarray(img[box[0] : box[2], box[1] : box[3]])

    def apply_to_mask(self, mask: np.ndarray, box: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        return np.ascontiguousarray(mask[box[0] : box[2], box[1] : box[3]])

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("crop_size", "cat_max_ratio", "ignore_index", "max_tries")


def _affine_uint8(img: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """clip(img * alpha + beta, 0, UINT8_MAX) back to uint8 (truncating, as the recipe does)."""
    return np.clip(img.astype(np.float32) * alpha + beta, 0, UINT8_MAX).astype(np.uint8)


class PhotometricDistortion(A.ImageOnlyTransform):
    """The recipe's photometric distortion on uint8 RGB images; each step has probability 0.5.

    Brightness + U[-32, 32]; contrast x U[0.5, 1.5] (either first or last, chosen at random); saturation
    x U[0.5, 1.5] and hue + randint[-18, 18] (OpenCV hue units, 0..179, wrapping) in HSV space. Values are
    clipped to 0..UINT8_MAX after every step.

    Args:
        brightness_delta: largest brightness shift in pixel units.
        contrast_range: range of the contrast factor.
        saturation_range: range of the saturation factor.
        hue_delta: largest hue shift in OpenCV hue units (180 = full circle).
        p: probability of running the distortion at all (each step then has its own 0.5).
    """

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.brightness_delta = int(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)

    def get_params(self) -> dict[str, Any]:
        rng = self.py_random
        coin = lambda: rng.random() < 0.5
        return {
            "brightness": rng.uniform(-self.brightness_delta, self.brightness_delta) if coin() else None,
            "contrast_first": coin(),
            "contrast": rng.uniform(*self.contrast_range) if coin() else None,
            "saturation": rng.uniform(*self.saturation_range) if coin() else None,
            "hue": rng.randint(-self.hue_delta, self.hue_delta) if coin() else None,
        }

    def apply(
        self,
        img: np.ndarray,
        brightness: float | None = None,
        contrast_first: bool = True,
        contrast: float | None = None,
        saturation: float | None = None,
        hue: int | None = None,
        **params: Any,
    ) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"PhotometricDistortion needs uint8 RGB (H, W, 3), got {img.dtype} {img.shape}")
        if brightness is not None:
            img = _affine_uint8(img, 1.0, brightness)
        if contrast is not None and contrast_first:
            img = _affine_uint8(img, contrast, 0.0)
        if saturation is not None or hue is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)  # uint8: H in 0..179, S and V in 0..UINT8_MAX
            if saturation is not None:
                hsv[..., 1] = _affine_uint8(hsv[..., 1], saturation, 0.0)
            if hue is not None:
                hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + hue) % 180).astype(np.uint8)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if contrast is not None and not contrast_first:
            img = _affine_uint8(img, contrast, 0.0)
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness_delta", "contrast_range", "saturation_range", "hue_delta")


def _normalize(
    mean: tuple[float, float, float] = IMAGENET_MEAN, std: tuple[float, float, float] = IMAGENET_STD
) -> A.Normalize:
    return A.Normalize(mean=mean, std=std, max_pixel_value=1.0)  # stats on the 8-bit pixel scale


def train_transform(
    crop_size: int | tuple[int, int],
    scale: tuple[int, int],
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
    seed: int | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> A.Compose:
    """The training pipeline: call as ``pipeline(image=uint8 (H, W, 3), mask=uint8 (H, W))``.

    Args:
        crop_size: crop (height, width) in pixels, or one side of a square crop (512 in the ADE20K recipes,
            (512, 1024) in the Cityscapes ones).
        scale: (long, short) rescale box before the random ratio, (2048, 512) in the recipe.
        ratio_range: range of the random rescale ratio r.
        cat_max_ratio: largest share of one class in an accepted crop.
        ignore_index: label of unlabelled and padded pixels.
        seed: seed of the pipeline's random state (None: fresh entropy).
        mean: per-channel RGB mean on the 8-bit pixel scale (the data set spec's).
        std: per-channel RGB standard deviation on the 8-bit pixel scale.

    Returns:
        A pipeline giving ``image`` float32 (crop_h, crop_w, 3) normalised and ``mask`` uint8 (crop_h, crop_w).
    """
    crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else (int(crop_size[0]), int(crop_size[1]))
    pipeline = A.Compose([
        RandomRescale(scale=scale, ratio_range=ratio_range),
        CatMaxRatioCrop((crop_h, crop_w), cat_max_ratio=cat_max_ratio, ignore_index=ignore_index),
        A.HorizontalFlip(p=0.5),
        PhotometricDistortion(),
        _normalize(mean, std),
        A.PadIfNeeded(
            min_height=crop_h,
            min_width=crop_w,
            position="top_left",  # pad bottom and right, as the recipe does
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=ignore_index,
        ),
    ])  # fmt: skip
    seed_pipeline(pipeline, seed)
    return pipeline


def eval_transform(
    scale: tuple[int, int],
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> A.Compose:
    """Validation / test / prediction pipeline: keep-ratio rescale into ``scale`` (long, short), normalise.

    Call it on the image only (metrics use the original-size label). Deterministic. ``mean`` and ``std`` are
    per RGB channel on the 8-bit pixel scale (ImageNet's by default, as in training).
    """
    return A.Compose([RandomRescale(scale=scale, ratio_range=(1.0, 1.0)), _normalize(mean, std)])


def seed_pipeline(pipeline: A.BaseCompose | A.BasicTransform, seed: int | None) -> None:
    """Give every transform of ``pipeline`` one shared random state seeded by ``seed``.

    One shared pair of generators (instead of albumentations' one seeded copy per transform) keeps the draws
    of different transforms independent of each other. ``seed=None`` draws fresh entropy.
    """
    seed = random.SystemRandom().getrandbits(63) if seed is None else int(seed)
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
