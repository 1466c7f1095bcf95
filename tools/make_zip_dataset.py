"""Writes a folder dataset (SRC/train/<class>/<img>, SRC/val/<class>/<img>) in the zip layout.

    python tools/make_zip_dataset.py SRC DST

DST receives train.zip, val.zip, train_map.txt and val_map.txt (labels follow the sorted class folders
of SRC/train). Run it again after an interruption: finished splits are skipped, and a split is only
renamed to its final name once complete (a failed split leaves no .tmp file behind). Files that cannot be
read as images are left out and listed. Exit status 2 with a one-line message when the source cannot be
used or the output cannot be written.
"""
import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import DataError, make_zip_dataset  # noqa: E402


class ProgressLine:
    """Rewrites one status line on stderr, at most a few times a second."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.last = 0.0

    def __call__(self, split: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < self.interval_s:
            return
        self.last = now
        sys.stderr.write(f"\r{split}: {done}/{total} images ({100.0 * done / total:.0f}%)")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder dataset root with train/ and val/")
    parser.add_argument("dst", help="output folder for the zips and map files (may be SRC)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to convert")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        skipped = make_zip_dataset(args.src, args.dst, args.splits, progress=ProgressLine())
    except (DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if skipped:
        print(f"finished; {len(skipped)} unreadable files were left out (listed above)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
