"""Checksums of checkpoint files: the size and CRC-32 of a file, computed while it is written, and a check of the
CRC-32 that a torch zip file keeps for each of its records.

CRC-32 (``zlib.crc32``) detects any damage of up to 32 consecutive bits and all but one in 2^32 of the others; it is
not a defence against deliberate tampering (nor is anything stored next to the file it describes). It runs at
memory speed: ``python benchmarks/bench_checkpoint_checksum.py`` measures it against SHA-256 and BLAKE2b.
"""
import zipfile
import zlib
from typing import BinaryIO, NamedTuple, Optional

# Bytes read at a time when a file is checked: large enough that the per-call cost vanishes, small enough to
# keep memory flat for a multi-GB checkpoint.
CHUNK = 16 * 2 ** 20


class Digest(NamedTuple):
    """A file's size in bytes and the CRC-32 of its content."""
    size: int
    crc32: int

    def describe(self) -> str:
        return f"{self.size} bytes, CRC-32 {self.crc32:08x}"


class DigestWriter:
    """A binary file that computes the :class:`Digest` of what is written through it (``torch.save`` writes
    sequentially, so the checksum costs no second pass over the file).

    Args:
        file: the file opened for writing in binary mode.
    """

    def __init__(self, file: BinaryIO):
        self.file = file
        self.size = 0
        self.crc32 = 0

    def write(self, data) -> int:
        self.crc32 = zlib.crc32(data, self.crc32)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    @property
    def digest(self) -> Digest:
        return Digest(self.size, self.crc32)


def file_digest(path: str) -> Digest:
    """The :class:`Digest` of the file at ``path``, read in chunks.

    Raises:
        OSError: the file cannot be read.
    """
    size, crc = 0, 0
    with open(path, "rb") as file:
        while True:
            chunk = file.read(CHUNK)
            if not chunk:
                return Digest(size, crc)
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)


def zip_damage(path: str) -> Optional[str]:
    """What is damaged in a zip file (``torch.save``'s format keeps a CRC-32 of every record), or None when every
    record reads back with its CRC, or when the file is not a zip (the legacy format, which keeps none)."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as record:  # raises BadZipFile at the end of a record with the wrong CRC
                    while record.read(CHUNK):
                        pass
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as error:
        return f"its zip records do not read back as written ({error})"
    return None
