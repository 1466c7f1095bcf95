"""Tar shards in the webdataset layout: their index, and reading their samples by byte range, from a local folder or
from any URL that fsspec opens (``https://``, ``s3://`` with s3fs installed, ...).

What ``tools/make_shards.py`` (``data.shard_writer``) writes for each split, and what this module reads::

    SPLIT/index.json          format, class names, each shard's name, sample count, bytes and SHA-256, the bad files
                              left out, a content hash over all of it
    SPLIT/samples.npy         per sample, in dataset order: the byte offset of its image in its shard, its size, label
    SPLIT/shard-000000.tar    KEY.<ext> (the image's bytes as they were, e.g. KEY.jpeg) then KEY.cls (the label as
                              decimal text) for each sample; any tar or webdataset reader reads them

Why a map-style dataset over the index rather than a stream of tar files: sample ``i`` is one byte range of one
shard, so the samplers, per-sample augmentation seeds, mid-epoch ``skip`` and the exact evaluation split of the
other layouts work on shards unchanged, and each loader worker reads exactly the samples of its batches (no
sample read twice by two workers, none skipped). The training order keeps the reads local: shards in a new order
each epoch, samples mixed within a window (:class:`data.samplers.ShardOrderSampler`). A worker asks for a whole
batch at once (:meth:`ShardDataset.prefetch`): over a URL its byte ranges are fetched concurrently, with retries
and backoff for transient errors; local shards are read with ``pread``.

What goes wrong, and what happens: a missing shard, one shorter than the index says (truncated), a member whose tar
header is not where the index says (the index does not match the shards) and a range that still fails after the
retries all make the samples concerned unreadable, each with a message naming the shard; the unreadable-image
policy of ``data.datasets`` then applies to them (replaced in training, left out of evaluation, the run stopped
past ``DATA.MAX_BAD_FRACTION``), so one bad shard never stalls a process. A shard's trouble is logged once per
process, not once per sample.
"""
import bisect
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import BinaryIO, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from data.datasets import ImageDataset, Transform
from data.errors import DataError

logger = logging.getLogger(__name__)

FORMAT = "swin-shards/1"
INDEX_NAME = "index.json"
SAMPLES_NAME = "samples.npy"
# The per-sample table: where the image's bytes start in its shard, how many, and its label.
SAMPLE_DTYPE = np.dtype([("offset", "<i8"), ("size", "<u4"), ("label", "<i4")])
TAR_BLOCK = 512
_USTAR_MAGIC = b"ustar\x00"  # what tarfile writes at byte 257 of a POSIX (ustar or pax) header

SHARDS_LAYOUT = """
    DATA_PATH/train/index.json, samples.npy, shard-000000.tar, ...   written by tools/make_shards.py SOURCE DATA_PATH
    DATA_PATH/val/index.json, samples.npy, shard-000000.tar, ...
  DATA_PATH is a folder or a URL that fsspec opens (https://host/imagenet_shards, s3://bucket/imagenet_shards)."""

# Transient URL errors are retried this many times, after 0.5, 1, 2, 4 s (7.5 s in all) before the samples concerned
# count as unreadable.
READ_RETRIES = 4
RETRY_DELAY_S = 0.5
# An HTTP request that has not finished after this long fails (and is retried): a stalled server must not hold a
# loader worker, and with it the whole job, forever.
HTTP_TIMEOUT_S = 60.0


