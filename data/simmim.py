"""The sources of SimMIM pretraining: any folder of images (labels ignored), or the zip layout. ``data.build``
makes the loaders from them, as for classification.

Where the images are, for DATA.DATA_PATH:

- ``--zip``: ``train.zip`` + ``train_map.txt`` (and ``val.zip`` + ``val_map.txt`` if present); labels unused.
- a folder with ``train/`` (and optionally ``val/``): the images anywhere below each of them;
- any other folder (the reference's pretraining passes ``imagenet/train`` itself): every image below it,
  in class folders or not;
- ``DATA.DATASET shards``: tar shards (``train/``, optionally ``val/``), in a folder or at a URL; labels unused.

Without a validation split, "validation" measures the reconstruction loss on up to
:data:`MAX_VAL_FROM_TRAIN` training images, evenly spaced through them, with the evaluation transform.
Validation masks are drawn per image from a fixed seed, so every evaluation of a run masks the same squares.
Items are ``((image, mask), label)``; the label is the class folder's index, or 0, and only marks unreadable
images (negative) in validation.
"""
import logging
import os
from typing import BinaryIO, Optional, Sequence, Tuple

import numpy as np
from yacs.config import CfgNode

from data.datasets import FilesDataset, ImageDataset, Transform, ZipDataset
from data.errors import DataError
from data.layout import ZIP_LAYOUT, _folder_id, _images_under, read_map_file
from data.masking import build_simmim_transform
from data.shards import INDEX_NAME, ShardDataset, ShardStore, is_url, join

logger = logging.getLogger(__name__)

# Without a validation split, at most this many training images (evenly spaced) are used to validate.
MAX_VAL_FROM_TRAIN = 1000
# Validation mask seeds: this plus the image index (another range than the training seeds').
VAL_MASK_SEED = 10 ** 9

PRETRAIN_LAYOUT = """
    DATA_PATH/<any folders>/<image>     every image below DATA_PATH, labels (folders) ignored, or
    DATA_PATH/train/..., DATA_PATH/val/...   the class-folder layout (val/ optional), or
    --zip: DATA_PATH/train.zip with train_map.txt (val.zip, val_map.txt optional), or
    DATA.DATASET shards: DATA_PATH/train/index.json ... (val/ optional), written by tools/make_shards.py"""


class UnlabelledImageFolder(FilesDataset):
    """Every image below ``root`` (sorted; links followed, each real folder once), all with label 0."""

    def __init__(self, root: str, transform: Optional[Transform] = None, max_bad_fraction: float = 0.01):
        self.root = root
        self._paths = _images_under(root, {_folder_id(root)})
        if not self._paths:
            raise DataError(f"no image found below {root}.\nExpected layout for pretraining:{PRETRAIN_LAYOUT}")
        super().__init__(np.zeros(len(self._paths), dtype=np.int64), ["image"], transform, max_bad_fraction)


class ImageSubset(ImageDataset):
    """Some images of another dataset (read through it), with their own transform."""

    def __init__(self, base: ImageDataset, indices: Sequence[int], transform: Optional[Transform]):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        super().__init__(base.labels[self.indices], base.class_names, transform, base.max_bad_fraction)

    def describe(self) -> str:
        return f"{len(self.indices)} of the images of {self.base.describe()}"

    def image_path(self, index: int) -> str:
        return self.base.image_path(int(self.indices[index]))

    def open_image(self, index: int) -> BinaryIO:
        return self.base.open_image(int(self.indices[index]))


def _zip_split(config: CfgNode, split: str, transform: Transform, rank: int, world_size: int) -> Optional[ZipDataset]:
    data_path = config.DATA.DATA_PATH
    zip_path, map_path = os.path.join(data_path, f"{split}.zip"), os.path.join(data_path, f"{split}_map.txt")
    if not os.path.isfile(zip_path):
        if split == "val":
            return None
        raise DataError(f"{zip_path} not found.\nExpected zip layout:{ZIP_LAYOUT}")
    names, labels = read_map_file(map_path)
    cache_indices = {"full": np.arange(len(names)), "part": np.arange(rank, len(names), world_size)}.get(
        config.DATA.CACHE_MODE)
    return ZipDataset(zip_path, names, np.zeros_like(labels), ["image"], transform, config.DATA.MAX_BAD_FRACTION,
                      cache_indices)


def _folder_split(config: CfgNode, split: str, transform: Transform) -> Optional[UnlabelledImageFolder]:
    data_path = config.DATA.DATA_PATH
    train_dir = os.path.join(data_path, "train")
    if not os.path.isdir(train_dir):  # the folder itself is the training set (the reference's pretraining)
        return UnlabelledImageFolder(data_path, transform, config.DATA.MAX_BAD_FRACTION) if split == "train" else None
    split_dir = os.path.join(data_path, split)
    if not os.path.isdir(split_dir):
        return None
    return UnlabelledImageFolder(split_dir, transform, config.DATA.MAX_BAD_FRACTION)


def _shard_split(root: str, transform: Transform, max_bad_fraction: float) -> Optional[ShardDataset]:
    """The shards at ``root``, or None when there is no index there (a damaged one still stops the run)."""
    store = ShardStore(root)
    try:
        store.read_file(INDEX_NAME)
    except FileNotFoundError:
        return None
    except Exception:  # any other trouble is reported by load_index, with the file named
        pass
    return ShardDataset(root, transform, max_bad_fraction)


def build_simmim_datasets(config: CfgNode, rank: int = 0,
                          world_size: int = 1) -> Tuple[ImageDataset, ImageDataset]:
    """The pretraining images and the validation images (see the module docstring), with their transforms."""
    data_path = config.DATA.DATA_PATH
    shards = config.DATA.DATASET == "shards"
    if not data_path or not (os.path.isdir(data_path) or (shards and is_url(data_path))):
        raise DataError(f"DATA.DATA_PATH {data_path!r} is not a folder. Set it with --data-path DIR."
                        f"\nExpected layout for pretraining:{PRETRAIN_LAYOUT}")
    train_transform = build_simmim_transform(True, config)
    eval_transform = build_simmim_transform(False, config)
    if shards:
        train = ShardDataset(join(data_path, "train"), train_transform, config.DATA.MAX_BAD_FRACTION)
        val = _shard_split(join(data_path, "val"), eval_transform, config.DATA.MAX_BAD_FRACTION)
    elif config.DATA.ZIP_MODE:
        train = _zip_split(config, "train", train_transform, rank, world_size)
        val = _zip_split(config, "val", eval_transform, rank, world_size)
    else:
        train = _folder_split(config, "train", train_transform)
        val = _folder_split(config, "val", eval_transform)
    if val is None:
        count = min(len(train), MAX_VAL_FROM_TRAIN)
        indices = np.linspace(0, len(train) - 1, count).round().astype(np.int64)
        val = ImageSubset(train, indices, eval_transform)
        logger.info("no validation split: the reconstruction loss is measured on %d training images", count)
    val.replace_unreadable = False  # evaluation leaves unreadable images out, as for classification
    logger.info("pretraining data: %d images from %s (labels unused); validation: %d images from %s", len(train),
                train.describe(), len(val), val.describe())
    return train, val
