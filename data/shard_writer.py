"""Writing tar shards (the layout of ``data.shards``) from a class-folder tree, the zip layout or the ImageNet-22K
layout: what ``tools/make_shards.py`` runs.

The source is read through the datasets of those layouts (the same classes, files and labels as training from
them), each file checked as the zip writer checks it (``ziparchive.read_image_bytes``: a file that cannot be read or
is not an image by its header is left out, logged and listed). Samples go into the shards in a seeded random order,
so that every shard holds a mix of classes (the reader mixes within a window, not across the whole split); shards
are cut by bytes.

Restartable: a shard is written under ``.tmp``, flushed and renamed, then its record (``shard-N.json``: the plan
it was written for, its hash, where each sample's bytes are) is written the same way. A rerun keeps every shard
whose record matches its plan and writes the rest; a killed run leaves no shard under its final name without its
record, and the index (``index.json``, written last) only exists for a finished split. Shards are written by
``workers`` processes at once.
"""
import concurrent.futures
import contextlib
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import tarfile
from typing import BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from config import IMAGENET22K_NUM_CLASSES
from data.datasets import FolderDataset, ImageDataset, ImageListDataset, ZipDataset
from data.errors import DataError
from data.layout import IMAGENET22K_TRAIN_LIST, IMAGENET22K_VAL_LIST, find_classes, read_map_file
from data.shards import FORMAT, INDEX_NAME, SAMPLE_DTYPE, SAMPLES_NAME, TAR_BLOCK, content_hash, sha256_hex
from data.ziparchive import ZipMembers, read_image_bytes

logger = logging.getLogger(__name__)

LAYOUTS = ("folder", "zip", "imagenet22K")
DEFAULT_SHARD_BYTES = 10 ** 9
# What a sample adds to a shard besides its image: the image's tar header, and the label member (header + block).
_SAMPLE_OVERHEAD = 3 * TAR_BLOCK
_SHARD_NAME = re.compile(r"^shard-\d{6}\.(tar|json)(\.tmp)?$")

ProgressFn = Callable[[str, int, int], None]


def detect_layout(source: str) -> str:
    """The layout of ``source``: ``folder`` (``train/``), ``zip`` (``train.zip``) or ``imagenet22K`` (its list files);
    the first of these when it holds several."""
    markers = {"folder": "train", "zip": "train.zip", "imagenet22K": IMAGENET22K_TRAIN_LIST}
    found = [layout for layout, marker in markers.items() if os.path.exists(os.path.join(source, marker))]
    if not found:
        raise DataError(f"{source} holds none of train/ (class folders), train.zip (zip layout) or "
                        f"{IMAGENET22K_TRAIN_LIST} (ImageNet-22K layout): nothing to write shards from")
    if len(found) > 1:
        logger.info("%s holds the %s layouts; writing from the %s layout (choose with --layout)", source,
                    " and ".join(found), found[0])
    return found[0]


def open_split(source: str, layout: str, split: str) -> Tuple[ImageDataset, np.ndarray]:
    """The images of ``split`` in ``source`` as the dataset of its layout (labels numbered as training numbers them),
    and the size in bytes of each image as stored (what cutting shards by bytes needs)."""
    if layout == "zip":
        zip_path = os.path.join(source, f"{split}.zip")
        names, labels = read_map_file(os.path.join(source, f"{split}_map.txt"))
        _, train_labels = read_map_file(os.path.join(source, "train_map.txt"))
        classes = [str(label) for label in range(int(train_labels.max()) + 1)]
        return ZipDataset(zip_path, names, labels, classes), ZipMembers(zip_path, names).sizes
    if layout == "folder":
        dataset: ImageDataset = FolderDataset(os.path.join(source, split), find_classes(os.path.join(source, "train")))
    elif layout == "imagenet22K":
        list_file = os.path.join(source, IMAGENET22K_TRAIN_LIST if split == "train" else IMAGENET22K_VAL_LIST)
        dataset = ImageListDataset(source, list_file, [str(label) for label in range(IMAGENET22K_NUM_CLASSES)])
    else:
        raise DataError(f"unknown source layout {layout!r}; one of {', '.join(LAYOUTS)}")
    return dataset, file_sizes([dataset.image_path(index) for index in range(len(dataset))])


