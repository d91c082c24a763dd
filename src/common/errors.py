"""One error type for bad input: it always names the file, the record and the field."""
from __future__ import annotations


class DataError(ValueError):
    def __init__(self, path, index, field: str | None, message: str):
        self.path, self.index, self.field, self.reason = str(path), index, field, message
        where = f"{self.path}: record {index}" + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {message}")
