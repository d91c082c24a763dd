"""Error types for bad input: a bad record names the file, the record and the field; a bad flag names the flag; a bad
whole file names the file."""
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


def require_at_least(args, minimums: dict[str, int]) -> None:
    """A UsageError for the first flag, in order, whose value (when given) is below its minimum:
    ``require_at_least(args, {"--limit": 1, "--shots": 0})`` reads ``args.limit`` and ``args.shots``."""
    for flag, least in minimums.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < least:
            raise UsageError(flag, f"must be at least {least}, got {value}")


class BadFile(ValueError):
    """A whole file that is wrong (empty, truncated, damaged, of an unknown version, not what its place says it is):
    the message starts with the file."""

    def __init__(self, path, message: str):
        self.path, self.reason = str(path), message
        super().__init__(f"{path}: {message}")
