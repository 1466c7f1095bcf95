"""Datasets and loaders from the config: the entry points the training driver calls.

The data flows one way through the package: a source of images (``datasets``, with ``layout``, ``ziparchive``;
``shards`` for tar shards; ``simmim`` picks SimMIM's sources) -> decoding (``decode``) -> the transform
(``transforms``, ``masking``, and on the device ``device_transforms`` with ``device_ops``) -> a pipeline and its
loader (``pipelines``, ``samplers``) -> this module, which builds them from the config.
"""
import atexit
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
from timm.data import Mixup
from torch.utils.data import DataLoader, Sampler
from yacs.config import CfgNode

from config import IMAGENET22K_NUM_CLASSES, ConfigError
from data.datasets import FolderDataset, ImageDataset, ImageListDataset, Transform, ZipDataset
from data.digits import digits_ready, holds_other_data, prepare_digits
from data.errors import DataError
from data.layout import (FOLDER_LAYOUT, IMAGENET22K_LAYOUT, IMAGENET22K_TRAIN_LIST, IMAGENET22K_VAL_LIST, ZIP_LAYOUT,
                         find_classes, read_map_file)
from data.pipelines import Pipeline, resolve_pipeline
from data.samplers import (DistributedTrainSampler, FixedSeedSampler, ResumableSampler, SeededSampler,
                           ShardedEvalSampler, ShardOrderSampler, ShardTrainSampler)
from data.shards import INDEX_NAME, SHARDS_LAYOUT, ShardDataset, is_url, join
from data.simmim import VAL_MASK_SEED, build_simmim_datasets
from data.transforms import build_mixup, build_transform
from preemption import ignore_stop_signals_in_worker
from utils import fail_together, get_rank, is_distributed

logger = logging.getLogger(__name__)

# Batches each worker prepares ahead (torch's default, stated so that it is a decision).
PREFETCH_FACTOR = 2


@dataclass
class Loaders:
    """What :func:`build_loader` returns. The ``train_*`` fields and ``mixup_fn`` are None for eval only.

    Attributes:
        train_dataset: the training images.
        val_dataset: the validation images; ``len()`` is the number of validation images.
        train_loader: yields ``(images float (B, 3, S, S), labels int64 (B,))``, full batches only; with the
            device pipeline a ``data.pipelines.DeviceLoader`` whose images are on the training device already.
        val_loader: the same for validation, this rank's shard, the last batch possibly smaller.
        train_sampler: call ``set_epoch(epoch)`` before each epoch, ``skip(n)`` to resume mid-epoch.
        mixup_fn: timm Mixup/CutMix to apply to each training batch, or None.
        class_names: the name of each class, in label order.
    """

    train_dataset: Optional[ImageDataset]
    val_dataset: ImageDataset
    train_loader: Optional[Any]  # a DataLoader, or a DeviceLoader
    val_loader: Any
    train_sampler: Optional[ResumableSampler]
    mixup_fn: Optional[Mixup]
    class_names: List[str]


def build_dataset(is_train: bool, config: CfgNode, rank: int = 0, world_size: int = 1) -> ImageDataset:
    """The training or validation dataset that DATA.* selects, with its transform.

    Args:
        is_train: the training split (else validation).
        config: the frozen config.
        rank: this process's rank (zip CACHE_MODE part caches the images of this rank's shard).
        world_size: the number of processes.

    Raises:
        DataError: a missing folder or file, a wrong layout, or labels that do not fit MODEL.NUM_CLASSES.
    """
    data_path = config.DATA.DATA_PATH
    dataset_name = config.DATA.DATASET
    layout = _expected_layout(config)
    if not data_path or not (os.path.isdir(data_path) or (dataset_name == "shards" and is_url(data_path))):
        raise DataError(f"DATA.DATA_PATH {data_path!r} is not a folder. Set it with --data-path DIR."
                        f"\nExpected layout:{layout}")
    transform = build_transform(is_train, config)
    if dataset_name == "shards":
        if config.DATA.ZIP_MODE:
            raise ConfigError("DATA.ZIP_MODE is for DATA.DATASET imagenet or folder, not shards")
        dataset = _shard_dataset(is_train, config, transform)
    elif dataset_name == "imagenet22K":
        if config.DATA.ZIP_MODE:
            raise ConfigError("DATA.ZIP_MODE is for DATA.DATASET imagenet or folder, not imagenet22K")
        dataset = _imagenet22k_dataset(is_train, config, transform)
    elif dataset_name in ("imagenet", "folder"):
        if config.DATA.ZIP_MODE:
            dataset = _zip_dataset(is_train, config, transform, rank, world_size)
        else:
            dataset = _folder_dataset(is_train, config, transform)
    else:
        raise ConfigError(f"DATA.DATASET must be one of imagenet, imagenet22K, folder, shards; got {dataset_name!r}")
    # Evaluation leaves unreadable images out (engine.validate counts them), so that none is counted twice.
    dataset.replace_unreadable = is_train
    logger.info("%s data: %d images, %d classes, from %s", "train" if is_train else "val", len(dataset),
                len(dataset.class_names), dataset.describe())
    return dataset


