"""A small real dataset for demos and tests: scikit-learn's handwritten digits as image files.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 scans of handwritten digits (10 classes, ink
intensity 0..16) inside the package, so no download is needed. :func:`prepare_digits` writes them as
dark ink on white, upscaled to 32x32 RGB JPEGs, in both layouts in one root:

    root/train/<digit>/<index>.jpg, root/val/<digit>/<index>.jpg     (class folders "0".."9")
    root/train.zip, root/val.zip, root/train_map.txt, root/val_map.txt

with a fixed stratified split of 1,497 training and 300 validation images.
"""
import contextlib
import fcntl
import logging
import os
import shutil
from typing import Iterator, Tuple

import numpy as np
from PIL import Image

from data.errors import DataError
from data.ziparchive import make_zip_dataset

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
NUM_VAL = 300
SPLIT_SEED = 0
JPEG_QUALITY = 95
# Written last: a root holding it is complete.
COMPLETE_MARKER = ".digits-complete"
# Marks a staging folder as made by prepare_digits (only such a folder is ever removed).
STAGING_MARKER = ".digits-staging"


def digits_ready(root: str) -> bool:
    """Whether ``root`` holds a completely prepared digits dataset."""
    return os.path.isfile(os.path.join(root, COMPLETE_MARKER))


def holds_other_data(root: str) -> bool:
    """Whether ``root`` is a folder with something in it other than a prepared digits dataset (your own data)."""
    return os.path.isdir(root) and not digits_ready(root) and bool(os.listdir(root))


def prepare_digits(root: str) -> None:
    """Writes the digits dataset into ``root`` (folder and zip layouts); does nothing if it is there.

    Everything is written into a temporary sibling folder that is renamed to ``root`` when complete,
    so an interrupted preparation leaves no half-written ``root`` and is simply redone. Preparations of
    the same ``root`` by several processes at once (two first-time demo runs) take turns through an
    exclusive lock on the sibling file ``.<name>.lock``; the later ones find the dataset prepared.

    Raises:
        DataError: ``root`` is an empty string, or a non-empty folder that is not a prepared digits dataset.
    """
    if not root:
        raise DataError("no folder given for the digits dataset: set DATA.DATA_PATH (--data-path DIR)")
    if digits_ready(root):
        logger.info("digits dataset already prepared in %s", root)
        return
    root = os.path.abspath(root)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    lock_path = os.path.join(os.path.dirname(root), f".{os.path.basename(root)}.lock")
    with _exclusive_lock(lock_path):
        if digits_ready(root):
            logger.info("digits dataset prepared in %s by another process", root)
            return
        if holds_other_data(root):
            raise DataError(f"{root} is not empty and holds no prepared digits dataset (no {COMPLETE_MARKER} "
                            "file). Remove it or prepare the digits into another folder.")
        staging = _new_staging_folder(root)
        try:
            counts = _write_folders(staging)
            make_zip_dataset(staging, staging)
            open(os.path.join(staging, COMPLETE_MARKER), "w").close()
            os.replace(staging, root)  # also replaces an empty folder at root
            os.remove(os.path.join(root, STAGING_MARKER))
        finally:
            if os.path.isfile(os.path.join(staging, STAGING_MARKER)):
                shutil.rmtree(staging, ignore_errors=True)
        # Removed only once the dataset is complete: a process still waiting on this file then finds it
        # ready, while after a failure the next preparation must queue on the same file.
        os.remove(lock_path)
    logger.info("prepared the digits dataset in %s: %d train and %d val images", root, counts[0], counts[1])


def _new_staging_folder(root: str) -> str:
    """An empty staging folder for ``root``: the hidden sibling ``.<name>.staging``, marked as this tool's by a file
    inside. What an interrupted preparation left there is discarded (under the lock no other process is writing
    there); a folder of that name without the mark is not this tool's and is left alone.

    Raises:
        DataError: a folder of the staging name exists and was not made by this tool.
    """
    staging = os.path.join(os.path.dirname(root), f".{os.path.basename(root)}.staging")
    if os.path.lexists(staging):
        if not os.path.isfile(os.path.join(staging, STAGING_MARKER)):
            raise DataError(f"{staging} exists and was not made by the digits preparation (it has no "
                            f"{STAGING_MARKER}); move it away, or prepare the digits into another folder")
        shutil.rmtree(staging)
    os.makedirs(staging)
    open(os.path.join(staging, STAGING_MARKER), "w").close()
    return staging


@contextlib.contextmanager
def _exclusive_lock(path: str) -> Iterator[None]:
    """Holds an exclusive advisory lock on ``path`` (created if needed), waiting for it if another process
    holds it. The operating system releases it when the process ends in any way."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_folders(root: str) -> Tuple[int, int]:
    """Writes the class-folder layout into ``root``; returns the (train, val) image counts."""
    # scikit-learn is only needed here; importing it lazily keeps `import data` fast.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, val = train_test_split(indices, test_size=NUM_VAL, stratify=digits.target, random_state=SPLIT_SEED)
    for split, chosen in (("train", train), ("val", val)):
        for label in range(10):
            os.makedirs(os.path.join(root, split, str(label)))
        for index in sorted(chosen):
            path = os.path.join(root, split, str(digits.target[index]), f"{index:04d}.jpg")
            _digit_image(digits.images[index]).save(path, quality=JPEG_QUALITY)
    return len(train), len(val)


def _digit_image(scan: np.ndarray) -> Image.Image:
    """An 8x8 scan with ink 0..16 as a 32x32 RGB image, dark ink on white."""
    gray = np.round(255.0 - scan * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(gray).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    return image.convert("RGB")
