"""Logging set-up, done once per process: colored console on rank 0, a plain file per rank."""
import logging
import os
import sys

from termcolor import colored

_FORMAT = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
_DATE = "%Y-%m-%d %H:%M:%S"


class _ColorFormatter(logging.Formatter):
    """Greens the time and name, reds warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return colored(text, "red")
        head, _, tail = text.partition("]")
        return colored(head + "]", "green") + tail


def setup_logging(output_dir: str, rank: int = 0, level: int = logging.INFO, name: str = "log") -> None:
    """Sends every logger's records to ``output_dir/{name}_rank{rank}.txt`` and, on rank 0, to the console.

    Calling it again replaces the handlers (tests run several jobs in one process).
    """
    os.makedirs(output_dir, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    file_handler = logging.FileHandler(os.path.join(output_dir, f"{name}_rank{rank}.txt"), mode="a")
    file_handler.setFormatter(logging.Formatter(_FORMAT, _DATE))
    root.addHandler(file_handler)
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        formatter = _ColorFormatter if sys.stdout.isatty() else logging.Formatter
        console.setFormatter(formatter(_FORMAT, _DATE))
        root.addHandler(console)
