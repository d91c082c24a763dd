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


def require_at_least(args, minimums: dict[str, int]) -> None:
    """A UsageError for the first flag, in order, whose value (when given) is below its minimum:
    ``require_at_least(args, {"--limit": 1, "--shots": 0})`` reads ``args.limit`` and ``args.shots``."""
    for flag, least in minimums.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < least:
            raise UsageError(flag, f"must be at least {least}, got {value}")
