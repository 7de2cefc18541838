"""Data sources, long-tail subsampling, image loading and the synthetic default dataset."""

from fopro.data.augment import AugmentConfig, resolve_augment
from fopro.data.images import ImageDataset, checked_dataset, load_image
from fopro.data.longtail import longtail_counts, longtail_indices
from fopro.data.manifest import Manifest
from fopro.data.sources import ISIC2019_CLASSES, DataOptions, Splits, load_splits, subsample_longtail
from fopro.data.unlabeled import read_unlabeled

__all__ = [
    "AugmentConfig",
    "DataOptions",
    "ISIC2019_CLASSES",
    "ImageDataset",
    "Manifest",
    "Splits",
    "checked_dataset",
    "load_image",
    "load_splits",
    "longtail_counts",
    "longtail_indices",
    "read_unlabeled",
    "resolve_augment",
    "subsample_longtail",
]
