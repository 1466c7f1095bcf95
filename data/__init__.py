"""Data pipeline: datasets for the reference layouts, transforms, Mixup, samplers and loaders.

The flow, one module after the other: sources (``datasets``, ``layout``, ``ziparchive``, ``shards``, ``simmim``) ->
decoding (``decode``) -> transforms (``transforms``, ``masking``; on the device ``device_transforms``,
``device_ops``) -> the pipelines and their loaders (``pipelines``, ``samplers``) -> ``build``.

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
from data.pipelines import Pipeline, resolve_pipeline
from data.samplers import (DistributedTrainSampler, FixedSeedSampler, ResumableSampler, SeededSampler,
                           ShardedEvalSampler, ShardOrderSampler, ShardTrainSampler)
from data.shards import ShardDataset
from data.transforms import build_mixup, build_transform
from data.ziparchive import make_zip_dataset

__all__ = [
    "DataError",
    "DistributedTrainSampler",
    "FixedSeedSampler",
    "FolderDataset",
    "ImageDataset",
    "ImageListDataset",
    "Loaders",
    "Pipeline",
    "ResumableSampler",
    "SeededSampler",
    "ShardDataset",
    "ShardOrderSampler",
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
    "resolve_pipeline",
]
