"""Reading images straight out of a zip file, and writing the zip layout from a folder dataset.

Why not keep a ``zipfile.ZipFile`` per worker, as the reference does: its member table is a dict of
Python objects (several hundred MB for ImageNet's 1.28M files) that every DataLoader worker would hold,
and copy-on-write after fork duplicates it as soon as a worker touches it. Here the table is read once
into flat numpy arrays (offsets and sizes, which fork shares for free) and a worker reads a member with
one seek and one read on its own plain file handle.
"""
import collections
import contextlib
import io
import logging
import os
import struct
import zipfile
import zlib
from typing import BinaryIO, Callable, List, Optional, Sequence, Tuple

import numpy as np

from data.decode import UNREADABLE_ERRORS, open_image
from data.errors import DataError
from data.layout import find_classes, scan_images

logger = logging.getLogger(__name__)

# A local file header: signature, 22 bytes we do not need, file name length, extra field length.
_LOCAL_HEADER = struct.Struct("<4s22xHH")
_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
_READABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
# A fixed timestamp makes the written zips depend on the images only.
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)

ProgressFn = Callable[[str, int, int], None]


class ZipMembers:
    """Where the data of selected members of a zip file lies, for direct reads.

    Args:
        zip_path: the zip file.
        names: member names, in dataset order.

    Raises:
        DataError: the file is not a zip, a name is not in it, or a member is encrypted or compressed
            with something other than store/deflate.
    """

    def __init__(self, zip_path: str, names: Sequence[str]):
        self.zip_path = zip_path
        try:
            with zipfile.ZipFile(zip_path) as archive:
                members = archive.infolist()
            zip_size = os.path.getsize(zip_path)
        except (OSError, zipfile.BadZipFile) as error:
            raise DataError(f"cannot read zip file {zip_path}: {error}") from error
        infos = {info.filename: info for info in members}
        missing = [name for name in names if name not in infos]
        if missing:
            raise DataError(f"{len(missing)} images of the map file are not in {zip_path}, e.g. {missing[:3]}. "
                            "Map paths must be the member names inside the zip (as `unzip -l` lists them).")
        _check_unique(zip_path, [info.filename for info in members], names)
        selected = [infos[name] for name in names]
        bad = [info.filename for info in selected
               if info.compress_type not in _READABLE_METHODS or info.flag_bits & 0x1]
        if bad:
            raise DataError(f"{zip_path}: {len(bad)} members are encrypted or use a compression other than "
                            f"store/deflate, e.g. {bad[:3]}. Rewrite the zip with tools/make_zip_dataset.py.")
        _check_sizes(zip_path, zip_size, selected)
        self.header_offsets = np.array([info.header_offset for info in selected], dtype=np.int64)
        self.compressed_sizes = np.array([info.compress_size for info in selected], dtype=np.int64)
        self.sizes = np.array([info.file_size for info in selected], dtype=np.int64)
        self.deflated = np.array([info.compress_type == zipfile.ZIP_DEFLATED for info in selected], dtype=bool)

    def __len__(self) -> int:
        return len(self.header_offsets)

    def read(self, file: BinaryIO, index: int) -> bytes:
        """The uncompressed bytes of member ``index``, read through ``file`` (the zip opened in binary mode).

        Raises:
            OSError, zlib.error: a damaged member.
        """
        offset = int(self.header_offsets[index])
        file.seek(offset)
        header = file.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size:
            raise OSError(f"zip member {index} is cut off (file truncated?)")
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        if signature != _LOCAL_HEADER_SIGNATURE:
            raise OSError(f"zip member {index} has no valid local header at offset {offset}")
        file.seek(offset + _LOCAL_HEADER.size + name_length + extra_length)
        size = int(self.compressed_sizes[index])
        data = file.read(size)
        if len(data) != size:
            raise OSError(f"zip member {index} is cut off (file truncated?)")
        if self.deflated[index]:
            data = zlib.decompress(data, -zlib.MAX_WBITS)  # raw deflate stream, no zlib header
        return data


# Deflate expands at most about 1032-fold (258 bytes from a 2-bit code, plus block overhead); a member that declares
# more is damaged or crafted, and would make the cache ask for memory that its data can never fill.
_MAX_DEFLATE_RATIO = 1032


