"""The facts of a data set, typed once: classes, ignore label, zero-label rule, colours, normalisation, eval scale.

Everything that reads a data-set fact (the data module, the model's class count, the metrics, the prediction
writer, the reports, the app and the pretrained folder) reads it from a :class:`DatasetSpec`. Three are
defined here: :data:`ADE20K`, :data:`CITYSCAPES` and :data:`DEMO` (the bundled synthetic set). A custom data set
declares its own in YAML::

    data:
      spec:
        name: roads
        num_classes: 3
        class_names: [road, sky, car]
        test_scale: [1024, 512]

Label maps are 8-bit: values 0..UINT8_MAX, so a data set holds at most UINT8_MAX classes besides the ignore label.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from seg.data.scenes import DEMO_CLASS_NAMES

__all__ = [
    "ADE20K",
    "ADE20K_CLASSES",
    "ADE20K_CROP",
    "ADE20K_SCALE",
    "ADE20K_STRIDE",
    "CITYSCAPES",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABELS",
    "DEMO",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPECS",
    "SpecFacts",
    "UINT8_MAX",
    "CityscapesLabel",
    "DatasetSpec",
    "as_spec",
    "make_palette",
]

UINT8_MAX = 255  # largest value of an 8-bit pixel or label
IGNORE_INDEX = 255  # the usual label of unlabelled pixels: excluded from loss and metrics
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, on the 8-bit pixel scale
IMAGENET_STD = (58.395, 57.12, 57.375)
# The ADE20K recipe's sizes, the defaults of the spec, the data module, the transforms and the inference config.
ADE20K_SCALE: tuple[int, int] = (2048, 512)  # (long, short) rescale box: training (before the random ratio), test
ADE20K_CROP = 512  # side of the training crop and of the sliding window, px
ADE20K_STRIDE = 341  # step of the sliding window, px (two thirds of the window)

# The 150 classes of ADEChallengeData2016 in label order (raw label k + 1, training label k).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip


class CityscapesLabel(NamedTuple):
    """One label of the Cityscapes definition (its ``labels`` table: name, labelId, trainId, colour).

    Args:
        name: the official name.
        label_id: value in ``*_gtFine_labelIds.png``.
        train_id: training class 0..18, or the ignore label when the label is not evaluated.
        color: the official RGB colour.
    """

    name: str
    label_id: int
    train_id: int
    color: tuple[int, int, int]


_I = IGNORE_INDEX  # trainId of the labels that are not evaluated
CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = (
    CityscapesLabel("unlabeled", 0, _I, (0, 0, 0)),
    CityscapesLabel("ego vehicle", 1, _I, (0, 0, 0)),
    CityscapesLabel("rectification border", 2, _I, (0, 0, 0)),
    CityscapesLabel("out of roi", 3, _I, (0, 0, 0)),
    CityscapesLabel("static", 4, _I, (0, 0, 0)),
    CityscapesLabel("dynamic", 5, _I, (111, 74, 0)),
    CityscapesLabel("ground", 6, _I, (81, 0, 81)),
    CityscapesLabel("road", 7, 0, (128, 64, 128)),
    CityscapesLabel("sidewalk", 8, 1, (244, 35, 232)),
    CityscapesLabel("parking", 9, _I, (250, 170, 160)),
    CityscapesLabel("rail track", 10, _I, (230, 150, 140)),
    CityscapesLabel("building", 11, 2, (70, 70, 70)),
    CityscapesLabel("wall", 12, 3, (102, 102, 156)),
    CityscapesLabel("fence", 13, 4, (190, 153, 153)),
    CityscapesLabel("guard rail", 14, _I, (180, 165, 180)),
    CityscapesLabel("bridge", 15, _I, (150, 100, 100)),
    CityscapesLabel("tunnel", 16, _I, (150, 120, 90)),
    CityscapesLabel("pole", 17, 5, (153, 153, 153)),
    CityscapesLabel("polegroup", 18, _I, (153, 153, 153)),
    CityscapesLabel("traffic light", 19, 6, (250, 170, 30)),
    CityscapesLabel("traffic sign", 20, 7, (220, 220, 0)),
    CityscapesLabel("vegetation", 21, 8, (107, 142, 35)),
    CityscapesLabel("terrain", 22, 9, (152, 251, 152)),
    CityscapesLabel("sky", 23, 10, (70, 130, 180)),
    CityscapesLabel("person", 24, 11, (220, 20, 60)),
    CityscapesLabel("rider", 25, 12, (255, 0, 0)),
    CityscapesLabel("car", 26, 13, (0, 0, 142)),
    CityscapesLabel("truck", 27, 14, (0, 0, 70)),
    CityscapesLabel("bus", 28, 15, (0, 60, 100)),
    CityscapesLabel("caravan", 29, _I, (0, 0, 90)),
    CityscapesLabel("trailer", 30, _I, (0, 0, 110)),
    CityscapesLabel("train", 31, 16, (0, 80, 100)),
    CityscapesLabel("motorcycle", 32, 17, (0, 0, 230)),
    CityscapesLabel("bicycle", 33, 18, (119, 11, 32)),
)  # the definition also names "license plate" (id -1): never stored in an 8-bit labelIds map

_EVALUATED = sorted((lab for lab in CITYSCAPES_LABELS if lab.train_id != _I), key=lambda lab: lab.train_id)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(lab.name for lab in _EVALUATED)  # trainId order


def make_palette(num_colors: int) -> np.ndarray:
    """A fixed palette of distinct RGB colours, generated (not taken from any data set).

    Colour i spreads the bits of i + 1 over the three channels, most significant colour bits first, so
    neighbouring classes get clearly different colours and no class is black. Distinct for up to UINT8_MAX colours.

    Returns:
        uint8 array (num_colors, 3).
    """
    if not 0 < num_colors <= UINT8_MAX:
        raise ValueError(f"make_palette supports 1..{UINT8_MAX} colours, got {num_colors}")
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for i in range(num_colors):
        code, rgb = i + 1, [0, 0, 0]
        for bit in range(8):  # bit b of channel c comes from bit 3 * b + c of the code
            for channel in range(3):
                rgb[channel] |= ((code >> (3 * bit + channel)) & 1) << (7 - bit)
        palette[i] = rgb
    return palette


@dataclass(frozen=True)
class DatasetSpec:
    """What a data set is, independent of where its files are and how a model trains on it.

    Args:
        num_classes: number of training classes K (labels 0..K-1).
        name: short name, written into reports and pretrained folders.
        ignore_index: label of unlabelled pixels, excluded from loss and metrics.
        reduce_zero_label: raw label 0 means "unlabelled" (becomes ``ignore_index``) and raw k is class k - 1,
            as in ADE20K; False: raw values are the classes.
        class_names: one name per class; empty: ``class_0``, ``class_1``, ...
        palette: one RGB triple (0..UINT8_MAX) per class; empty: ``make_palette(K)``.
        mean: per-channel RGB mean on the 8-bit pixel scale, subtracted before the network.
        std: per-channel RGB standard deviation on the 8-bit pixel scale.
        test_scale: (long, short) box evaluation and prediction images are rescaled to fit, keeping their
            aspect ratio.
    """

    num_classes: int
    name: str = "custom"
    ignore_index: int = IGNORE_INDEX
    reduce_zero_label: bool = True
    class_names: tuple[str, ...] = ()
    palette: tuple[tuple[int, int, int], ...] = ()
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    test_scale: tuple[int, int] = ADE20K_SCALE

    def __post_init__(self) -> None:
        if not 0 < self.num_classes <= UINT8_MAX:  # before the defaults below are sized by it
            raise ValueError(f"data set spec {self.name!r}: {self._range_problem()}")
        # normalise what YAML and JSON give (lists) to the declared tuples, filling the defaults
        names = tuple(str(n) for n in self.class_names) or tuple(f"class_{i}" for i in range(self.num_classes))
        palette = np.asarray(self.palette if len(self.palette) else make_palette(self.num_classes))
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "palette", tuple(tuple(int(c) for c in rgb) for rgb in palette.reshape(-1, 3)))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "test_scale", tuple(int(v) for v in self.test_scale))
        problem = self._problem()
        if problem:
            raise ValueError(f"data set spec {self.name!r}: {problem}")

    def _problem(self) -> str:
        """What is inconsistent in this spec ("" when nothing)."""
        k = self.num_classes
        if not 0 < k <= UINT8_MAX or not 0 <= self.ignore_index <= UINT8_MAX:
            return self._range_problem()
        if self.ignore_index < k:
            return f"ignore_index {self.ignore_index} is one of the {k} classes"
        if len(self.class_names) != k:
            return f"{len(self.class_names)} class names for {k} classes"
        if len(set(self.class_names)) != k:
            return f"class names repeat: {sorted({n for n in self.class_names if self.class_names.count(n) > 1})}"
        values = [c for rgb in self.palette for c in rgb]
        if len(self.palette) != k or any(not 0 <= c <= UINT8_MAX for c in values):
            return f"palette must be {k} RGB triples of integers 0..{UINT8_MAX}, got {len(self.palette)} colours"
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            return f"mean and std must be 3 values per RGB channel (std > 0), got {self.mean} and {self.std}"
        if len(self.test_scale) != 2 or min(self.test_scale) < 1:
            return f"test_scale must be a (long, short) box of positive sizes, got {self.test_scale}"
        return ""

    def _range_problem(self) -> str:
        return (f"need 0 < num_classes <= {UINT8_MAX} and 0 <= ignore_index <= {UINT8_MAX} (8-bit label maps), "
                f"got num_classes={self.num_classes}, ignore_index={self.ignore_index}")

    @property
    def palette_array(self) -> np.ndarray:
        """The palette as uint8 (K, 3)."""
        return np.asarray(self.palette, dtype=np.uint8).reshape(-1, 3)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON / YAML values (lists for tuples): what checkpoints and pretrained folders store."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


ADE20K = DatasetSpec(num_classes=len(ADE20K_CLASSES), name="ade20k", class_names=ADE20K_CLASSES)
DEMO = DatasetSpec(num_classes=len(DEMO_CLASS_NAMES), name="demo", class_names=DEMO_CLASS_NAMES,
                   test_scale=(800, 200))  # demo images are 160-320 px: ratio 1 keeps them near their own size
# The 19 evaluated classes as trainIds 0..18 (raw values are the classes: the maps `prepare` writes), the official
# colours, ImageNet statistics (as every mmseg Cityscapes recipe), evaluated at the full 2048 x 1024 frame.
CITYSCAPES = DatasetSpec(num_classes=len(CITYSCAPES_CLASSES), name="cityscapes", reduce_zero_label=False,
                         class_names=CITYSCAPES_CLASSES, palette=tuple(lab.color for lab in _EVALUATED),
                         test_scale=(2048, 1024))
SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (ADE20K, CITYSCAPES, DEMO)}


def as_spec(value: DatasetSpec | str | Mapping[str, Any]) -> DatasetSpec:
    """A spec from itself, a name in :data:`SPECS` or a mapping of its fields (YAML, a checkpoint's hparams).

    Raises:
        ValueError: an unknown name or field (listing the valid ones), or an inconsistent spec.
    """
    if isinstance(value, DatasetSpec):
        return value
    if isinstance(value, str):
        if value not in SPECS:
            raise ValueError(f"unknown data set spec {value!r}; known: {', '.join(SPECS)} (or give its fields)")
        return SPECS[value]
    if isinstance(value, Mapping):
        fields = {f.name for f in dataclasses.fields(DatasetSpec)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"unknown data set spec fields {unknown}; valid: {', '.join(sorted(fields))}")
        return DatasetSpec(**value)
    raise TypeError(f"a data set spec is a DatasetSpec, a name or a mapping of fields, got {type(value).__name__}")


class SpecFacts:
    """The class facts of ``self.spec`` read as attributes: shared by the data module, the task and the predictor."""

    spec: DatasetSpec

    @property
    def num_classes(self) -> int:
        """Number of training classes (the spec's)."""
        return self.spec.num_classes

    @property
    def ignore_index(self) -> int:
        """Label of unlabelled pixels, excluded from loss and metrics (the spec's)."""
        return self.spec.ignore_index

    @property
    def class_names(self) -> list[str]:
        """One name per training class (the spec's)."""
        return list(self.spec.class_names)
