"""Image datasets for the three layouts (class folders, zip + map files, ImageNet-22K JSON lists).

All of them share :class:`ImageDataset`, which decodes images, applies the transform and handles
unreadable images: each one is logged with its path, counted, and, for training, replaced by the next
readable image (index + 1, + 2, ...), so a run survives a few broken files. For evaluation
(``replace_unreadable`` False) it is left out instead: its item carries the label
:func:`unreadable_label` of its index, which ``engine.validate`` recognises, so that no image is counted
twice. Counts are per process (each DataLoader worker counts what it reads). The run stops with
:class:`DataError` once at least :data:`MIN_BAD_TO_STOP` images were unreadable and they are more than
``max_bad_fraction`` of the images read; ``max_bad_fraction`` 0 stops at the first unreadable image.
"""
import contextlib
import io
import json
import logging
import os
import random
from typing import Any, BinaryIO, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.decode import UNREADABLE_ERRORS, decode_image  # noqa: F401 (also imported from here)
from data.errors import DataError
from data.layout import IMAGENET22K_LAYOUT, scan_images
from data.ziparchive import MemberCache, ZipMembers

logger = logging.getLogger(__name__)

# Fewer unreadable images than this never stop a run (unless the limit is 0): a handful of bad files
# early in an epoch says little about the fraction over the whole dataset.
MIN_BAD_TO_STOP = 5

Transform = Callable[[Image.Image], torch.Tensor]


def unreadable_label(index: int) -> int:
    """The label of the item of an unreadable image ``index`` when images are not replaced: negative."""
    return -1 - index


def unreadable_index(label: int) -> int:
    """The image index that :func:`unreadable_label` gave ``label`` for."""
    return -1 - label


class PackedStrings:
    """A read-only list of strings kept in two numpy arrays.

    A DataLoader worker that reads a Python object writes to its reference count, which copies the
    memory page holding it; a list of a million paths therefore ends up copied into every worker.
    Two flat arrays are shared between forked workers for as long as nobody writes to them.
    """

    def __init__(self, strings: Sequence[str]):
        encoded = [text.encode("utf-8") for text in strings]
        self._ends = np.cumsum([len(item) for item in encoded], dtype=np.int64)
        self._data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> str:
        end = int(self._ends[index])
        start = int(self._ends[index - 1]) if index > 0 else 0
        return self._data[start:end].tobytes().decode("utf-8")


def too_many_bad(num_bad: int, num_read: int, max_bad_fraction: float) -> bool:
    """The stopping rule for unreadable images (see the module docstring)."""
    if num_bad == 0:
        return False
    if max_bad_fraction <= 0:
        return True
    return num_bad >= MIN_BAD_TO_STOP and num_bad > max_bad_fraction * num_read


@contextlib.contextmanager
def seeded_random_streams(seed: int):
    """Seeds Python's, NumPy's and torch's (CPU) global random streams, which the transforms draw from, for the
    duration of the block, then puts back what was there, so the caller's streams do not move.

    Only torch's CPU generator is seeded (as ``torch.manual_seed`` seeds it): the transforms draw on the CPU,
    and ``torch.manual_seed`` would also reach every accelerator's generator, which costs about a millisecond
    a call (a tenth of what a worker spends on an image). In a loader worker, whose streams serve nothing but
    the transforms, nothing is put back (saving and restoring the states costs as much as seeding).
    """
    in_worker = torch.utils.data.get_worker_info() is not None
    if not in_worker:
        python_state, numpy_state = random.getstate(), np.random.get_state()
        torch_state = torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if not in_worker:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            torch.default_generator.set_state(torch_state)