def _check_unique(zip_path: str, member_names: Sequence[str], names: Sequence[str]) -> None:
    """Refuses a zip holding two members of one name that the map file uses, and a map file naming a member twice:
    either way one image would be trained under another's label.

    Raises:
        DataError: naming the duplicates.
    """
    counts = collections.Counter(member_names)
    wanted = set(names)
    twice = sorted(name for name, count in counts.items() if count > 1 and name in wanted)
    if twice:
        raise DataError(f"{zip_path} holds {len(twice)} names twice or more (two members under one name, e.g. "
                        f"{twice[:3]}): the map file cannot say which member it means. Rewrite the zip with "
                        "tools/make_zip_dataset.py, or rename the members so that each name is one image.")
    listed = collections.Counter(names)
    again = sorted(name for name, count in listed.items() if count > 1)
    if again:
        raise DataError(f"the map file of {zip_path} lists {len(again)} members more than once, e.g. {again[:3]}: "
                        "each line must name another image")


def _check_sizes(zip_path: str, zip_size: int, infos: Sequence[zipfile.ZipInfo]) -> None:
    """Refuses members whose declared sizes their data cannot have: data past the end of the file, a stored
    member whose two sizes differ, a deflated one that would expand more than deflate can.

    Raises:
        DataError: naming the first such member and its sizes.
    """
    for info in infos:
        # The local header is at least 30 bytes plus the name before the data.
        end = info.header_offset + 30 + len(info.filename.encode()) + info.compress_size
        stored = info.compress_type == zipfile.ZIP_STORED
        if end > zip_size or (stored and info.file_size != info.compress_size) or \
                info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 64:
            raise DataError(f"{zip_path}: member {info.filename} declares {info.compress_size} bytes "
                            f"{'stored' if stored else 'compressed'} expanding to {info.file_size}, which its data "
                            f"cannot hold (the zip is {zip_size} bytes); the zip's directory is damaged. Rewrite "
                            "it with tools/make_zip_dataset.py.")


