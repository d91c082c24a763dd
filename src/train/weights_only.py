"""Resume without unpickling: every ``torch.load`` of a checkpoint's ``state/`` runs with ``weights_only=True``.

``accelerator.load_state`` hands ``state/`` to DeepSpeed, whose checkpoint engine calls
``torch.load(path, weights_only=False)``: a planted pickle in ``state/pytorch_model/*.pt`` would run code before
anything could fail. Here the load runs with ``torch.load`` forced to ``weights_only=True`` and a small allowlist of
the plain-data types that the state files really hold (DeepSpeed's optimizer partition records, the static loss
scaler, the ZeRO stage enum; numpy arrays in accelerate's RNG states). A file holding anything else is refused with an
error naming it; nothing outside the allowlist is ever constructed.
"""
from __future__ import annotations

import pickle
import re
from contextlib import contextmanager
from pathlib import Path


class UnsafeCheckpointError(ValueError):
    """A state file that does not load as plain weights and data (tampered with, or written by other code)."""


def allowed_globals() -> list:
    """The types DeepSpeed 0.19 and accelerate 1.15 put in step 3's state files (checked by
    tests/test_train_deepspeed.py: a resume from a real checkpoint works with exactly these)."""
    import codecs

    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    np_core = getattr(np, "_core", None) or np.core
    allowed = [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum,
               np_core.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode]
    allowed += [getattr(np.dtypes, n) for n in ("UInt32DType", "Int64DType", "Float64DType") if hasattr(np, "dtypes")]
    return allowed


def load_weights_only(path, map_location="cpu"):
    """``torch.load`` of one file with ``weights_only=True`` and the allowlist; refuses anything else."""
    import torch

    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(_refusal(path, e)) from None
    except (RuntimeError, EOFError) as e:
        raise _damaged(path, e) from None


def _refusal(path, error) -> str:
    """Our own line: torch's message advises retrying with ``weights_only=False``, which is exactly what must never
    be done with a file of unknown origin. Only the object it stopped at is kept from it (``Unsupported global:
    GLOBAL io.open ...``, or the pickle opcode it cannot read)."""
    text = " ".join(str(error).split())
    found = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global by default| Please use| Check the "
                      r"documentation|$)", text)
    detail = f" ({found.group(1).strip()})" if found and found.group(1).strip() else ""
    return (f"{path}: refused to load: it holds objects other than tensors and plain data{detail}, and loading it "
            f"could run code")


def _damaged(path, error: BaseException) -> BaseException:
    """A state file cut short or damaged (torch's zip reader: "failed finding central directory"; an empty file: EOF)
    as one line naming it; any other RuntimeError is passed on unchanged."""
    from src.common.errors import BadFile

    if isinstance(error, EOFError) or "PytorchStreamReader" in str(error):
        return BadFile(path, "damaged or incomplete checkpoint file (an interrupted copy?); resume from another "
                             "checkpoint")
    return error


@contextmanager
def forced_weights_only():
    """Within this block every ``torch.load`` (DeepSpeed's checkpoint engine and accelerate call it as
    ``torch.load(...)`` at call time, DeepSpeed 0.19 with ``weights_only=False``) runs weights-only with the allowlist.
    Relies on those libraries looking ``torch.load`` up at call time: pinned by the resume tests."""
    import torch

    original = torch.load

    def load(f, map_location=None, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed_globals()):
                return original(f, map_location=map_location, **kwargs)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(_refusal(f, e)) from None
        except (RuntimeError, EOFError) as e:
            raise _damaged(f, e) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def load_training_state(accelerator, state_dir, process_index: int, **load_kwargs) -> None:
    """``accelerator.load_state(state_dir)`` with no pickle executed. accelerate silently skips RNG states it cannot
    load, so this process's RNG file is checked first: a tampered one is an error, not a quietly inexact resume."""
    rng = Path(state_dir) / f"random_states_{process_index}.pkl"
    if rng.is_file():
        load_weights_only(rng)
    with forced_weights_only():
        accelerator.load_state(str(state_dir), **load_kwargs)
