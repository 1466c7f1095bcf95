"""The one exception the data pipeline raises for problems with the data itself."""


class DataError(RuntimeError):
    """Data that cannot be used: a missing folder, a wrong layout, a class count that does not match the
    config, or too many unreadable images. The message says what was found and how to fix it."""
