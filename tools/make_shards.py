"""Writes a dataset as tar shards (webdataset layout) with an index, for DATA.DATASET shards.

    python tools/make_shards.py SOURCE OUT [--shard-bytes 1G] [--workers 4] [--layout auto|folder|zip|imagenet22K]
    python tools/make_shards.py --verify OUT

SOURCE is a dataset in the class-folder layout (SOURCE/train/<class>/<img>, SOURCE/val/...), the zip layout
(train.zip, train_map.txt, ...) or the ImageNet-22K layout (its two list files); OUT receives train/ and val/, each
with shard-000000.tar, ... (KEY.<ext> and KEY.cls per sample), samples.npy and index.json. Train with
``--data-path OUT --opts DATA.DATASET shards`` (OUT may then be a URL where the folder was copied).

Run it again after an interruption: finished shards (and splits) are kept, a shard is only renamed to its final
name once complete, and the index is written last. Files that cannot be read as images are left out and listed.
``--verify`` hashes every shard of OUT and compares it with the index. Exit status 2 with a one-line message when
the source cannot be used or the output cannot be written (or, with --verify, when a shard differs).
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import DataError  # noqa: E402
from data.shard_writer import DEFAULT_SHARD_BYTES, LAYOUTS, make_shards, verify_shards  # noqa: E402
from make_zip_dataset import ProgressLine, run_writer  # noqa: E402  (this folder is on the path when a tool runs)

_UNITS = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12, "KI": 2 ** 10, "MI": 2 ** 20,
          "GI": 2 ** 30, "TI": 2 ** 40}


def byte_count(text: str) -> int:
    """``500M``, ``1G``, ``1GiB``, ``250000000`` -> bytes."""
    number = text.strip().upper().removesuffix("B")
    unit = number.lstrip("0123456789.")
    try:
        value = int(float(number[:len(number) - len(unit)]) * _UNITS[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 500M, 1G, 1GiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the shard size must be positive, got {text!r}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", help="dataset root: class folders, zip layout or ImageNet-22K lists")
    parser.add_argument("out", help="output folder for train/ and val/ shards")
    parser.add_argument("--shard-bytes", type=byte_count, default=DEFAULT_SHARD_BYTES,
                        help="about how large each shard is (default 1G)")
    parser.add_argument("--layout", choices=("auto",) + LAYOUTS, default="auto", help="the layout of SOURCE")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to write")
    parser.add_argument("--workers", type=int, default=1, help="shards written at once, one process each")
    parser.add_argument("--seed", type=int, default=0, help="the order of the samples in the shards")
    parser.add_argument("--verify", action="store_true", help="check the shards of OUT against their index")
    args = parser.parse_args()
    progress = ProgressLine()
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[progress.handler()])
    if args.verify:
        return verify(args.out, args.splits)
    if args.source is None:
        parser.error("SOURCE is required unless --verify is given")
    return run_writer(lambda: make_shards(args.source, args.out, args.shard_bytes, args.layout, args.splits,
                                          args.workers, args.seed, progress=progress))


def verify(out: str, splits) -> int:
    try:
        problems = [line for split in splits for line in verify_shards(os.path.join(out, split))]
    except (DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"error: {len(problems)} shards differ from their index", file=sys.stderr)
        return 2
    print(f"every shard of {', '.join(splits)} matches its index")
    return 0


if __name__ == "__main__":
    sys.exit(main())
