"""One error type for bad input: it always names the file, the record and the field."""
from __future__ import annotations


class DataError(ValueError):
    def __init__(self, path, index, field: str | None, message: str):
        self.path, self.index, self.field, self.reason = str(path), index, field, message
        where = f"{self.path}: record {index}" + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {message}")


class UsageError(ValueError):
    """A wrong flag value or a refused request: the message starts with the flag (``--out: ...``)."""

    def __init__(self, flag: str, message: str):
        self.flag, self.reason = flag, message
        super().__init__(f"{flag}: {message}" if flag else message)