class ImageDataset(Dataset):
    """Images with integer class labels; subclasses say where the bytes of image ``index`` come from.

    Args:
        labels: the label of each image.
        class_names: the name of each class, in label order.
        transform: applied to the decoded RGB PIL image.
        max_bad_fraction: the stopping limit for unreadable images.

    Items are ``(transform(image), label)``.

    Attributes:
        replace_unreadable: True (training): an unreadable image is replaced by the next readable one. False
            (evaluation): its item is ``(transform(a 1x1 black image), unreadable_label(index))``.
    """

    def __init__(self, labels: np.ndarray, class_names: List[str], transform: Optional[Transform],
                 max_bad_fraction: float):
        if len(labels) == 0:
            raise DataError(f"{self.describe()} holds no image")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.transform = transform
        self.max_bad_fraction = max_bad_fraction
        self.num_read = 0
        self.num_bad = 0
        self.last_bad = ""
        self.replace_unreadable = True

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: Union[int, Tuple[int, int]]) -> Tuple[torch.Tensor, int]:
        """Item ``index``, or ``(index, seed)`` to draw its random augmentation from ``seed`` alone."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, label, _ = self.read(index)
        if self.transform is not None:
            with seeded_random_streams(seed) if seed is not None else contextlib.nullcontext():
                image = self.transform(image)
        return image, label

    def __getitems__(self, items: Sequence[Union[int, Tuple[int, int]]]) -> List[Tuple[torch.Tensor, int]]:
        """The items of a batch (the DataLoader asks for a whole batch at once): :meth:`prefetch`, then each item."""
        self.prefetch([item[0] if isinstance(item, tuple) else item for item in items])
        return [self[item] for item in items]

    def prefetch(self, indices: Sequence[int]) -> None:
        """Says that images ``indices`` are read next: a remote source fetches their bytes in one round of
        concurrent requests instead of one request after the other. Nothing to do for local files."""

    def read(self, index: int, decode: Callable[[BinaryIO], Any] = decode_image) -> Tuple[Any, int, int]:
        """Image ``index`` read by ``decode`` under the unreadable-image policy (see the module docstring).

        Args:
            index: the image wanted.
            decode: turns the encoded stream into what the pipeline works on (a PIL image by default); raises
                one of ``UNREADABLE_ERRORS`` for an image that cannot be read.

        Returns:
            What ``decode`` returned (for an unreadable image in evaluation, a black 1x1 PIL image), its label
            (:func:`unreadable_label` for that image) and the index of the image actually read.
        """
        if self.replace_unreadable:
            image, used = self._first_readable(index, decode)
            return image, int(self.labels[used]), used
        image, label = self._readable_or_blank(index, decode)
        return image, label, index

    @property
    def targets(self) -> List[int]:
        """The labels as a list, as torchvision's datasets name them."""
        return self.labels.tolist()

    def describe(self) -> str:
        """Where the images come from, for messages."""
        raise NotImplementedError

    def image_path(self, index: int) -> str:
        """Where image ``index`` is, for messages."""
        raise NotImplementedError

    def open_image(self, index: int) -> BinaryIO:
        """A binary stream over the encoded bytes of image ``index``."""
        raise NotImplementedError

    def _first_readable(self, index: int, decode: Callable[[BinaryIO], Any]) -> Tuple[Any, int]:
        """The image at ``index`` or, when it cannot be decoded, the next readable one after it."""
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            self.num_read += 1
            try:
                with self.open_image(candidate) as stream:
                    return decode(stream), candidate
            except UNREADABLE_ERRORS as error:
                self.count_bad(candidate, error)
        raise DataError(f"no image of {self.describe()} can be read")

    def _readable_or_blank(self, index: int, decode: Callable[[BinaryIO], Any]) -> Tuple[Any, int]:
        """The image at ``index`` and its label or, when it cannot be decoded, a black 1x1 image (the transform
        brings it to the right size) and :func:`unreadable_label`."""
        self.num_read += 1
        try:
            with self.open_image(index) as stream:
                return decode(stream), int(self.labels[index])
        except UNREADABLE_ERRORS as error:
            self.count_bad(index, error)
        return Image.new("RGB", (1, 1)), unreadable_label(index)

    def count_bad(self, index: int, error: BaseException) -> None:
        """Logs and counts one unreadable image; raises DataError past the limit."""
        self.num_bad += 1
        self.last_bad = self.image_path(index)
        self.warn_unreadable(index, error)
        if too_many_bad(self.num_bad, self.num_read, self.max_bad_fraction):
            raise DataError(
                f"{self.num_bad} of the {self.num_read} images read in this process "
                f"({self.num_bad / self.num_read:.1%}) could not be decoded, more than "
                f"DATA.MAX_BAD_FRACTION = {self.max_bad_fraction}. The last one was {self.last_bad} "
                f"({type(error).__name__}: {error}). Replace or delete the broken files (the warnings above "
                f"list them), or raise the limit, e.g. --opts DATA.MAX_BAD_FRACTION 0.05.")

    def warn_unreadable(self, index: int, error: BaseException) -> None:
        """The warning for one unreadable image (a source that loses many at once may say it once)."""
        logger.warning("unreadable image %s (%s: %s); %s. %d of %d images read in this process were unreadable.",
                       self.image_path(index), type(error).__name__, error,
                       "using the next image instead" if self.replace_unreadable else "left out of the evaluation",
                       self.num_bad, self.num_read)


