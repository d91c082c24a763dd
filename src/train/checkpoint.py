"""Checkpoints of step 3: HF format + full trainer state, written atomically, rotated, and found again for resume.

Layout of ``OUT/checkpoint-<step>/``:

- the model in Hugging Face format (``config.json``, ``model.safetensors``, ``generation_config.json``) and the
  tokenizer: ``AutoModelForCausalLM.from_pretrained(OUT/checkpoint-<step>)`` loads a dense one, the project's loader
  (``src.models.loading.load_model``) an MoE one, and step 4 evaluates either unchanged;
- ``trainer_state.json``: the optimizer step, epoch, data position, the settings that must match on resume and the
  sha256 of every weight file (``weights_sha256``; every loader checks them, src/models/integrity.py);
- ``state/``: ``accelerator.save_state`` (the DeepSpeed engine's weights and optimizer partitions, the LR scheduler and
  every process's RNG states).

Atomicity: everything is written into ``OUT/.tmp-checkpoint-<step>/`` and renamed to ``checkpoint-<step>`` once every
process has finished writing (a rename is atomic on POSIX filesystems). A crash while saving leaves only the temporary
folder, which is ignored and removed by the next run; the previous checkpoint stays intact and ``--resume latest``
picks it. Rotation (``--max-ckpts``) deletes the oldest checkpoints by step number, only after the new one is complete,
and never the one just written. Re-saving a step renames the old copy to ``.old-checkpoint-<step>`` first; a crash
before the new copy is in place leaves that, which the next run puts back. A fresh run refuses an --out that holds
checkpoints (``--resume latest`` continues them, ``--overwrite`` deletes them first).

Resume loads ``state/`` without unpickling anything (``weights_only.py``), and checks that the step in
trainer_state.json is the one the restored scheduler and optimizer counted (``saved_step_counters``).
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from src.models import integrity
from src.train import lora

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-" + PREFIX
TRASH_PREFIX = ".trash-" + PREFIX
OLD_PREFIX = ".old-" + PREFIX  # a checkpoint being replaced by a new save of the same step (restored if orphaned)
EVAL_TMP_PREFIX = ".tmp-eval-"  # ZeRO-3 dev evaluation: a temporary full copy of the weights
STATE_FILE = integrity.STATE_FILE
STATE_DIR = "state"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
# Test hook: crash (os._exit) in the middle of the save at this step ("N"), after the files are written but before
# the rename, or wait there to be killed ("pause-N"), or crash between the two renames of a re-save ("replace-N"),
# to check that an interrupted save leaves the previous checkpoint usable.
CRASH_ENV = "APOLLO_TRAIN_CRASH_IN_SAVE_AT_STEP"


def out_dir_is_shared(accelerator, out_dir) -> bool:
    """Is ``out_dir`` one folder seen by every node (the normal case on clusters)? Then only the global main process
    renames and rotates checkpoints; otherwise each node's local main process does it in its own copy. Found out by
    a marker file the main process writes and every process looks for (a collective: all ranks call it)."""
    import torch
    from accelerate.utils import broadcast_object_list

    out_dir = Path(out_dir)
    token = [f"{os.getpid()}-{time.time()}" if accelerator.is_main_process else None]
    broadcast_object_list(token)
    marker = out_dir / ".shared-fs-probe"
    if accelerator.is_main_process:
        marker.write_text(token[0])
    accelerator.wait_for_everyone()
    seen = marker.is_file() and marker.read_text() == token[0]
    shared = bool(accelerator.gather(torch.tensor([int(seen)], device=accelerator.device)).min().item())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process or (not shared and accelerator.is_local_main_process):
        marker.unlink(missing_ok=True)
    return shared


def list_checkpoints(out_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out_dir`` as (step, path), oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(spec: str | None, out_dir) -> Path | None:
    """``--resume``: None (fresh run), ``latest`` (newest complete checkpoint in OUT, or a fresh run if there is none)
    or a checkpoint folder."""
    if not spec:
        return None
    if spec == "latest":
        return latest_checkpoint(out_dir)
    path = Path(spec)
    if not (path / STATE_FILE).is_file() or not (path / STATE_DIR).is_dir():
        raise FileNotFoundError(f"--resume {spec}: not a complete step 3 checkpoint (no {STATE_FILE} or {STATE_DIR}/)")
    return path


def read_trainer_state(path) -> dict:
    """trainer_state.json of a checkpoint, of a format_version this code reads."""
    return integrity.read_state(path)


def saved_step_counters(scheduler, engine) -> dict[str, int]:
    """The optimizer steps counted by the state restored from ``state/``: the LR scheduler's ``last_epoch`` (one per
    optimizer step here; accelerate's wrapper keeps torch's scheduler as ``.scheduler``) and the DeepSpeed engine's
    ``global_steps`` (accelerate 1.15, DeepSpeed 0.19; pinned by tests/test_fault_probes.py's resume tests)."""
    counters = {}
    inner = getattr(scheduler, "scheduler", scheduler)
    if isinstance(getattr(inner, "last_epoch", None), int):
        counters["scheduler"] = inner.last_epoch
    if isinstance(getattr(engine, "global_steps", None), int):
        counters["optimizer"] = engine.global_steps
    return counters


def check_out_dir(out_dir, resume_from: Path | None, *, overwrite: bool) -> list[Path]:
    """Refuse a fresh run into an --out that holds checkpoints of another run (rotation by step number would delete
    the new run's checkpoints as it saves them); with ``overwrite``, return what the fresh run must delete first."""
    from src.common.errors import UsageError

    out_dir = Path(out_dir)
    if overwrite and resume_from is not None:
        raise UsageError("--overwrite", "starts afresh and cannot be combined with --resume")
    existing = [p for _, p in list_checkpoints(out_dir)]
    if overwrite:
        extra = [out_dir / "train_log.jsonl", out_dir / "dev"]
        return existing + [p for p in extra if p.exists()]
    if not existing or (resume_from is not None and resume_from.resolve().parent == out_dir.resolve()):
        return []
    names = ", ".join(p.name for p in existing)
    raise UsageError("--out", f"{out_dir} holds checkpoints of an earlier run ({names}); continue that run with "
                              f"--resume latest, or delete them and start again with --overwrite")


def clear_previous_run(paths, log=print) -> None:
    for p in paths:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        log(f"[train] --overwrite: removed {p}")


def clean_stale(out_dir) -> list[Path]:
    """Remove temporary folders that an interrupted save or deletion left behind, and put back a checkpoint whose
    replacement was interrupted between its two renames. Returns what was removed."""
    out_dir = Path(out_dir)
    removed = []
    if out_dir.is_dir():
        for p in sorted(out_dir.iterdir()):
            if p.name.startswith(OLD_PREFIX) and p.is_dir():
                final = out_dir / (PREFIX + p.name[len(OLD_PREFIX):])
                if not final.exists():
                    os.replace(p, final)  # the new copy never arrived: the old one is the complete checkpoint
                    continue
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
                continue
            if p.name.startswith((TMP_PREFIX, TRASH_PREFIX, EVAL_TMP_PREFIX)) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def rotate(out_dir, max_ckpts: int, keep: Path | None = None) -> list[Path]:
    """Delete the oldest checkpoints (by step) so that at most ``max_ckpts`` remain; <= 0 keeps all. ``keep`` (the
    checkpoint just written) is never deleted, even when older than the others."""
    if max_ckpts <= 0:
        return []
    ckpts = [p for _, p in list_checkpoints(out_dir)]
    others = [p for p in ckpts if keep is None or p.name != Path(keep).name]
    doomed = others[: max(0, len(ckpts) - max_ckpts)]
    for p in doomed:
        # Rename first so that a crash mid-deletion never leaves a half-deleted folder under a checkpoint name.
        trash = p.with_name(TRASH_PREFIX + p.name[len(PREFIX):])
        try:
            os.replace(p, trash)
        except FileNotFoundError:  # another node (shared filesystem) got there first
            continue
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():  # the same step saved again (e.g. a resumed run re-saving): keep the newest
        # A crash between the two renames leaves only .old-checkpoint-N: clean_stale puts it back.
        old = final.with_name(OLD_PREFIX + final.name[len(PREFIX):])
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        if os.environ.get(CRASH_ENV) == f"replace-{final.name[len(PREFIX):]}":
            os._exit(17)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_checkpoint(accelerator, model, tokenizer, out_dir, step: int, trainer_state: dict, *, is_moe: bool,
                    max_ckpts: int, renamer: bool, log=print) -> Path:
    """Save checkpoint ``step`` atomically on every process (a collective: all ranks must call it).

    ``renamer`` is True on the process that renames and rotates: the global main process when OUT is on a filesystem
    shared by all nodes, each node's local main process otherwise.
    """
    out_dir = Path(out_dir)
    tmp = out_dir / f"{TMP_PREFIX}{step}"
    final = out_dir / f"{PREFIX}{step}"
    if renamer and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    t0 = time.time()
    try:
        save_hf_model(accelerator, model, tokenizer, tmp, is_moe=is_moe)
        accelerator.save_state(str(tmp / STATE_DIR), **lora.state_save_kwargs(model))
    except BaseException as e:
        _discard_partial(tmp, e, renamer)
        raise
    accelerator.wait_for_everyone()
    if os.environ.get(CRASH_ENV) == str(step):
        log(f"[train] {CRASH_ENV}={step}: simulating a crash in the middle of saving {final.name}")
        os._exit(17)
    if os.environ.get(CRASH_ENV) == f"pause-{step}":  # tests/test_faults.py kills -9 the process here
        log(f"[train] {CRASH_ENV}=pause-{step}: waiting in the middle of saving {final.name}")
        time.sleep(3600)
    if renamer:
        from src.common.io import write_json

        # the weight files' digests, read back while they are still in the page cache; every loader checks them
        trainer_state = {"format_version": integrity.STATE_VERSION, **trainer_state,
                         integrity.DIGESTS_KEY: integrity.weight_digests(tmp)}
        write_json(tmp / STATE_FILE, trainer_state)  # last file written: its presence marks a complete checkpoint
        _replace_dir(tmp, final)
        for p in rotate(out_dir, max_ckpts, keep=final):
            log(f"[train] rotation (--max-ckpts {max_ckpts}): removed {p.name}")
    accelerator.wait_for_everyone()
    log(f"[train] saved {final} in {time.time() - t0:.1f}s")
    return final


def _discard_partial(tmp: Path, error: BaseException, renamer: bool) -> None:
    """A save that failed (a full disk: torch's C++ writer reports it as a RuntimeError) leaves no partial folder;
    the last complete checkpoint stays the one ``--resume latest`` finds. A full disk is re-raised as ENOSPC with
    the folder it was writing, for the one-line error."""
    import errno

    from src.common.cli import no_space_path

    full = no_space_path(error) is not None or (isinstance(error, (OSError, RuntimeError)) and _disk_full(tmp.parent))
    if renamer:
        shutil.rmtree(tmp, ignore_errors=True)
    if full:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp.parent)) from error


