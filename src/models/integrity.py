"""Is a model folder whole? Every safetensors file must parse (its header must match its size), and the weight files of
a step 3 checkpoint must still have the sha256 digests step 3 recorded in its ``trainer_state.json`` when it saved
them. A file cut short by an interrupted copy, or changed by a single byte, is then one clear error naming it, never a
load that crashes midway or a model that silently scores differently.

Cost: the header check reads a few kilobytes per file; the digest check reads every weight byte once more (sha256,
streamed; docs/reliability.md says what it costs per GB). A file is verified once per process as long as its size and
modification time stay the same, so a stage that checks a folder early and loads it later hashes it once.
"""
from __future__ import annotations

from pathlib import Path

from src.common.errors import BadFile
from src.common.io import file_sha256

STATE_FILE = "trainer_state.json"  # a step 3 checkpoint's state: written last, so its presence marks a complete one
STATE_VERSION = 2  # 1: no digests (checkpoints written before them, still read); 2: DIGESTS_KEY
DIGESTS_KEY = "weights_sha256"  # file name -> sha256 of each *.safetensors file of the checkpoint folder
_verified: set[tuple] = set()  # (file, size, mtime, digest) already checked in this process


def check_safetensors(path: Path) -> None:
    """A BadFile naming ``path`` unless it is a complete safetensors file (safetensors' own header check: the header
    parses and the tensors it lists cover the file exactly)."""
    from safetensors import SafetensorError, safe_open

    size = path.stat().st_size
    if size == 0:
        raise BadFile(path, "empty file (0 bytes), not safetensors weights: an interrupted copy or download?")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as e:
        reason = str(e).removeprefix("Error while deserializing header: ")
        raise BadFile(path, f"damaged or incomplete safetensors file ({reason}; {size:,} bytes): an interrupted "
                            f"copy or download? Copy it again from where it came from") from None


def weight_digests(folder: Path) -> dict[str, str]:
    """sha256 of every safetensors file directly in ``folder`` (what step 3 records when it saves a checkpoint)."""
    return {f.name: file_sha256(f) for f in sorted(Path(folder).glob("*.safetensors"))}


def read_state(folder: Path) -> dict | None:
    """The checkpoint's trainer_state.json (None when the folder has none), refused when it is not a JSON object or
    of a format_version newer than this code reads."""
    from src.common.io import read_json

    file = Path(folder) / STATE_FILE
    if not file.is_file():
        return None
    state = read_json(file)
    if not isinstance(state, dict):
        raise BadFile(file, f"expected a JSON object, got {type(state).__name__}")
    version = state.get("format_version", 1)
    if not isinstance(version, int) or not 1 <= version <= STATE_VERSION:
        raise BadFile(file, f"format_version {version!r} is not one this code reads (1 to {STATE_VERSION}): written "
                            f"by a newer version of the project, or edited")
    return state


def verify_weights(folder: Path) -> int:
    """Check every weight file against the digest its checkpoint recorded; returns how many were checked (0 for a
    folder without recorded digests: not a step 3 checkpoint, or one saved before digests existed)."""
    folder = Path(folder)
    state = read_state(folder)
    digests = (state or {}).get(DIGESTS_KEY) or {}
    if not isinstance(digests, dict):
        raise BadFile(folder / STATE_FILE, f"field {DIGESTS_KEY!r}: expected an object of file name -> sha256")
    for name, want in sorted(digests.items()):
        file = folder / name
        if not file.is_file():
            raise BadFile(file, f"missing: {STATE_FILE} lists it among the checkpoint's weight files")
        stat = file.stat()
        key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns, want)
        if key in _verified:
            continue
        if file_sha256(file) != want:
            raise BadFile(file, f"its sha256 differs from the one recorded in {STATE_FILE} when step 3 saved it: "
                                f"the file was changed or damaged since; copy the checkpoint again, or use another")
        _verified.add(key)
    return len(digests)


def check_weights(folder: Path) -> None:
    """The whole check of a local model folder's weights: every safetensors file parses, and the recorded digests
    (when there are any) match."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors(file)
    verify_weights(folder)
