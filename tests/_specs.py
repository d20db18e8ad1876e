"""Data set specs for small test data: the demo's classes (or a few unnamed ones) at a small evaluation scale."""

from __future__ import annotations

import dataclasses
import json

from seg.data.spec import DEMO, DatasetSpec

SMALL_SCALE = (128, 64)
DEMO_SMALL = dataclasses.replace(DEMO, name="demo_small", test_scale=SMALL_SCALE)


def small_spec(num_classes: int, test_scale: tuple[int, int] = SMALL_SCALE) -> DatasetSpec:
    """``num_classes`` unnamed classes (ADE20K's label rules) evaluated at ``test_scale``."""
    return DatasetSpec(num_classes=num_classes, name=f"tiny{num_classes}", test_scale=test_scale)


def spec_arg(spec: DatasetSpec) -> str:
    """The command-line option giving ``spec`` to the data module (its fields as JSON)."""
    return f"--data.spec={json.dumps(spec.to_dict())}"


def named_spec(class_names: list[str] | tuple[str, ...], test_scale: tuple[int, int] = SMALL_SCALE,
               name: str = "", **fields: object) -> DatasetSpec:
    """A spec of the given class names at ``test_scale`` (``name`` empty: a data set not named)."""
    return DatasetSpec(num_classes=len(class_names), name=name, class_names=tuple(class_names),
                       test_scale=test_scale, **fields)