class FilesDataset(ImageDataset):
    """Images stored as files at the paths ``self._paths``, relative to the folder ``self.root``."""

    def describe(self) -> str:
        return self.root

    def image_path(self, index: int) -> str:
        return os.path.join(self.root, self._paths[index])

    def open_image(self, index: int) -> BinaryIO:
        return open(self.image_path(index), "rb")


class FolderDataset(FilesDataset):
    """A split folder with one sub-folder per class (``<split_dir>/<class>/<image>``).

    Args:
        split_dir: the split folder, e.g. ``DATA_PATH/train``.
        class_names: the classes in label order (those of ``DATA_PATH/train``).
    """

    def __init__(self, split_dir: str, class_names: List[str], transform: Optional[Transform] = None,
                 max_bad_fraction: float = 0.01):
        self.root = split_dir
        paths, labels = scan_images(split_dir, class_names)
        self._paths = PackedStrings(paths)
        super().__init__(labels, class_names, transform, max_bad_fraction)


class ZipDataset(ImageDataset):
    """Images inside a zip file, listed with their labels by a map file (the reference's zip mode).

    Args:
        zip_path: e.g. ``DATA_PATH/train.zip``.
        names: the member name of each image.
        labels: the label of each image.
        class_names: the classes in label order.
        cache_indices: images whose encoded bytes are loaded into memory now (None: read each from the
            zip every time). The others are read from the zip when needed.

    The zip is opened lazily in each process that reads from it: an open file handle shared through
    fork would have its position moved by every worker at once.
    """

    def __init__(self, zip_path: str, names: Sequence[str], labels: np.ndarray, class_names: List[str],
                 transform: Optional[Transform] = None, max_bad_fraction: float = 0.01,
                 cache_indices: Optional[np.ndarray] = None):
        self.zip_path = zip_path
        self._names = PackedStrings(names)
        self._members = ZipMembers(zip_path, names)
        super().__init__(labels, class_names, transform, max_bad_fraction)
        self._cache = MemberCache(self._members, cache_indices) if cache_indices is not None else None
        self._file: Optional[BinaryIO] = None
        self._file_pid = -1

    def describe(self) -> str:
        return self.zip_path

    def image_path(self, index: int) -> str:
        return f"{self.zip_path}@/{self._names[index]}"

    def open_image(self, index: int) -> BinaryIO:
        data = self._cache.get(index) if self._cache is not None else None
        if data is None:
            data = self._members.read(self._zip_file(), index)
        return io.BytesIO(data)

    def _zip_file(self) -> BinaryIO:
        """This process's handle on the zip file, opened on first use."""
        if self._file is None or self._file_pid != os.getpid():
            self._file = open(self.zip_path, "rb")
            self._file_pid = os.getpid()
        return self._file

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None  # a file handle cannot be pickled (spawned workers open their own)
        return state


class ImageListDataset(ImageDataset):
    """Images listed in a JSON file as ``[[path relative to root, label], ...]`` (the ImageNet-22K format).

    Args:
        root: the folder the paths are relative to.
        list_file: the JSON list.
    """

    def __init__(self, root: str, list_file: str, class_names: List[str], transform: Optional[Transform] = None,
                 max_bad_fraction: float = 0.01):
        self.root = root
        self.list_file = list_file
        paths, labels = _read_image_list(list_file)
        self._paths = PackedStrings(paths)
        super().__init__(labels, class_names, transform, max_bad_fraction)

    def describe(self) -> str:
        return self.list_file

    def image_path(self, index: int) -> str:
        return os.path.join(self.root, self._paths[index])

    def open_image(self, index: int) -> BinaryIO:
        return open(self.image_path(index), "rb")


def _read_image_list(list_file: str) -> Tuple[List[str], np.ndarray]:
    """Reads a JSON list of ``[path, label]`` pairs."""
    if not os.path.isfile(list_file):
        raise DataError(f"image list not found: {list_file}\nExpected ImageNet-22K layout:{IMAGENET22K_LAYOUT}")
    try:
        with open(list_file, encoding="utf-8") as file:
            entries = json.load(file)
        paths = [str(entry[0]) for entry in entries]
        labels = np.array([int(entry[1]) for entry in entries], dtype=np.int64)
    except (ValueError, TypeError, IndexError, KeyError) as error:
        raise DataError(f"{list_file} is not a JSON list of [image path, label int] pairs ({error})."
                        f"\nExpected ImageNet-22K layout:{IMAGENET22K_LAYOUT}") from error
    if not paths:
        raise DataError(f"{list_file} lists no image.\nExpected ImageNet-22K layout:{IMAGENET22K_LAYOUT}")
    return paths, labels
