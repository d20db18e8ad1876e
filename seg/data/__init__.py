"""Data: the data set specs, the ADE20K-layout data set, the recipe's augmentation pipelines and the data module."""

from seg.data.ade20k import ImageFolder, SegmentationFolder, load_class_names, read_label, read_rgb
from seg.data.datamodule import SegmentationDataModule, seed_worker
from seg.data.spec import ADE20K, ADE20K_CLASSES, CITYSCAPES, DEMO, SPECS, DatasetSpec, as_spec, make_palette
from seg.data.synthetic import DEMO_CLASS_NAMES, DemoSettings, ensure_demo_dataset, make_demo_dataset
from seg.data.transforms import eval_transform, seed_pipeline, train_transform

__all__ = [
    "ADE20K",
    "ADE20K_CLASSES",
    "CITYSCAPES",
    "DEMO",
    "DEMO_CLASS_NAMES",
    "SPECS",
    "DatasetSpec",
    "DemoSettings",
    "ImageFolder",
    "SegmentationDataModule",
    "SegmentationFolder",
    "as_spec",
    "ensure_demo_dataset",
    "eval_transform",
    "load_class_names",
    "make_demo_dataset",
    "make_palette",
    "read_label",
    "read_rgb",
    "seed_pipeline",
    "seed_worker",
    "train_transform",
]