class ShardError(OSError):
    """A sample that cannot be read out of its shard (an OSError, so the unreadable-image policy applies to it)."""


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL for fsspec (``file://`` URLs are read as local paths)."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def join(root: str, name: str) -> str:
    """``root/name`` for a folder or a URL."""
    return f"{root.rstrip('/')}/{name}" if is_url(root) else os.path.join(local_path(root), name)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_hash(classes: Sequence[str], shards: Sequence[Dict], samples_sha256: str) -> str:
    """One hash over what defines a split's samples: the classes, each shard's name and hash, and the sample table."""
    digest = hashlib.sha256(json.dumps(list(classes)).encode("utf-8"))
    for shard in shards:
        digest.update(f"\n{shard['name']}\t{shard['samples']}\t{shard['sha256']}".encode("utf-8"))
    digest.update(f"\n{samples_sha256}".encode("utf-8"))
    return digest.hexdigest()


def _transient(error: BaseException) -> bool:
    """Whether a failed read is worth another try: connection trouble, timeouts, HTTP 429 and 5xx; not a missing
    file, a refused permission or another 4xx answer."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, ShardError)):
        return False
    status = getattr(error, "status", None)  # aiohttp's ClientResponseError
    if isinstance(status, int):
        return status == 429 or status >= 500
    if isinstance(error, (OSError, TimeoutError)):
        return True
    try:
        import aiohttp
        from fsspec.exceptions import FSTimeoutError
    except ImportError:
        return False
    return isinstance(error, (aiohttp.ClientError, FSTimeoutError))


class ShardStore:
    """Reads whole files, and samples (a tar header and the data after it), of one split folder, local or at a URL.

    Local files are read with ``os.pread`` on a handle kept per shard; URLs through fsspec, one range request per
    sample, all of a batch at once (``cat_ranges``). Handles and the fsspec file system belong to the process that
    opened them: a forked loader worker opens its own.

    Args:
        root: the split folder or URL.
        retries: how many times a transient URL error is retried.
        retry_delay_s: the first wait; each retry waits twice as long as the one before.
    """

    def __init__(self, root: str, retries: int = READ_RETRIES, retry_delay_s: float = RETRY_DELAY_S):
        self.root = root
        self.remote = is_url(root)
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self._pid = -1
        self._files: Dict[str, int] = {}
        self._fs = None
        self._base = ""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_pid=-1, _files={}, _fs=None)  # handles are per process
        return state

    def _own(self) -> None:
        if self._pid == os.getpid():
            return
        self._pid, self._files, self._fs = os.getpid(), {}, None
        if self.remote:
            import fsspec

            options = {}
            if self.root.split("://", 1)[0] in ("http", "https"):
                import aiohttp

                options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)}
            self._fs, self._base = fsspec.core.url_to_fs(self.root, **options)

    def path(self, name: str) -> str:
        return join(self.root, name)

    def read_file(self, name: str) -> bytes:
        """The whole file ``name`` (retried like a range)."""
        self._own()
        if not self.remote:
            with open(self.path(name), "rb") as file:
                return file.read()
        result = self._with_retries(lambda names: [self._try(self._fs.cat_file, self._remote(n)) for n in names],
                                    [name])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def size(self, name: str) -> int:
        """The size of file ``name`` in bytes."""
        self._own()
        if not self.remote:
            return os.fstat(self._handle(name)).st_size
        return int(self._fs.size(self._remote(name)))

    def read_samples(self, names: Sequence[str], offsets: Sequence[int],
                     sizes: Sequence[int]) -> List[Union[Tuple[bytes, bytes], BaseException]]:
        """For each i, the 512 bytes before byte ``offsets[i]`` of file ``names[i]`` (a sample's tar header) and the
        ``sizes[i]`` bytes from there (its data), or the error that reading them raised (after the retries, for a
        transient one). Shorter bytes than asked for mean the file ends earlier.

        Over a URL each sample is one range request (header and data together), all of them at once; a local file is
        read with two ``pread`` calls per sample, which costs less than copying the data out of one buffer.
        """
        self._own()
        if not self.remote:
            return [self._try(self._pread_sample, name, offset, size)
                    for name, offset, size in zip(names, offsets, sizes)]

        def fetch(positions: Sequence[int]) -> List[Union[bytes, BaseException]]:
            return self._fs.cat_ranges([self._remote(names[i]) for i in positions],
                                       [offsets[i] - TAR_BLOCK for i in positions],
                                       [offsets[i] + sizes[i] for i in positions], on_error="return")
        return [result if isinstance(result, BaseException) else (result[:TAR_BLOCK], result[TAR_BLOCK:])
                for result in self._with_retries(fetch, list(range(len(names))))]

    @staticmethod
    def _try(function, *args) -> Union[bytes, BaseException]:
        try:
            return function(*args)
        except Exception as error:  # returned, and judged by the caller, like fsspec's cat_ranges does
            return error

    def _with_retries(self, fetch, items: list) -> List[Union[bytes, BaseException]]:
        """``fetch(items)`` with the items whose error is transient fetched again after a growing delay."""
        results = fetch(items)
        for attempt in range(self.retries):
            again = [i for i, result in enumerate(results) if isinstance(result, BaseException) and _transient(result)]
            if not again:
                break
            delay = self.retry_delay_s * 2 ** attempt
            first = results[again[0]]
            logger.warning("reading %s failed for %d range(s) (%s: %s); retry %d of %d in %.1f s", self.root,
                           len(again), type(first).__name__, first, attempt + 1, self.retries, delay)
            time.sleep(delay)
            for i, result in zip(again, fetch([items[i] for i in again])):
                results[i] = result
        return results

    def _remote(self, name: str) -> str:
        return f"{self._base.rstrip('/')}/{name}"

    def _handle(self, name: str) -> int:
        handle = self._files.get(name)
        if handle is None:
            if len(self._files) >= 64:  # a worker moves through the shards; keep the file handles few
                os.close(self._files.pop(next(iter(self._files))))
            handle = self._files[name] = os.open(self.path(name), os.O_RDONLY)
        return handle

    def _pread_sample(self, name: str, offset: int, size: int) -> Tuple[bytes, bytes]:
        handle = self._handle(name)
        return os.pread(handle, TAR_BLOCK, offset - TAR_BLOCK), os.pread(handle, size, offset)


@dataclass
class ShardIndex:
    """A split's index (see the module docstring), checked against itself.

    Attributes:
        root: the split folder or URL.
        classes: the class names, in label order.
        shards: each shard's ``name``, ``samples``, ``bytes`` and ``sha256``, in sample order.
        samples: the per-sample table (:data:`SAMPLE_DTYPE`).
        content_hash: identifies the split's content.
        skipped: the source files the writer left out (unreadable).
    """
    root: str
    classes: List[str]
    shards: List[Dict]
    samples: np.ndarray
    content_hash: str
    skipped: List[str]

    @property
    def shard_sizes(self) -> np.ndarray:
        return np.array([shard["samples"] for shard in self.shards], dtype=np.int64)


def load_index(root: str, store: Optional[ShardStore] = None) -> ShardIndex:
    """Reads and checks the index of the split at ``root`` (a folder or URL).

    Raises:
        DataError: no index, a damaged one, or one whose parts disagree (sample counts, the sample table's hash,
            a sample beyond its shard's end).
    """
    store = store or ShardStore(root)
    index_path = join(root, INDEX_NAME)
    try:
        text = store.read_file(INDEX_NAME)
    except Exception as error:  # a local or remote read: OSError, or an fsspec/aiohttp error
        raise DataError(f"cannot read the shard index {index_path} ({type(error).__name__}: {error})."
                        f"\nExpected shards layout:{SHARDS_LAYOUT}") from error
    try:
        index = json.loads(text)
        if index.get("format") != FORMAT:
            raise ValueError(f"format {index.get('format')!r}, expected {FORMAT!r}")
        classes, shards = [str(name) for name in index["classes"]], list(index["shards"])
        samples_name, samples_sha256 = index["samples_file"], index["samples_sha256"]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{index_path} is not a shard index written by tools/make_shards.py ({error}). Write the "
                        "shards again with tools/make_shards.py SOURCE OUT.") from error
    try:
        table = store.read_file(samples_name)
    except Exception as error:
        raise DataError(f"cannot read {join(root, samples_name)}, the sample table of {index_path} "
                        f"({type(error).__name__}: {error})") from error
    if sha256_hex(table) != samples_sha256:
        raise DataError(f"{join(root, samples_name)} does not match {index_path} (its SHA-256 differs): the index and "
                        "the sample table come from different runs of tools/make_shards.py. Copy the split folder "
                        "again, or write the shards again.")
    samples = np.load(io.BytesIO(table), allow_pickle=False)
    counts = np.array([shard["samples"] for shard in shards], dtype=np.int64)
    if samples.dtype != SAMPLE_DTYPE or len(samples) != counts.sum():
        raise DataError(f"{index_path} lists {counts.sum()} samples in {len(shards)} shards but its sample table "
                        f"holds {len(samples)}: the index is damaged. Write the shards again.")
    if len(samples) == 0:
        raise DataError(f"{index_path} lists no sample")
    ends = np.repeat(np.array([shard["bytes"] for shard in shards], dtype=np.int64), counts)
    beyond = np.flatnonzero((samples["offset"] + samples["size"] > ends) | (samples["offset"] < TAR_BLOCK))
    if len(beyond):
        shard = shards[int(np.searchsorted(np.cumsum(counts), beyond[0], side="right"))]["name"]
        raise DataError(f"{index_path}: sample {beyond[0]} lies outside {shard} as the index gives it: the "
                        "index is damaged. Write the shards again.")
    return ShardIndex(root, classes, shards, samples, str(index.get("content_hash", "")),
                      list(index.get("skipped", [])))


def check_member_header(block: bytes, size: int) -> str:
    """Why the 512 bytes before a sample's data are not the tar header of a member of ``size`` bytes ("" if they
    are): the check that the index matches the shard. Only the POSIX magic and the size field are read: tarfile's
    header parser cost several times the read itself, a large share of what a loader worker spends on a sample."""
    if block[257:263] != _USTAR_MAGIC:
        return "no tar member header where the index says"
    try:
        recorded = int(block[124:136].strip(b"\0 ") or b"-1", 8)
    except ValueError:
        return "no tar member header where the index says (its size field is not a number)"
    if recorded != size:
        return f"the tar member there holds {recorded} bytes, the index says {size}"
    return ""


class ShardDataset(ImageDataset):
    """The samples of one split of tar shards (see the module docstring).

    Args:
        root: the split folder or URL (``DATA_PATH/train``).
        transform: applied to the decoded RGB PIL image.
        max_bad_fraction: the stopping limit for unreadable images.
        index: the split's index, if read already.
    """

    def __init__(self, root: str, transform: Optional[Transform] = None, max_bad_fraction: float = 0.01,
                 index: Optional[ShardIndex] = None):
        self.root = root
        self.store = ShardStore(root)
        self.index = index or load_index(root, self.store)
        self.shard_sizes = self.index.shard_sizes
        self._shard_ends = np.cumsum(self.shard_sizes).tolist()  # a list: bisect on it is faster per sample
        self._offsets = self.index.samples["offset"]
        self._sizes = self.index.samples["size"]
        super().__init__(self.index.samples["label"], self.index.classes, transform, max_bad_fraction)
        self._prefetched: Dict[int, Union[bytes, BaseException]] = {}
        self._checked: set = set()  # shards whose size this process compared with the index
        self._reported: set = set()  # (shard, reason) pairs this process has warned about

    def describe(self) -> str:
        return self.root

    def locate(self, index: int) -> Tuple[int, int]:
        """(shard number, the sample's place in that shard) of sample ``index``."""
        shard = bisect.bisect_right(self._shard_ends, index)
        return shard, index - (self._shard_ends[shard - 1] if shard else 0)

    def shard_name(self, shard: int) -> str:
        return self.index.shards[shard]["name"]

    def image_path(self, index: int) -> str:
        shard, place = self.locate(index)
        return f"{join(self.root, self.shard_name(shard))} sample {place}"

    def open_image(self, index: int) -> BinaryIO:
        data = self._prefetched.pop(index, None)
        if data is None:
            data = self._read([index])[0]
        if isinstance(data, BaseException):
            raise data
        return io.BytesIO(data)

    def prefetch(self, indices: Sequence[int]) -> None:
        """Fetches the batch's samples together when they come from a URL (concurrent range requests)."""
        if self.store.remote:
            self._prefetched = dict(zip(indices, self._read(list(indices))))

    def warn_unreadable(self, index: int, error: BaseException) -> None:
        """Samples lost to a shard's trouble are warned about once per shard and reason; a bad image, each time."""
        if not isinstance(error, ShardError):
            super().warn_unreadable(index, error)
            return
        shard, _ = self.locate(index)
        reason = str(error).split(":", 1)[0]
        if (shard, reason) in self._reported:
            return
        self._reported.add((shard, reason))
        logger.warning("%s; %s. Further samples of this shard lost for the same reason are counted without a "
                       "warning each (%d of %d images read in this process were unreadable).", error,
                       "using the next image instead" if self.replace_unreadable else "left out of the evaluation",
                       self.num_bad, self.num_read)

    def _read(self, indices: Sequence[int]) -> List[Union[bytes, BaseException]]:
        """Each sample's image bytes, or the ShardError saying why they cannot be had."""
        located = [self.locate(index) for index in indices]
        for shard, _ in located:
            if shard not in self._checked:
                self._check_size(shard)
        # Reading the tar header before each sample's data also checks that the index matches the shard.
        offsets = [int(self._offsets[index]) for index in indices]
        sizes = [int(self._sizes[index]) for index in indices]
        results = self.store.read_samples([self.index.shards[shard]["name"] for shard, _ in located], offsets, sizes)
        return [self._sample_bytes(result, shard, place, size)
                for result, (shard, place), size in zip(results, located, sizes)]

    def _sample_bytes(self, result: Union[Tuple[bytes, bytes], BaseException], shard: int, place: int,
                      size: int) -> Union[bytes, BaseException]:
        problem = ""
        if not isinstance(result, BaseException):
            header, data = result
            if len(header) == TAR_BLOCK and len(data) == size:
                problem = check_member_header(header, size)
                if not problem:
                    return data
        where = f"{join(self.root, self.shard_name(shard))} sample {place}"
        if isinstance(result, FileNotFoundError):
            return ShardError(f"shard missing: {where} cannot be read: the shard is not there")
        if isinstance(result, BaseException):
            return ShardError(f"shard read failed: {where} ({type(result).__name__}: {result})")
        if len(header) < TAR_BLOCK or len(data) < size:
            return ShardError(f"shard truncated: {where} is cut off (the shard ends before the sample does)")
        if len(data) > size:
            return ShardError(f"shard read failed: {where}: {TAR_BLOCK + len(data)} bytes came for a range of "
                              f"{TAR_BLOCK + size} (a server that does not answer Range requests sends the whole file)")
        return ShardError(f"shard does not match the index: {where}: {problem}. Copy the shards the index was "
                          "written with, or write the shards again")

    def _check_size(self, shard: int) -> None:
        """Compares a shard's size with the index once per process; a difference is warned about (the samples it
        costs are found by their own reads)."""
        self._checked.add(shard)
        name, expected = self.shard_name(shard), int(self.index.shards[shard]["bytes"])
        try:
            size = self.store.size(name)
        except Exception as error:  # a missing shard: every read of it fails and says so
            logger.debug("cannot get the size of %s: %s", name, error)
            return
        if size != expected:
            logger.warning("shard %s is %d bytes but the index says %d: %s", join(self.root, name), size, expected,
                           "it is truncated; its samples past the end are unreadable" if size < expected else
                           "it is not the shard the index was written with")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_prefetched"] = {}
        return state