def build_loader(config: CfgNode, rank: int = 0, world_size: int = 1, eval_only: bool = False,
                 device: Optional[torch.device] = None) -> Loaders:
    """Datasets, samplers and loaders for training and validation (or validation only).

    Each process loads DATA.BATCH_SIZE images per batch. Training shuffles from SEED + epoch and drops
    the last partial batch; validation gives each rank a disjoint shard covering every image exactly
    once (TEST.SHUFFLE shuffles inside the shard unless TEST.SEQUENTIAL). With DATA.PREPARE_DIGITS the
    digits demo set is first written into DATA.DATA_PATH if that folder is missing or empty.

    Args:
        device: the training device (default: this process's CUDA device, else the CPU); with DATA.PIPELINE
            device (or auto on CUDA) the loaders decode and transform there and yield batches on it.
    """
    if config.DATA.PREPARE_DIGITS:
        _prepare_digits_once(config.DATA.DATA_PATH)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    pipeline = Pipeline(resolve_pipeline(config.DATA.PIPELINE, device), device)
    logger.info("data pipeline: %s (DATA.PIPELINE %s)", pipeline.name, config.DATA.PIPELINE)
    if config.TRAIN.OBJECTIVE == "simmim":
        train_dataset, val_dataset = build_simmim_datasets(config, rank, world_size)
        val_sampler = FixedSeedSampler(_val_sampler(val_dataset, config, rank, world_size), VAL_MASK_SEED)
        val_loader = _data_loader(val_dataset, val_sampler, config, pipeline, drop_last=False)
        if eval_only:
            return Loaders(None, val_dataset, None, val_loader, None, None, [])
        train_loader, train_sampler = _train_loader(train_dataset, config, rank, world_size, pipeline)
        return Loaders(train_dataset, val_dataset, train_loader, val_loader, train_sampler, None, [])
    if eval_only:
        val_dataset = build_dataset(False, config, rank, world_size)
        val_loader = _val_loader(val_dataset, config, rank, world_size, pipeline)
        return Loaders(None, val_dataset, None, val_loader, None, None, val_dataset.class_names)

    mixup_fn = build_mixup(config)
    train_dataset = build_dataset(True, config, rank, world_size)
    train_loader, train_sampler = _train_loader(train_dataset, config, rank, world_size, pipeline)
    val_dataset = build_dataset(False, config, rank, world_size)
    val_loader = _val_loader(val_dataset, config, rank, world_size, pipeline)
    return Loaders(train_dataset, val_dataset, train_loader, val_loader, train_sampler, mixup_fn,
                   train_dataset.class_names)


def _train_loader(train_dataset: ImageDataset, config: CfgNode, rank: int, world_size: int,
                  pipeline: Pipeline) -> Tuple[DataLoader, ResumableSampler]:
    """The training loader (full batches, resumable order, per-sample augmentation seeds) and its sampler."""
    train_sampler: ResumableSampler
    if isinstance(train_dataset, ShardDataset):
        train_sampler = ShardOrderSampler(train_dataset.shard_sizes, rank, world_size, config.SEED)
    elif config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == "part":
        train_sampler = ShardTrainSampler(len(train_dataset), rank, world_size, config.SEED)
    else:
        train_sampler = DistributedTrainSampler(len(train_dataset), rank, world_size, config.SEED)
    if len(train_sampler) < config.DATA.BATCH_SIZE:
        raise DataError(f"each process gets {len(train_sampler)} training images per epoch, fewer than one batch "
                        f"of DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} (incomplete batches are dropped), so "
                        "no step would run. Lower --batch-size or use more data.")
    # Each sample's augmentation is seeded from (seed, epoch, image index), so a resumed run repeats it exactly.
    seeded = SeededSampler(train_sampler, seed=config.SEED)
    generator = torch.Generator()
    generator.manual_seed(config.SEED + rank)  # the loader's own draws leave the global stream alone
    loader = _data_loader(train_dataset, seeded, config, pipeline, drop_last=True, generator=generator)
    return loader, train_sampler