def available_memory() -> Optional[int]:
    """Bytes of memory the system can still give without swapping (Linux MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class MemberCache:
    """The bytes of some members of a zip held in memory, in one flat buffer.

    Args:
        members: the member table.
        indices: the members to hold (all of them for CACHE_MODE full, this rank's shard for part).

    Members that cannot be read are left out and logged; reading them later fails again, through the
    dataset's unreadable-image handling.
    """

    def __init__(self, members: ZipMembers, indices: np.ndarray):
        indices = np.asarray(indices, dtype=np.int64)
        self.starts = np.full(len(members), -1, dtype=np.int64)
        needed = int(members.sizes[indices].sum())
        available = available_memory()
        if available is not None and needed > available:
            raise DataError(f"caching {len(indices)} images of {members.zip_path} in memory needs {needed / 1e9:.1f} "
                            f"GB, more than the {available / 1e9:.1f} GB this machine has available. Use "
                            "--cache-mode part (each process caches its own shard) or --cache-mode no.")
        self.data = np.empty(needed, dtype=np.uint8)
        position = 0
        total = len(indices)
        with open(members.zip_path, "rb") as file:
            # Reading in file order turns the cache fill into one sequential pass over the zip.
            for count, index in enumerate(indices[np.argsort(members.header_offsets[indices])], start=1):
                size = int(members.sizes[index])
                try:
                    data = members.read(file, int(index))
                except (OSError, zlib.error) as error:
                    logger.warning("cannot cache member %d of %s: %s", index, members.zip_path, error)
                    continue
                if len(data) != size:
                    logger.warning("member %d of %s has %d bytes, its header says %d; not cached",
                                   index, members.zip_path, len(data), size)
                    continue
                self.data[position:position + size] = np.frombuffer(data, dtype=np.uint8)
                self.starts[index] = position
                position += size
                if count % 100_000 == 0:
                    logger.info("cached %d of %d images of %s", count, total, members.zip_path)
        self.sizes = members.sizes
        logger.info("cached %d images (%.1f MB) of %s in memory", total, position / 1e6, members.zip_path)

    def get(self, index: int) -> Optional[bytes]:
        """The bytes of member ``index``, or None when it is not held."""
        start = int(self.starts[index])
        if start < 0:
            return None
        return self.data[start:start + int(self.sizes[index])].tobytes()


def write_zip_split(split_dir: str, zip_path: str, map_path: str, class_names: Sequence[str],
                    progress: Optional[ProgressFn] = None) -> Tuple[int, List[str]]:
    """Writes one split folder as ``zip_path`` plus its map file.

    Both files are written under ``.tmp`` names and renamed when complete, so an interrupted run never
    leaves a partial file under the final name; after any failure the ``.tmp`` files are removed. A file
    that cannot be read (a dangling link, no permission) or is not an image by its header (the pixels are
    not decoded, which would take hours on ImageNet) is left out with a warning.

    Returns:
        The number of images written and the paths of the files left out.
    """
    paths, labels = scan_images(split_dir, class_names)
    if not paths:
        raise DataError(f"{split_dir} holds no image")
    split = os.path.basename(os.path.normpath(split_dir))
    zip_tmp, map_tmp = zip_path + ".tmp", map_path + ".tmp"
    skipped: List[str] = []
    try:
        with zipfile.ZipFile(zip_tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive, \
                open(map_tmp, "w", encoding="utf-8") as map_file:
            for count, (path, label) in enumerate(zip(paths, labels), start=1):
                name = path.replace(os.sep, "/")
                if "\t" in name or "\n" in name:
                    raise DataError(f"cannot store {os.path.join(split_dir, path)} in a map file: its name holds a "
                                    "tab or a newline. Rename the file.")
                data = _read_image_file(os.path.join(split_dir, path))
                if data is None:
                    skipped.append(os.path.join(split_dir, path))
                else:
                    info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
                    info.external_attr = 0o644 << 16
                    archive.writestr(info, data, compress_type=zipfile.ZIP_STORED)  # JPEGs do not compress
                    map_file.write(f"{name}\t{label}\n")
                if progress is not None:
                    progress(split, count, len(paths))
        if len(skipped) == len(paths):
            raise DataError(f"no file of {split_dir} could be read as an image (the warnings above list them)")
        os.replace(map_tmp, map_path)
        os.replace(zip_tmp, zip_path)
    except BaseException:
        for leftover in (zip_tmp, map_tmp):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
        raise
    return len(paths) - len(skipped), skipped


def _read_image_file(path: str) -> Optional[bytes]:
    """The bytes of an image file, or None (with a warning) when it cannot be read or is not an image."""
    return read_image_bytes(path, lambda: open(path, "rb"))


def read_image_bytes(name: str, open_stream: Callable[[], BinaryIO]) -> Optional[bytes]:
    """The encoded bytes of image ``name`` from the stream ``open_stream()`` gives, or None (with a warning naming
    it) when it cannot be read or is not an image by its header. The dataset writers' policy for bad files (the zip
    and the shard writer): such files are left out and listed; the pixels are not decoded, which would take hours.
    """
    try:
        with open_stream() as stream:
            data = stream.read()
        open_image(io.BytesIO(data))
    except UNREADABLE_ERRORS as error:
        logger.warning("skipped %s: it cannot be read as an image (%s: %s)", name, type(error).__name__, error)
        return None
    return data


def make_zip_dataset(src: str, dst: str, splits: Sequence[str] = ("train", "val"),
                     progress: Optional[ProgressFn] = None) -> List[str]:
    """Turns a folder dataset (``src/train``, ``src/val``) into the zip layout in ``dst``.

    Labels follow the sorted class folders of ``src/train``. A split whose zip and map file both exist
    is skipped, so an interrupted run can simply be started again.

    Args:
        src: root of the folder dataset.
        dst: output folder (created if needed; may be ``src``).
        splits: the splits to convert.
        progress: called as ``progress(split, done, total)`` after each image.

    Returns:
        The files left out because they could not be read (each also logged).
    """
    class_names = find_classes(os.path.join(src, "train"))
    os.makedirs(dst, exist_ok=True)
    skipped: List[str] = []
    for split in splits:
        zip_path = os.path.join(dst, f"{split}.zip")
        map_path = os.path.join(dst, f"{split}_map.txt")
        if os.path.isfile(zip_path) and os.path.isfile(map_path):
            logger.info("%s and %s exist; skipping split %s", zip_path, map_path, split)
            continue
        count, left_out = write_zip_split(os.path.join(src, split), zip_path, map_path, class_names, progress)
        logger.info("wrote %s (%d images, %d classes) and %s", zip_path, count, len(class_names), map_path)
        if left_out:
            logger.warning("left %d unreadable files of %s out of %s: %s", len(left_out), split, zip_path,
                           ", ".join(left_out))
        skipped.extend(left_out)
    return skipped
