"""Writes scikit-learn's handwritten digits (1,797 real scans, 10 classes) as a small image dataset.

    python tools/prepare_digits.py [--root datasets/digits]

The root receives both layouts: train/<digit>/*.jpg and val/<digit>/*.jpg (32x32 RGB JPEGs, 1,497 / 300
images) and train.zip, val.zip, train_map.txt, val_map.txt. Does nothing if the root is already complete; runs
on the same root at once take turns. A root holding other files, or one that cannot be written, ends with a
one-line message and exit status 2.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import DataError, prepare_digits  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="datasets/digits", help="output folder (default: datasets/digits)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        prepare_digits(args.root)
    except (DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
