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
from typing import Callable, Dict, List, Optional, TextIO

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import DataError, make_zip_dataset  # noqa: E402


class ProgressLine:
    """Progress of the conversion on stderr, never mixed into the log lines.

    On a terminal: one status line rewritten in place at most a few times a second; a log record first clears it
    and then draws it again below itself (log through :meth:`handler`). Elsewhere (a pipe, a file), where a
    rewritten line would be glued to the next message: an ordinary log line every 10% of a split.
    """

    def __init__(self, stream: Optional[TextIO] = None, interval_s: float = 0.2):
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.interval_s = interval_s
        self.last = 0.0
        self.text = ""
        self.next_percent: Dict[str, int] = {}

    def __call__(self, split: str, done: int, total: int) -> None:
        text = f"{split}: {done}/{total} images ({100.0 * done / total:.0f}%)"
        if not self.interactive:
            if done == total or 100 * done // total >= self.next_percent.get(split, 10):
                self.next_percent[split] = (100 * done // total) // 10 * 10 + 10
                logging.getLogger("make_zip_dataset").info("%s", text)
            return
        now = time.monotonic()
        if done < total and now - self.last < self.interval_s:
            return
        self.last = now
        self.clear()
        self.text = text
        self.redraw()
        if done == total:
            self.stream.write("\n")
            self.text = ""
        self.stream.flush()

    def clear(self) -> None:
        """Erases the status line, if one is drawn."""
        if self.text:
            self.stream.write("\r\033[K")

    def redraw(self) -> None:
        if self.text:
            self.stream.write(f"\r{self.text}")
            self.stream.flush()

    def handler(self) -> logging.Handler:
        """A log handler on the same stream that prints each record above the status line."""
        progress = self

        class AboveProgress(logging.StreamHandler):
            def emit(self, record: logging.LogRecord) -> None:
                progress.clear()
                super().emit(record)
                progress.redraw()

        return AboveProgress(self.stream)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder dataset root with train/ and val/")
    parser.add_argument("dst", help="output folder for the zips and map files (may be SRC)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to convert")
    args = parser.parse_args(argv)
    progress = ProgressLine()
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[progress.handler()])
    return run_writer(lambda: make_zip_dataset(args.src, args.dst, args.splits, progress=progress))


def run_writer(write: Callable[[], List[str]]) -> int:
    """Runs a dataset writer (it returns the files it left out) for the command line: exit status 2 and one line
    for a source or output that cannot be used, else 0 and how many files were left out."""
    try:
        skipped = write()
    except (DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if skipped:
        print(f"finished; {len(skipped)} unreadable files were left out (listed above)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
