"""Output folders of the model tools (averaging, LoRA merging, upcycling, exports, imports): where they may go and how
they are written.

- ``check_out``: an --out that is, holds or lies inside one of the tool's inputs, or a training checkpoint, is
  refused even with --overwrite (writing there would replace the weights being read, or change a checkpoint under
  its trainer_state.json); an --out that already holds files needs --overwrite.
- ``staged_folder``: the tool writes into a temporary sibling of --out, which replaces --out in one rename once
  everything is written, as step 3 does with its checkpoints: an interrupted tool leaves --out as it was (a tool
  killed with kill -9 also leaves a ``.tmp-<name>-*`` sibling, safe to delete).
"""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from src.common.errors import UsageError

TMP_PREFIX, OLD_PREFIX = ".tmp-", ".old-"


def check_out(out, inputs, *, overwrite: bool, flag: str = "--out") -> Path:
    """Refuse ``out`` (a UsageError naming ``flag``) where writing it could damage an input or a checkpoint, or
    replace earlier results without --overwrite. Returns ``out`` as a Path."""
    from src.models.integrity import STATE_FILE

    out = Path(out)
    where = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        relation = ("is" if where == source else "lies inside" if source in where.parents else
                    "holds" if where in source.parents else None)
        if relation:
            raise UsageError(flag, f"{out} {relation} the input {given}: writing it would replace what is being "
                                   f"read; choose a folder apart from the inputs")
    for folder in (where, *where.parents):
        if (folder / STATE_FILE).is_file():
            raise UsageError(flag, f"{out} {'is' if folder == where else 'lies inside'} the step 3 checkpoint "
                                   f"{folder}: its {STATE_FILE} would describe other weights; choose a folder "
                                   f"outside checkpoints")
    if where.is_dir():
        inner = next(where.rglob(STATE_FILE), None)
        if inner is not None:
            raise UsageError(flag, f"{out} holds the step 3 checkpoint {inner.parent}; choose another folder")
        if any(where.iterdir()) and not overwrite:
            raise UsageError(flag, f"{out} is not empty (pass --overwrite to replace it)")
    elif where.exists():
        raise UsageError(flag, f"{out} is a file, not a folder")
    return out


@contextmanager
def staged_folder(out):
    """Yield a fresh temporary folder beside ``out``; when the block ends without an error it takes the place of
    ``out`` (an existing ``out`` is set aside first and deleted once the new one is in place); on an error or Ctrl-C
    it is deleted and ``out`` is left as it was."""
    out = Path(out)
    tmp = _sibling(out, TMP_PREFIX)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = _sibling(out, OLD_PREFIX)  # a kill between the two renames leaves the previous folder here
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _sibling(out: Path, prefix: str) -> Path:
    """A new empty folder beside ``out`` (created with the usual permissions, unlike tempfile's private ones)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = out.parent / f"{prefix}{out.name}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    return folder
