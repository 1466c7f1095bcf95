"""Where images are on disk: the expected layouts, class discovery and image scanning.

Shared by the datasets and by the zip writer so that both see exactly the same classes and files.
"""
import logging
import os
from typing import List, Sequence, Set, Tuple

import numpy as np

from data.errors import DataError

logger = logging.getLogger(__name__)

# The file endings torchvision's ImageFolder accepts, compared case-insensitively (ImageNet uses .JPEG).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

FOLDER_LAYOUT = """
    DATA_PATH/train/<class name>/<image>   one folder per class; classes are sorted by folder name
    DATA_PATH/val/<class name>/<image>     the same class folder names as train/
  Images end in one of: """ + " ".join(IMG_EXTENSIONS)

ZIP_LAYOUT = """
    DATA_PATH/train.zip       the training images
    DATA_PATH/train_map.txt   one line per image: <path inside train.zip><TAB><label int>
    DATA_PATH/val.zip
    DATA_PATH/val_map.txt     the same for val.zip
  tools/make_zip_dataset.py SRC DST writes this layout from the folder layout."""

IMAGENET22K_TRAIN_LIST = "ILSVRC2011fall_whole_map_train.txt"
IMAGENET22K_VAL_LIST = "ILSVRC2011fall_whole_map_val.txt"

IMAGENET22K_LAYOUT = """
    DATA_PATH/ILSVRC2011fall_whole_map_train.txt   JSON list of [image path relative to DATA_PATH, label int]
    DATA_PATH/ILSVRC2011fall_whole_map_val.txt     the same for the validation images"""


def is_image_file(name: str) -> bool:
    """Whether a file name looks like an image we can read (hidden files never do)."""
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def find_classes(split_dir: str) -> List[str]:
    """The class folder names of a split folder, sorted.

    Raises:
        DataError: the folder does not exist or has no class folders.
    """
    if not os.path.isdir(split_dir):
        raise DataError(f"data folder not found: {split_dir}\nExpected layout:{FOLDER_LAYOUT}")
    names = sorted(entry.name for entry in os.scandir(split_dir)
                   if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise DataError(f"{split_dir} has no class folders (images must be inside one folder per class)."
                        f"\nExpected layout:{FOLDER_LAYOUT}")
    return names


def scan_images(split_dir: str, class_names: Sequence[str]) -> Tuple[List[str], np.ndarray]:
    """Finds the images of a split folder, walking each class folder recursively like ImageFolder.

    Links to folders are followed, each real folder once: a link back up the tree (``ln -s . loop``) or to a
    folder scanned already (another class folder included) is skipped with a warning, as are sub-folders
    that cannot be listed.

    Args:
        split_dir: folder holding one sub-folder per class.
        class_names: the classes in label order; every class folder of ``split_dir`` must be among them.
            A class without a folder here is allowed (a validation split may lack some classes).

    Returns:
        The image paths relative to ``split_dir`` (``<class>/<file>``, sorted within each class) and
        their labels (int64).

    Raises:
        DataError: a class folder that is not in ``class_names``, an empty class folder, or no image at all.
    """
    present = find_classes(split_dir)
    unknown = sorted(set(present) - set(class_names))
    if unknown:
        raise DataError(f"{split_dir} has class folders that train/ does not have: {unknown[:10]}. Both splits "
                        f"need the same class folders.\nExpected layout:{FOLDER_LAYOUT}")
    paths: List[str] = []
    labels: List[int] = []
    # Every class folder counts as scanned from the start, so that a link into another class is skipped
    # instead of copying that class's images under this label.
    visited = {_folder_id(os.path.join(split_dir, name)) for name in present}
    for label, name in enumerate(class_names):
        class_dir = os.path.join(split_dir, name)
        if not os.path.isdir(class_dir):
            logger.info("%s has no folder for class %s", split_dir, name)
            continue
        found = _images_under(class_dir, visited)
        if not found:
            raise DataError(f"class folder {class_dir} holds no image. Remove the folder or add its images."
                            f"\nExpected layout:{FOLDER_LAYOUT}")
        paths.extend(os.path.join(name, relative) for relative in found)
        labels.extend([label] * len(found))
    return paths, np.asarray(labels, dtype=np.int64)


def _folder_id(path: str) -> Tuple[int, int]:
    """What identifies a real folder, whatever links lead to it."""
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _images_under(folder: str, visited: Set[Tuple[int, int]]) -> List[str]:
    """Image files below ``folder``, relative to it, in sorted order.

    Links to folders are followed unless they lead to a folder in ``visited``, which gains every folder
    walked into; each skipped folder is logged.
    """
    def skip_unlistable(error: OSError) -> None:
        logger.warning("skipped folder %s: it cannot be listed (%s)", error.filename, error.strerror)

    found = []
    for current, dirs, files in os.walk(folder, followlinks=True, onerror=skip_unlistable):
        kept = []
        for name in sorted(d for d in dirs if not d.startswith(".")):
            path = os.path.join(current, name)
            try:
                identity = _folder_id(path)
            except OSError as error:
                skip_unlistable(error)
                continue
            if identity in visited:
                logger.warning("skipped folder %s: it leads to %s, which is scanned already (a link loop or a "
                               "second link to the same folder)", path, os.path.realpath(path))
                continue
            visited.add(identity)
            kept.append(name)
        dirs[:] = kept
        relative_dir = os.path.relpath(current, folder)
        for name in sorted(files):
            if is_image_file(name):
                found.append(name if relative_dir == "." else os.path.join(relative_dir, name))
    return found


def read_map_file(map_path: str) -> Tuple[List[str], np.ndarray]:
    """Reads a zip map file: one ``<path inside the zip>\\t<label int>`` per line.

    Returns:
        The member names (a leading ``/`` removed, as the reference reads them) and their labels.

    Raises:
        DataError: a missing file, a malformed line or no entry at all.
    """
    if not os.path.isfile(map_path):
        raise DataError(f"map file not found: {map_path}\nExpected zip layout:{ZIP_LAYOUT}")
    names: List[str] = []
    labels: List[int] = []
    with open(map_path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            try:
                label = int(fields[1])
            except (IndexError, ValueError):
                raise DataError(f"{map_path}:{number}: expected '<path inside the zip><TAB><label int>', "
                                f"got {line!r}") from None
            names.append(fields[0].lstrip("/"))
            labels.append(label)
    if not names:
        raise DataError(f"map file {map_path} lists no image.\nExpected zip layout:{ZIP_LAYOUT}")
    return names, np.asarray(labels, dtype=np.int64)