def _val_sampler(val_dataset: ImageDataset, config: CfgNode, rank: int, world_size: int) -> ShardedEvalSampler:
    """This rank's shard of the validation set, every image exactly once over all ranks."""
    shuffle_val = config.TEST.SHUFFLE and not config.TEST.SEQUENTIAL
    return ShardedEvalSampler(len(val_dataset), rank, world_size, shuffle_val, config.SEED)


def _val_loader(val_dataset: ImageDataset, config: CfgNode, rank: int, world_size: int, pipeline: Pipeline):
    return _data_loader(val_dataset, _val_sampler(val_dataset, config, rank, world_size), config, pipeline,
                        drop_last=False)


# The loaders with worker processes, so that their workers are stopped before the interpreter exits.
_LOADERS_WITH_WORKERS: "weakref.WeakSet[DataLoader]" = weakref.WeakSet()


def _stop_loader_workers() -> None:
    """Stops the persistent workers of every loader still alive, the way a finished loader does.

    Workers ignore SIGTERM (the training process handles it), so the terminate-and-join that multiprocessing
    runs at exit would wait for them forever; a run that ends with an error (whose traceback can keep the
    loaders alive in a reference cycle) would hang instead of exiting. Registered after multiprocessing's
    exit handler, this one runs before it.
    """
    for loader in list(_LOADERS_WITH_WORKERS):
        iterator = getattr(loader, "_iterator", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


atexit.register(_stop_loader_workers)


def _data_loader(dataset: ImageDataset, sampler: Sampler, config: CfgNode, pipeline: Pipeline, drop_last: bool,
                 generator: Optional[torch.Generator] = None):
    """The loader of ``dataset`` through ``pipeline`` (a DataLoader, or for the device pipeline a loader that
    yields batches decoded and transformed on the device)."""
    workers = config.DATA.NUM_WORKERS
    if generator is None:
        # A loader without a generator of its own draws its workers' base seed from the process's torch stream (a
        # persistent one on its first pass only), which would shift the training's random draws after a resume.
        generator = torch.Generator()
        generator.manual_seed(config.SEED)
    loader = DataLoader(
        pipeline.worker_dataset(dataset),
        batch_size=config.DATA.BATCH_SIZE,
        sampler=sampler,
        num_workers=workers,
        collate_fn=pipeline.collate_fn,
        pin_memory=config.DATA.PIN_MEMORY and torch.cuda.is_available() and pipeline.name == "workers",
        drop_last=drop_last,
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
        generator=generator,
        worker_init_fn=ignore_stop_signals_in_worker,  # the training process handles Ctrl-C and SIGTERM
    )
    if workers > 0:
        _LOADERS_WITH_WORKERS.add(loader)
    return pipeline.loader(loader, dataset)


def _expected_layout(config: CfgNode) -> str:
    if config.DATA.DATASET == "imagenet22K":
        return IMAGENET22K_LAYOUT
    if config.DATA.DATASET == "shards":
        return SHARDS_LAYOUT
    return ZIP_LAYOUT if config.DATA.ZIP_MODE else FOLDER_LAYOUT


def _folder_dataset(is_train: bool, config: CfgNode, transform: Transform) -> FolderDataset:
    data_path = config.DATA.DATA_PATH
    split_dir = os.path.join(data_path, "train" if is_train else "val")
    if not os.path.isdir(split_dir):
        hint = ""
        if os.path.isfile(os.path.join(data_path, "train.zip")):
            hint = " The folder holds train.zip: for the zip layout pass --zip (DATA.ZIP_MODE True)."
        raise DataError(f"{split_dir} not found.{hint}\nExpected layout:{FOLDER_LAYOUT}")
    # Labels always follow the training classes, so that both splits number them the same way.
    train_dir = os.path.join(data_path, "train")
    class_dir = train_dir if os.path.isdir(train_dir) else split_dir
    class_names = find_classes(class_dir)
    if len(class_names) != config.MODEL.NUM_CLASSES:
        raise DataError(_class_count_message(config.MODEL.NUM_CLASSES, len(class_names),
                                             f"{class_dir} has {len(class_names)} class folders"))
    return FolderDataset(split_dir, class_names, transform, config.DATA.MAX_BAD_FRACTION)


def _zip_dataset(is_train: bool, config: CfgNode, transform: Transform, rank: int, world_size: int) -> ZipDataset:
    data_path = config.DATA.DATA_PATH
    split = "train" if is_train else "val"
    zip_path = os.path.join(data_path, f"{split}.zip")
    map_path = os.path.join(data_path, f"{split}_map.txt")
    if not os.path.isfile(zip_path):
        hint = ""
        if os.path.isdir(os.path.join(data_path, split)):
            hint = f" The folder holds {split}/: for the folder layout leave out --zip (DATA.ZIP_MODE False)."
        raise DataError(f"{zip_path} not found.{hint}\nExpected zip layout:{ZIP_LAYOUT}")
    names, labels = read_map_file(map_path)
    _check_labels(config.MODEL.NUM_CLASSES, labels, map_path, exact=is_train)
    cache_indices = None
    if config.DATA.CACHE_MODE == "full":
        cache_indices = np.arange(len(names))
    elif config.DATA.CACHE_MODE == "part":
        cache_indices = np.arange(rank, len(names), world_size)
    class_names = [str(label) for label in range(config.MODEL.NUM_CLASSES)]
    return ZipDataset(zip_path, names, labels, class_names, transform, config.DATA.MAX_BAD_FRACTION,
                      cache_indices)


def _shard_dataset(is_train: bool, config: CfgNode, transform: Transform) -> ShardDataset:
    dataset = ShardDataset(join(config.DATA.DATA_PATH, "train" if is_train else "val"), transform,
                           config.DATA.MAX_BAD_FRACTION)
    if is_train and len(dataset.class_names) != config.MODEL.NUM_CLASSES:
        raise DataError(_class_count_message(config.MODEL.NUM_CLASSES, len(dataset.class_names),
                                             f"{join(dataset.root, INDEX_NAME)} lists {len(dataset.class_names)} "
                                             "classes"))
    _check_labels(config.MODEL.NUM_CLASSES, dataset.labels, join(dataset.root, INDEX_NAME), exact=False)
    logger.info("%s shards: %d in %s, content hash %s", "train" if is_train else "val", len(dataset.shard_sizes),
                dataset.root, dataset.index.content_hash[:16])
    return dataset


def _imagenet22k_dataset(is_train: bool, config: CfgNode, transform: Transform) -> ImageListDataset:
    if config.MODEL.NUM_CLASSES != IMAGENET22K_NUM_CLASSES:
        raise DataError(_class_count_message(config.MODEL.NUM_CLASSES, IMAGENET22K_NUM_CLASSES,
                                             f"ImageNet-22K has {IMAGENET22K_NUM_CLASSES} classes"))
    data_path = config.DATA.DATA_PATH
    list_file = os.path.join(data_path, IMAGENET22K_TRAIN_LIST if is_train else IMAGENET22K_VAL_LIST)
    class_names = [str(label) for label in range(IMAGENET22K_NUM_CLASSES)]
    dataset = ImageListDataset(data_path, list_file, class_names, transform, config.DATA.MAX_BAD_FRACTION)
    _check_labels(IMAGENET22K_NUM_CLASSES, dataset.labels, list_file, exact=False)
    return dataset


def _check_labels(num_classes: int, labels: np.ndarray, source: str, exact: bool) -> None:
    """Checks that labels fit ``num_classes``; with ``exact``, that they use 0..num_classes-1 up to the top."""
    lowest, found = int(labels.min()), int(labels.max()) + 1
    if lowest < 0:
        raise DataError(f"{source} has the negative label {lowest}; labels must be 0 .. MODEL.NUM_CLASSES - 1")
    if found > num_classes or (exact and found != num_classes):
        raise DataError(_class_count_message(num_classes, found, f"{source} has labels 0..{found - 1}"))
    distinct = len(np.unique(labels))
    if exact and distinct != found:
        logger.warning("%s uses only %d distinct labels of 0..%d", source, distinct, found - 1)


def _class_count_message(configured: int, found: int, what: str) -> str:
    return (f"MODEL.NUM_CLASSES is {configured} but the data has {found} classes ({what}). Make them agree: "
            f"set --opts MODEL.NUM_CLASSES {found} (or NUM_CLASSES: {found} under MODEL in the config file), "
            "or fix the data.")


def _prepare_digits_once(root: str) -> None:
    """Prepares the digits demo set in ``root`` if that folder is missing or empty. A folder holding anything else is
    your own dataset (the demo config pointed at your data) and is used as it is.

    Under torchrun the first process of each machine (LOCAL_RANK 0) looks and prepares while the others wait, and
    all of them agree on the outcome before any reads the data. Each process must enter the agreement whatever it
    sees on the disk: one that looked after the preparation had finished would otherwise skip the wait that the
    others are in. Several machines sharing a file system take turns under the preparation's own lock.
    """
    with fail_together("preparing the digits demo set"):
        if not is_distributed() or int(os.environ.get("LOCAL_RANK", get_rank())) == 0:
            _prepare_digits_here(root)


def _prepare_digits_here(root: str) -> None:
    if digits_ready(root):
        return
    if holds_other_data(root):
        logger.info("DATA.PREPARE_DIGITS: %s holds other data than the digits demo set; using it as it is", root)
        return
    prepare_digits(root)
