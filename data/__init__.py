"""Data pipeline: datasets for the reference layouts, transforms, Mixup, samplers and loaders.

Typical use by the training driver::

    from data import build_loader
    loaders = build_loader(config, rank, world_size)
    for epoch in range(start_epoch, epochs):
        loaders.train_sampler.set_epoch(epoch)
        for images, targets in loaders.train_loader:
            if loaders.mixup_fn is not None:
                images, targets = loaders.mixup_fn(images, targets)
"""
from data.build import Loaders, build_dataset, build_loader
from data.datasets import FolderDataset, ImageDataset, ImageListDataset, ZipDataset
from data.digits import digits_ready, prepare_digits
from data.errors import DataError
from data.samplers import (DistributedTrainSampler, ResumableSampler, SeededSampler, ShardedEvalSampler,
                           ShardTrainSampler)
from data.transforms import build_mixup, build_transform
from data.ziparchive import make_zip_dataset

__all__ = [
    "DataError",
    "DistributedTrainSampler",
    "FolderDataset",
    "ImageDataset",
    "ImageListDataset",
    "Loaders",
    "ResumableSampler",
    "SeededSampler",
    "ShardTrainSampler",
    "ShardedEvalSampler",
    "ZipDataset",
    "build_dataset",
    "build_loader",
    "build_mixup",
    "build_transform",
    "digits_ready",
    "make_zip_dataset",
    "prepare_digits",
]
