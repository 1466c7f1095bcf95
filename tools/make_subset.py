"""Copies a reproducible fraction of a folder dataset's labelled training images (the validation split whole).

    python tools/make_subset.py datasets/digits datasets/digits_10pct --fraction 0.1 --seed 0

From each class of SRC/train, ceil(fraction x its images) images are drawn at random with ``--seed`` (the same
files for the same seed, fraction and folder) and copied to DST/train/<class>/; SRC/val is copied to DST/val.
Used by the SimMIM digits demo to fine-tune on 10% of the labels.
"""
import argparse
import logging
import math
import os
import random
import shutil
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.errors import DataError  # noqa: E402
from data.layout import find_classes, scan_images  # noqa: E402

logger = logging.getLogger("make_subset")


def make_subset(src: str, dst: str, fraction: float, seed: int = 0) -> int:
    """Writes the subset; returns the number of training images copied.

    Raises:
        DataError: SRC lacks the folder layout, DST exists already, or the fraction is not in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"--fraction must be in (0, 1], got {fraction}")
    if os.path.exists(dst):
        raise DataError(f"{dst} exists already; give a new destination or remove it")
    classes = find_classes(os.path.join(src, "train"))
    paths, labels = scan_images(os.path.join(src, "train"), classes)
    rng = random.Random(seed)
    chosen: List[str] = []
    for label in range(len(classes)):
        members = [p for p, l in zip(paths, labels) if l == label]
        chosen += sorted(rng.sample(members, math.ceil(fraction * len(members))))
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for relative in chosen:
        target = os.path.join(tmp, "train", relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(src, "train", relative), target)
    if os.path.isdir(os.path.join(src, "val")):
        shutil.copytree(os.path.join(src, "val"), os.path.join(tmp, "val"))
    os.replace(tmp, dst)  # complete or absent, never half-written
    return len(chosen)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder dataset with train/<class>/ (and val/)")
    parser.add_argument("dst", help="new folder for the subset")
    parser.add_argument("--fraction", type=float, default=0.1, help="fraction of each class's training images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random choice")
    args = parser.parse_args(argv)
    try:
        count = make_subset(args.src, args.dst, args.fraction, args.seed)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {count} training images ({args.fraction:.0%} of each class, seed {args.seed}) to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
