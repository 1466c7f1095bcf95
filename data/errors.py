"""The one exception the data pipeline raises for problems with the data itself."""
from typing import Tuple


class DataError(RuntimeError):
    """Data that cannot be used: a missing folder, a wrong layout, a class count that does not match the
    config, or too many unreadable images. The message says what was found and how to fix it.

    A DataError raised in a DataLoader worker reaches the main process re-created by the DataLoader with the
    text "Caught DataError in DataLoader worker process N. Original Traceback ..." and the worker's whole
    traceback. The message is then the original one again; the worker's text is kept in ``worker_traceback``.
    """

    def __init__(self, message: str = ""):
        message, self.worker_traceback = _unwrap_worker_message(type(self), str(message))
        super().__init__(message)


def _unwrap_worker_message(cls: type, message: str) -> Tuple[str, str]:
    """(the original message, the worker's text) for the text a DataLoader re-raises with, else (message, "")."""
    if not (message.startswith(f"Caught {cls.__name__} ") and "\nOriginal Traceback" in message):
        return message, ""
    # The traceback ends with "<module>.<class>: <original message>"; a chained cause comes before it.
    marker = f"\n{cls.__module__}.{cls.__qualname__}: "
    position = message.rfind(marker)
    if position < 0:
        return message, ""
    return message[position + len(marker):].rstrip("\n"), message