def file_sizes(paths: Sequence[str], threads: int = 16) -> np.ndarray:
    """The size of each file (0 for one that cannot be read: it is left out when written, and reported then)."""
    def size(path: str) -> int:
        try:
            return os.stat(path).st_size
        except OSError:
            return 0

    # A million stats one after the other are slow on a network file system; threads wait in parallel.
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return np.fromiter(pool.map(size, paths, chunksize=1024), dtype=np.int64, count=len(paths))


def plan_shards(sizes: np.ndarray, shard_bytes: int, seed: int) -> List[np.ndarray]:
    """The samples of each shard, in the order written: a seeded random order cut where the bytes written so far
    pass a multiple of ``shard_bytes`` (a shard is at most one sample larger than that)."""
    order = np.random.default_rng(seed).permutation(len(sizes))
    costs = (sizes[order] + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK + _SAMPLE_OVERHEAD
    shard_of = (np.cumsum(costs) - costs) // max(shard_bytes, 1)
    cuts = np.flatnonzero(np.diff(shard_of)) + 1
    return np.split(order, cuts)


def sample_key(path: str, used: set) -> str:
    """A webdataset key from an image's file name: its stem, with anything but letters, digits, ``-`` and ``_``
    (dots: webdataset splits a key from its extension at the first dot) replaced by ``_``; unique within ``used``."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(os.path.basename(path))[0]) or "sample"
    key, number = stem, 1
    while key in used:
        key, number = f"{stem}_{number}", number + 1
    used.add(key)
    return key


def _plan_digest(dataset: ImageDataset, indices: np.ndarray) -> str:
    digest = hashlib.sha256(FORMAT.encode("utf-8"))
    for index in indices:
        digest.update(f"\n{dataset.image_path(int(index))}\t{int(dataset.labels[index])}".encode("utf-8"))
    return digest.hexdigest()


class _HashingFile:
    """A binary file being written whose SHA-256 is computed on the way."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0  # fixed metadata: the shard depends on the images only
    return info


def _write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Writes ``path`` through ``path.tmp``, flushed to disk and renamed; no ``.tmp`` is left after a failure."""
    temporary = path + ".tmp"
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def write_shard(dataset: ImageDataset, folder: str, number: int, indices: np.ndarray, plan: str) -> Dict:
    """Writes shard ``number`` of ``folder`` with the images ``indices`` of ``dataset``, then its record.

    Returns:
        The record: the plan, name, sample count, bytes, SHA-256, each sample's offset, size and label, and the
        files left out.
    """
    name = f"shard-{number:06d}.tar"
    record: Dict = {"plan": plan, "name": name, "offsets": [], "sizes": [], "labels": [], "skipped": []}
    hashing: List[_HashingFile] = []

    def write(file: BinaryIO) -> None:
        hashing.append(_HashingFile(file))
        keys: set = set()
        with tarfile.open(fileobj=hashing[0], mode="w", format=tarfile.PAX_FORMAT) as archive:
            for index in indices:
                index = int(index)
                path = dataset.image_path(index)
                data = read_image_bytes(path, lambda: dataset.open_image(index))
                if data is None:
                    record["skipped"].append(path)
                    continue
                key = sample_key(path, keys)
                extension = os.path.splitext(path)[1].lower().lstrip(".") or "jpg"
                label = int(dataset.labels[index])
                archive.addfile(_member(f"{key}.{extension}", len(data)), io.BytesIO(data))
                # tarfile pads the data to whole blocks; the data started that far back.
                record["offsets"].append(archive.offset - (len(data) + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK)
                record["sizes"].append(len(data))
                record["labels"].append(label)
                text = str(label).encode("ascii")
                archive.addfile(_member(f"{key}.cls", len(text)), io.BytesIO(text))

    path = os.path.join(folder, name)
    # A record only ever describes the shard file beside it: an old one goes before the shard is replaced.
    with contextlib.suppress(FileNotFoundError):
        os.remove(path[:-len(".tar")] + ".json")
    _write_atomically(path, write)
    record.update(samples=len(record["offsets"]), bytes=os.path.getsize(path), sha256=hashing[0].hash.hexdigest())
    _write_atomically(path[:-len(".tar")] + ".json", lambda file: file.write(json.dumps(record).encode("utf-8")))
    return record


def _finished_record(folder: str, number: int, plan: str) -> Optional[Dict]:
    """The record of shard ``number`` when a run wrote it for this same plan and its shard is there."""
    record_path = os.path.join(folder, f"shard-{number:06d}.json")
    try:
        with open(record_path, encoding="utf-8") as file:
            record = json.load(file)
    except (OSError, ValueError):
        return None
    if record.get("plan") != plan or not os.path.isfile(os.path.join(folder, record.get("name", ""))):
        return None
    return record


# The split being written, for the writing processes (forked: inherited, not pickled for every shard).
_DATASET: Optional[ImageDataset] = None


def _write_in_worker(folder: str, number: int, indices: np.ndarray, plan: str) -> Dict:
    return write_shard(_DATASET, folder, number, indices, plan)


def write_split(dataset: ImageDataset, sizes: np.ndarray, folder: str, shard_bytes: int = DEFAULT_SHARD_BYTES,
                seed: int = 0, workers: int = 1, progress: Optional[ProgressFn] = None) -> Dict:
    """Writes the shards of one split into ``folder``, then its sample table and index; shards a previous run
    finished for the same plan are kept.

    Args:
        dataset: the split's images.
        sizes: each image's size in bytes as stored.

    Returns:
        The index (as written to ``index.json``).
    """
    global _DATASET
    os.makedirs(folder, exist_ok=True)
    split = os.path.basename(os.path.normpath(folder))
    shards = plan_shards(sizes, shard_bytes, seed)
    plans = [_plan_digest(dataset, indices) for indices in shards]
    records: Dict[int, Dict] = {}
    for number, plan in enumerate(plans):
        record = _finished_record(folder, number, plan)
        if record is not None:
            records[number] = record
    todo = [number for number in range(len(shards)) if number not in records]
    done = sum(len(shards[number]) for number in records)
    if records:
        logger.info("%s: %d of %d shards were written by an earlier run; writing the other %d", folder, len(records),
                    len(shards), len(todo))
    if progress is not None:
        progress(split, done, len(dataset))
    _DATASET = dataset
    try:
        if workers > 1 and len(todo) > 1:
            context = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
                futures = {pool.submit(_write_in_worker, folder, number, shards[number], plans[number]): number
                           for number in todo}
                for future in concurrent.futures.as_completed(futures):
                    number = futures[future]
                    records[number] = future.result()
                    done += len(shards[number])
                    if progress is not None:
                        progress(split, done, len(dataset))
        else:
            for number in todo:
                records[number] = write_shard(dataset, folder, number, shards[number], plans[number])
                done += len(shards[number])
                if progress is not None:
                    progress(split, done, len(dataset))
    finally:
        _DATASET = None
    return _write_index(folder, dataset, [records[number] for number in range(len(shards))], shard_bytes, seed)


def _write_index(folder: str, dataset: ImageDataset, records: List[Dict], shard_bytes: int, seed: int) -> Dict:
    """The sample table and ``index.json`` from the shard records (empty shards left out), then the records and any
    shard files of other plans removed."""
    kept = [record for record in records if record["samples"]]
    skipped = [path for record in records for path in record["skipped"]]
    if not kept:
        raise DataError(f"no file of {dataset.describe()} could be read as an image (the warnings above list them)")
    table = np.zeros(sum(record["samples"] for record in kept), dtype=SAMPLE_DTYPE)
    position = 0
    for record in kept:
        count = record["samples"]
        table["offset"][position:position + count] = record["offsets"]
        table["size"][position:position + count] = record["sizes"]
        table["label"][position:position + count] = record["labels"]
        position += count
    buffer = io.BytesIO()
    np.save(buffer, table, allow_pickle=False)
    table_bytes = buffer.getvalue()
    shards = [{key: record[key] for key in ("name", "samples", "bytes", "sha256")} for record in kept]
    index = {"format": FORMAT, "split": os.path.basename(os.path.normpath(folder)), "source": dataset.describe(),
             "classes": dataset.class_names, "num_samples": len(table), "shard_bytes": shard_bytes, "seed": seed,
             "shards": shards, "samples_file": SAMPLES_NAME, "samples_sha256": sha256_hex(table_bytes),
             "content_hash": content_hash(dataset.class_names, shards, sha256_hex(table_bytes)), "skipped": skipped}
    _write_atomically(os.path.join(folder, SAMPLES_NAME), lambda file: file.write(table_bytes))
    _write_atomically(os.path.join(folder, INDEX_NAME),
                      lambda file: file.write(json.dumps(index, indent=1).encode("utf-8")))
    listed = {shard["name"] for shard in shards}
    for name in os.listdir(folder):
        if _SHARD_NAME.match(name) and name not in listed:
            os.remove(os.path.join(folder, name))  # records, leftovers of killed runs, shards of other plans
    return index


def make_shards(source: str, out: str, shard_bytes: int = DEFAULT_SHARD_BYTES, layout: str = "auto",
                splits: Sequence[str] = ("train", "val"), workers: int = 1, seed: int = 0,
                progress: Optional[ProgressFn] = None) -> List[str]:
    """Writes ``out/<split>/`` shards for each split of ``source``; a split whose index exists is skipped.

    Args:
        source: the dataset root in the folder, zip or ImageNet-22K layout.
        out: the output folder (created if needed).
        shard_bytes: about how large each shard is.
        layout: ``auto`` (see :func:`detect_layout`) or one of :data:`LAYOUTS`.
        splits: the splits to write.
        workers: shards written at once, by as many processes.
        seed: the order of the samples in the shards.
        progress: called as ``progress(split, done, total)`` as shards finish.

    Returns:
        The files left out because they could not be read (each also logged).
    """
    if shard_bytes <= 0:
        raise DataError(f"--shard-bytes must be positive, got {shard_bytes}")
    layout = detect_layout(source) if layout == "auto" else layout
    skipped: List[str] = []
    for split in splits:
        folder = os.path.join(out, split)
        if os.path.isfile(os.path.join(folder, INDEX_NAME)):
            logger.info("%s exists; skipping split %s (remove the folder to write it again)",
                        os.path.join(folder, INDEX_NAME), split)
            continue
        dataset, sizes = open_split(source, layout, split)
        index = write_split(dataset, sizes, folder, shard_bytes, seed, workers, progress)
        logger.info("wrote %s: %d images, %d classes, %d shards, %.1f MB (content hash %s)", folder,
                    index["num_samples"], len(index["classes"]), len(index["shards"]),
                    sum(shard["bytes"] for shard in index["shards"]) / 1e6, index["content_hash"][:16])
        if index["skipped"]:
            logger.warning("left %d unreadable files of %s out of %s: %s", len(index["skipped"]), split, folder,
                           ", ".join(index["skipped"]))
        skipped.extend(index["skipped"])
    return skipped


def verify_shards(folder: str) -> List[str]:
    """Hashes every shard of a local split folder and compares it with its index.

    Returns:
        One line per shard that is missing, of another size or another hash (empty when all match).
    """
    from data.shards import load_index

    index = load_index(folder)
    problems = []
    for shard in index.shards:
        path = os.path.join(folder, shard["name"])
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 22), b""):
                digest.update(block)
        size = os.path.getsize(path)
        if size != shard["bytes"]:
            problems.append(f"{path}: {size} bytes, the index says {shard['bytes']}")
        elif digest.hexdigest() != shard["sha256"]:
            problems.append(f"{path}: its SHA-256 differs from the index's (the bytes changed)")
    return problems
