"""Checkpoints of step 3: HF format + full trainer state, written atomically, rotated, and found again for resume.

Layout of ``OUT/checkpoint-<step>/``:

- the model in Hugging Face format (``config.json``, ``model.safetensors``, ``generation_config.json``) and the
  tokenizer: ``AutoModelForCausalLM.from_pretrained(OUT/checkpoint-<step>)`` loads a dense one, the project's loader
  (``src.models.loading.load_model``) an MoE one, and step 4 evaluates either unchanged;
- ``trainer_state.json``: the optimizer step, epoch, data position and the settings that must match on resume;
- ``state/``: ``accelerator.save_state`` (the DeepSpeed engine's weights and optimizer partitions, the LR scheduler and
  every process's RNG states).

Atomicity: everything is written into ``OUT/.tmp-checkpoint-<step>/`` and renamed to ``checkpoint-<step>`` once every
process has finished writing (a rename is atomic on POSIX filesystems). A crash while saving leaves only the temporary
folder, which is ignored and removed by the next run; the previous checkpoint stays intact and ``--resume latest``
picks it. Rotation (``--max-ckpts``) deletes the oldest checkpoints by step number, only after the new one is complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from . import lora

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-" + PREFIX
TRASH_PREFIX = ".trash-" + PREFIX
EVAL_TMP_PREFIX = ".tmp-eval-"  # ZeRO-3 dev evaluation: a temporary full copy of the weights
STATE_FILE = "trainer_state.json"
STATE_DIR = "state"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
# Test hook: crash (os._exit) in the middle of the save at this step, after the files are written but before the
# rename, to check that an interrupted save leaves the previous checkpoint usable.
CRASH_ENV = "APOLLO_TRAIN_CRASH_IN_SAVE_AT_STEP"


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
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def clean_stale(out_dir) -> list[Path]:
    """Remove temporary folders that an interrupted save or deletion left behind. Returns what was removed."""
    out_dir = Path(out_dir)
    removed = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            if p.name.startswith((TMP_PREFIX, TRASH_PREFIX, EVAL_TMP_PREFIX)) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def rotate(out_dir, max_ckpts: int) -> list[Path]:
    """Delete the oldest checkpoints (by step) so that at most ``max_ckpts`` remain; <= 0 keeps all."""
    if max_ckpts <= 0:
        return []
    ckpts = list_checkpoints(out_dir)
    doomed = [p for _, p in ckpts[: max(0, len(ckpts) - max_ckpts)]]
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
        old = final.with_name(TRASH_PREFIX + final.name[len(PREFIX):] + f"-{int(time.time())}")
        os.replace(final, old)
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
    save_hf_model(accelerator, model, tokenizer, tmp, is_moe=is_moe)
    accelerator.save_state(str(tmp / STATE_DIR), **lora.state_save_kwargs(model))
    accelerator.wait_for_everyone()
    if os.environ.get(CRASH_ENV) == str(step):
        log(f"[train] {CRASH_ENV}={step}: simulating a crash in the middle of saving {final.name}")
        os._exit(17)
    if renamer:
        from src.common.io import write_json

        write_json(tmp / STATE_FILE, trainer_state)  # last file written: its presence marks a complete checkpoint
        _replace_dir(tmp, final)
        for p in rotate(out_dir, max_ckpts):
            log(f"[train] rotation (--max-ckpts {max_ckpts}): removed {p.name}")
    accelerator.wait_for_everyone()
    log(f"[train] saved {final} in {time.time() - t0:.1f}s")
    return final


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
