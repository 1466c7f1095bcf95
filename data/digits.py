"""A small real dataset for demos and tests: scikit-learn's handwritten digits as image files.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 scans of handwritten digits (10 classes, ink
intensity 0..16) inside the package, so no download is needed. :func:`prepare_digits` writes them as
dark ink on white, upscaled to 32x32 RGB JPEGs, in both layouts in one root:

    root/train/<digit>/<index>.jpg, root/val/<digit>/<index>.jpg     (class folders "0".."9")
    root/train.zip, root/val.zip, root/train_map.txt, root/val_map.txt

with a fixed stratified split of 1,497 training and 300 validation images.
"""
import logging
import os
import shutil
from typing import Tuple

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


def digits_ready(root: str) -> bool:
    """Whether ``root`` holds a completely prepared digits dataset."""
    return os.path.isfile(os.path.join(root, COMPLETE_MARKER))


def prepare_digits(root: str) -> None:
    """Writes the digits dataset into ``root`` (folder and zip layouts); does nothing if it is there.

    Everything is written into a temporary sibling folder that is renamed to ``root`` when complete,
    so an interrupted preparation leaves no half-written ``root`` and is simply redone.

    Raises:
        DataError: ``root`` is an empty string, or a non-empty folder that is not a prepared digits dataset.
    """
    if not root:
        raise DataError("no folder given for the digits dataset: set DATA.DATA_PATH (--data-path DIR)")
    if digits_ready(root):
        logger.info("digits dataset already prepared in %s", root)
        return
    if os.path.isdir(root) and os.listdir(root):
        raise DataError(f"{root} is not empty and holds no prepared digits dataset (no {COMPLETE_MARKER} file). "
                        "Remove it or prepare the digits into another folder.")
    root = os.path.abspath(root)
    # One preparation at a time per root (build_loader lets only rank 0 prepare); whatever an interrupted
    # one left in the staging folder is discarded here.
    staging = f"{root}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        counts = _write_folders(staging)
        make_zip_dataset(staging, staging)
        open(os.path.join(staging, COMPLETE_MARKER), "w").close()
        os.replace(staging, root)  # also replaces an empty folder at root
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("prepared the digits dataset in %s: %d train and %d val images", root, counts[0], counts[1])


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
