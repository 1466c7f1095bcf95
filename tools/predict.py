"""Top-k classes of a trained Swin Transformer for image files and folders of images.

    python tools/predict.py --cfg CONFIG --checkpoint CKPT [--batch-size N] [--topk 5] IMAGE_OR_FOLDER [...] \\
        [--opts KEY VALUE ...]

The config describes the model (MODEL.SWIN.*, MODEL.NUM_CLASSES) and the evaluation transform (DATA.IMG_SIZE,
DATA.INTERPOLATION, TEST.CROP), as for ``main.py --eval``. The checkpoint may be a released file, a training
checkpoint, a plain state dict or a timm Swin state dict; it is read with torch.load(weights_only=True) and must
fit the model exactly. Folders are searched recursively for image files. For each image the top-k classes are
printed with their probabilities. Class names: ImageNet-1K names for 1000 classes, ImageNet-22K names for
21841 (both from the lists timm ships), else the class folder names of DATA.DATA_PATH/train when it is there,
else the class index. Files that cannot be read are reported and skipped; the exit status is then 1
(2 for an unusable config or checkpoint).
"""
import argparse
import logging
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from PIL import UnidentifiedImageError
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import IMAGENET22K_NUM_CLASSES, ConfigError, load_config  # noqa: E402
from data.decode import UNREADABLE_ERRORS, decode_image  # noqa: E402
from data.errors import DataError  # noqa: E402
from data.layout import find_classes, is_image_file  # noqa: E402
from data.transforms import build_transform  # noqa: E402
from models import build_model  # noqa: E402
from models.state_dict import is_timm_layout, load_state_dict_checked, timm_to_ours  # noqa: E402
from checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file  # noqa: E402

logger = logging.getLogger("predict")

# Class counts with a known ImageNet class list in timm (timm.data.ImageNetInfo subset names).
IMAGENET_SUBSETS = {1000: "imagenet-1k", IMAGENET22K_NUM_CLASSES: "imagenet-22k"}


def class_names(config) -> List[str]:
    """A display name for each class of the model, in label order (see the module docstring)."""
    num_classes = config.MODEL.NUM_CLASSES
    if num_classes in IMAGENET_SUBSETS:
        from timm.data import ImageNetInfo

        info = ImageNetInfo(IMAGENET_SUBSETS[num_classes])
        return [info.index_to_description(index) for index in range(num_classes)]
    train_dir = os.path.join(config.DATA.DATA_PATH, "train")
    if config.DATA.DATA_PATH and os.path.isdir(train_dir):
        try:
            names = find_classes(train_dir)
        except DataError as error:
            logger.warning("class names: %s", error)
            names = []
        if len(names) == num_classes:
            return names
        if names:
            logger.warning("%s has %d class folders but the model has %d classes; printing class indices",
                           train_dir, len(names), num_classes)
    return [str(index) for index in range(num_classes)]


def load_weights(model: nn.Module, path: str) -> None:
    """Loads a checkpoint of either layout into ``model``; every learned tensor must fit.

    Raises:
        CheckpointError: unreadable file, or weights of another architecture.
    """
    state_dict = extract_state_dict(load_checkpoint_file(path))
    if is_timm_layout(state_dict):
        state_dict = timm_to_ours(state_dict)
    try:
        load_state_dict_checked(model, state_dict, strict=True, source=path)
    except ValueError as error:
        raise CheckpointError(str(error)) from error


def find_images(paths: Sequence[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """The image files named or found (recursively) under ``paths``, and the paths that gave none, with why."""
    files: List[str] = []
    failures: List[Tuple[str, str]] = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)  # named explicitly: tried whatever its extension
        elif os.path.isdir(path):
            found = [os.path.join(folder, name) for folder, _, names in os.walk(path)
                     for name in names if is_image_file(name)]
            if not found:
                failures.append((path, "no image files in this folder"))
            files.extend(sorted(found))
        else:
            failures.append((path, "no such file or folder"))
    return files, failures


def read_image(path: str, transform: Callable) -> torch.Tensor:
    """The transformed image, (3, DATA.IMG_SIZE, DATA.IMG_SIZE) for any image size.

    ``decode_image`` checks the pixel count from the file header first, so an oversized image is refused
    before it is decoded.

    Raises:
        OSError, ValueError, ...: see ``data.decode.UNREADABLE_ERRORS``.
    """
    with open(path, "rb") as f:
        image = decode_image(f)
    return transform(image)


def predict(model: nn.Module, images: List[torch.Tensor], device: torch.device, topk: int
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k probabilities and class indices, each (len(images), topk)."""
    with torch.no_grad():
        logits = model(torch.stack(images).to(device)).float()
    return logits.softmax(dim=1).topk(topk, dim=1)


def print_predictions(model: nn.Module, files: Sequence[str], transform: Callable, names: List[str],
                      device: torch.device, batch_size: int, topk: int) -> List[str]:
    """Prints the top-k classes of each readable file, ``batch_size`` images per forward pass.

    Returns:
        The files that could not be read (each reported on stderr and skipped).
    """
    unreadable: List[str] = []
    batch_paths: List[str] = []
    batch: List[torch.Tensor] = []
    for index, path in enumerate(files):
        try:
            batch.append(read_image(path, transform))
            batch_paths.append(path)
        except UNREADABLE_ERRORS as error:
            reason = "not an image file, or a damaged one" if isinstance(error, UnidentifiedImageError) else error
            print(f"error: cannot read {path}: {reason}; skipped", file=sys.stderr)
            unreadable.append(path)
        if batch and (len(batch) == batch_size or index == len(files) - 1):
            probabilities, classes = predict(model, batch, device, topk)
            for image_path, probs, labels in zip(batch_paths, probabilities.tolist(), classes.tolist()):
                print(image_path)
                for prob, label in zip(probs, labels):
                    print(f"  {100 * prob:6.2f}%  {names[label]}")
            sys.stdout.flush()
            batch_paths, batch = [], []
    return unreadable


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, metavar="FILE", help="config file of the model")
    parser.add_argument("--checkpoint", required=True, help="weights: released file, training checkpoint, timm")
    parser.add_argument("--opts", nargs="+", default=[], help="KEY VALUE pairs that override the config")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--topk", type=int, default=5, help="classes printed per image (default 5)")
    parser.add_argument("paths", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1 or args.topk < 1:
        parser.error("--batch-size and --topk must be at least 1")
    if len(args.opts) % 2:
        parser.error(f"--opts takes KEY VALUE pairs, got an odd number of items {args.opts}; put the images "
                     "before --opts, or end the pairs with --")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        config = load_config(args.cfg, args.opts)
        model = build_model(config)
        load_weights(model, args.checkpoint)
    except (ConfigError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model.to(device).eval()
    names = class_names(config)
    transform = build_transform(False, config)
    files, missing = find_images(args.paths)
    for path, reason in missing:
        print(f"error: {path}: {reason}", file=sys.stderr)
    unreadable = print_predictions(model, files, transform, names, device, args.batch_size,
                                   min(args.topk, config.MODEL.NUM_CLASSES))
    if missing or unreadable:
        print(f"finished with errors: {len(unreadable)} of {len(files)} image files could not be read"
              + (f"; paths without images: {len(missing)}" if missing else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
