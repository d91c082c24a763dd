"""One writer per output folder: steps 2, 3 and 4 hold ``OUT/.lock`` while they write there.

Two runs into one --out (two step 4 runs once computed 238 predictions for 140 items) interleave their files; the
second one now refuses to start, naming the first. The lock is an ``flock`` on the file, so the kernel releases it
when its process ends, however it ends (kill -9 included): a lock is never stale. A run that ends normally also
removes the file (unlinked while still locked, so no second run can slip in between). Within one
``accelerate launch`` only the main process takes it (the other ranks are the same run).
"""
from __future__ import annotations

import atexit
import json
import os
import time
from pathlib import Path

from src.common.errors import UsageError

LOCK_NAME = ".lock"
_held: dict[str, int] = {}  # folder -> descriptor of the lock this process holds (kept open until exit)


def hold(out_dir, what: str, flag: str = "--out") -> Path:
    """Take ``OUT/.lock`` for the rest of this process, or raise a UsageError naming the process that holds it."""
    import fcntl

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    key = str(path.resolve())
    if key in _held:
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _read_owner(fd)
        os.close(fd)
        raise UsageError(flag, f"{out_dir} is being written by another process ({owner}); wait for it to finish "
                               f"or use another {flag}") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "what": what,
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
    _held[key] = fd
    return path


def release(out_dir) -> None:
    """Remove and unlock ``OUT/.lock`` if this process holds it (at exit at the latest)."""
    key = str((Path(out_dir) / LOCK_NAME).resolve())
    fd = _held.pop(key, None)
    if fd is not None:
        Path(key).unlink(missing_ok=True)
        os.close(fd)


@atexit.register
def _release_all() -> None:
    for key in list(_held):
        release(Path(key).parent)


def _read_owner(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return "unknown"
    return f"{info.get('what', '?')}, pid {info.get('pid', '?')}, since {info.get('since', '?')}"


def hold_for_launch(out_dir, what: str, *, main_process: bool, world_size: int) -> None:
    """``hold`` on the main process of a launch; every process learns the outcome, so a refused launch ends on all
    of them instead of leaving the others waiting in a collective."""
    refusal = [None]
    if main_process:
        try:
            hold(out_dir, what)
        except UsageError as e:
            refusal = [str(e)]
    if world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise UsageError("", refusal[0])
