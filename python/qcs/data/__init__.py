"""Datasets, built-in synthetic data, transforms and quadruplet sampling."""

from .datasets import (
                       AFFECTNET_CLASSES,
                       FERPLUS_CLASSES,
                       RAF_DB_CLASSES,
                       DataError,
                       ImageDataset,
                       ImageList,
                       affectnet,
                       check_images,
                       ferplus,
                       folder,
                       load_split,
                       raf_db,
                       screen_data,
)
from .sampling import ClassIndex, TupleSampler
from .synth import SynthParams, ensure_synth, generate
from .transforms import test_transform, train_transform

__all__ = [
                       "AFFECTNET_CLASSES",
                       "FERPLUS_CLASSES",
                       "RAF_DB_CLASSES",
                       "ClassIndex",
                       "DataError",
                       "ImageDataset",
                       "ImageList",
                       "SynthParams",
                       "TupleSampler",
                       "affectnet",
                       "check_images",
                       "ensure_synth",
                       "ferplus",
                       "folder",
                       "generate",
                       "load_split",
                       "raf_db",
                       "screen_data",
                       "test_transform",
                       "train_transform",
]
