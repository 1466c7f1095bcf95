"""What checking checkpoints costs: the checksum while saving, the check before loading, and the hashes it could use.

Writes a checkpoint of ``--mb`` megabytes of float32 tensors into ``--dir`` and times, median of ``--repeats``:
``torch.save`` alone and ``checkpoint.atomic_torch_save`` (which adds the CRC-32 while writing, an fsync and the
rename); the check before loading, against the manifest's record (``checksums.file_digest``) and through the zip
records (``checksums.zip_damage``), next to ``torch.load`` of the same file; and CRC-32, SHA-256, BLAKE2b and
SHA-1 over the same bytes in memory.

    python benchmarks/bench_checkpoint_checksum.py --mb 256
"""
import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
import zlib
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint import atomic_torch_save  # noqa: E402
from checksums import file_digest, zip_damage  # noqa: E402


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="checkpoint size in MB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the file is written")
    args = parser.parse_args()
    tensors = {f"layer{i}": torch.randn(args.mb * 2 ** 20 // 4 // 8) for i in range(8)}
    path = os.path.join(args.dir, "bench_checkpoint_checksum.pth")
    try:
        plain = median_seconds(lambda: torch.save(tensors, path), args.repeats)
        atomic = median_seconds(lambda: atomic_torch_save(tensors, path), args.repeats)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            data = f.read()
        rows = [("torch.save", plain), ("atomic_torch_save (CRC-32 while writing, fsync, rename)", atomic),
                ("check against the manifest (file_digest)", median_seconds(lambda: file_digest(path), args.repeats)),
                ("check through the zip records (zip_damage)", median_seconds(lambda: zip_damage(path), args.repeats)),
                ("torch.load", median_seconds(lambda: torch.load(path, weights_only=True), args.repeats))]
        for name, hash_fn in (("zlib.crc32", zlib.crc32), ("hashlib.sha256", lambda b: hashlib.sha256(b).digest()),
                              ("hashlib.blake2b", lambda b: hashlib.blake2b(b).digest()),
                              ("hashlib.sha1", lambda b: hashlib.sha1(b).digest())):
            rows.append((f"{name} in memory", median_seconds(lambda: hash_fn(data), args.repeats)))
    finally:
        if os.path.exists(path):
            os.remove(path)
    print(f"checkpoint of {size / 1e6:.0f} MB in {args.dir}, median of {args.repeats}")
    print(f"{'step':<58} {'seconds':>8} {'GB/s':>7}")
    for name, seconds in rows:
        print(f"{name:<58} {seconds:8.3f} {size / seconds / 1e9:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