def _disk_full(folder: Path) -> bool:
    """Does a 1 MiB write fail for lack of space? torch's zip writer reports a short write as "unexpected pos ...",
    without the OS error, so ask the filesystem."""
    import errno

    probe = folder / ".space-probe"
    try:
        with probe.open("wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
        return False
    except OSError as e:
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    finally:
        probe.unlink(missing_ok=True)


def save_hf_model(accelerator, model, tokenizer, out_dir: Path, *, is_moe: bool) -> None:
    """The model in HF format (16-bit weights gathered under ZeRO-3) and its tokenizer, written by the main process."""
    unwrapped = accelerator.unwrap_model(model)
    if lora.is_lora(unwrapped):
        lora.save_adapter(accelerator, model, unwrapped, tokenizer, out_dir)
        return
    if is_moe:
        _save_moe(accelerator, model, unwrapped, tokenizer, out_dir)
        return
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3
    if accelerator.is_main_process:
        unwrapped.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)


def _save_moe(accelerator, engine, unwrapped, tokenizer, out_dir: Path) -> None:
    from src.models import moe

    zero3 = getattr(engine, "zero_optimization_stage", lambda: 0)() == 3
    if zero3:
        import deepspeed

        # Gather the full parameters on every rank for the duration of the save (the MoE saver reads the module).
        with deepspeed.zero.GatheredParameters(list(unwrapped.parameters()), modifier_rank=None):
            if accelerator.is_main_process:
                moe.save_moe(unwrapped, tokenizer, out_dir)
    elif accelerator.is_main_process:
        moe.save_moe(unwrapped, tokenizer, out_dir)
