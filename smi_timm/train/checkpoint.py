"""Atomic checkpoints of a run directory (the file layout itself lives in :mod:`smi_timm.layout`).

A checkpoint is written into ``RUN_DIR/checkpoints/.tmp-step_<N>`` and renamed to ``step_<N>`` only once every rank
has finished writing and ``trainer_state.json`` is on disk, so a crash while saving leaves the previous checkpoint
usable. Only the last ``keep_last`` complete checkpoints are kept.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import CheckpointError, NotFoundError, SmiTimmError
from ..layout import (
    TMP_PREFIX,
    TRAINER_STATE,
    checkpoint_dir,
    fsync_dir,
    fsync_files,
    latest_checkpoint,
    list_checkpoints,
    read_trainer_state,
    step_dir_name,
    write_json_atomic,
)

__all__ = ["checkpoint_dir", "list_checkpoints", "latest_checkpoint", "resolve_resume", "write_json_atomic",
           "save_checkpoint", "read_trainer_state", "TRAINER_STATE", "CheckpointWriteError", "UnsafeCheckpointError",
           "describe_write_error", "check_safe_to_load"]


def resolve_resume(resume: Optional[str], run_dir: os.PathLike) -> Optional[Path]:
    """``None``/``""`` → no resume; ``"auto"`` → the latest checkpoint of ``run_dir`` if any; else a path."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if checkpoint_dir(path).is_dir():  # a run directory
        latest = latest_checkpoint(path)
        if latest is None:
            raise NotFoundError(f"--resume {resume}: the run directory has no complete checkpoint")
        return latest
    if not (path / TRAINER_STATE).is_file():
        raise NotFoundError(
            f"--resume {resume}: not a checkpoint directory (no {TRAINER_STATE}); pass a RUN_DIR/checkpoints/step_* "
            f"directory, a run directory, or 'auto'"
        )
    return path


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (no space, permissions, an I/O error); the last good one is untouched."""


class UnsafeCheckpointError(SmiTimmError, RuntimeError):
    """A checkpoint's optimiser or RNG state is not a plain tensor file: it is refused rather than unpickled."""


def describe_write_error(exc: BaseException, folder: os.PathLike) -> str:
    """The cause of a failed write in the words of the operating system (``No space left on device``, ``Permission
    denied``, ...), whatever layer raised it: an ``OSError`` anywhere in the exception chain, a Rust I/O error of
    safetensors (``os error 28``), or, for torch's zip writer which names no cause, the free space left."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    match = re.search(r"os error (\d+)", text)
    if match:
        return os.strerror(int(match.group(1)))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < LOW_SPACE_BYTES:
        return f"{os.strerror(errno.ENOSPC)} ({free / 2 ** 20:.1f} MiB free)"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# Below this much free space, a write error that names no cause is reported as a full disk.
LOW_SPACE_BYTES = 64 * 2 ** 20


def _all_ranks_ok(accelerator, ok: bool) -> bool:
    """True when ``ok`` on every rank (one all-reduce): every rank takes the same branch after a failed write."""
    import torch

    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="sum").item()) == 0.0


def save_checkpoint(accelerator, run_dir: os.PathLike, step: int, state: Dict[str, Any], keep_last: int) -> Path:
    """Save the accelerate state and ``state`` atomically as ``step_{step:09d}``; every rank must call this.

    A failed write on any rank (full disk, permissions, I/O error) raises :class:`CheckpointWriteError` on every rank,
    naming the folder, the cause, the last good checkpoint and how to continue; the partial folder is removed and
    the last good checkpoint is never touched.
    """
    root = checkpoint_dir(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    last_good = latest_checkpoint(run_dir)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    error: Optional[BaseException] = None
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    except Exception as exc:  # OSError, torch's zip-writer RuntimeError, safetensors' SafetensorError
        error = exc
    if _all_ranks_ok(accelerator, error is None) and accelerator.is_main_process:
        try:
            fsync_files(tmp)  # accelerate does not fsync; do it before the rename makes the checkpoint visible
            write_json_atomic(tmp / TRAINER_STATE, state)
        except OSError as exc:
            error = exc
    if not _all_ranks_ok(accelerator, error is None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = describe_write_error(error, root) if error is not None else "it failed on another process"
        raise CheckpointWriteError(
            f"could not write the checkpoint of step {step} to {tmp}: {cause}. Training stopped at step {step}; the "
            f"partial folder was removed and the last good checkpoint is "
            f"{last_good if last_good is not None else 'none (no checkpoint had been written yet)'}. Free space "
            f"or fix the permissions of {root}, then continue with --resume auto."
        ) from error
    if accelerator.is_main_process:
        if final.exists():  # re-saving the same step (e.g. the end of a resumed run)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def check_safe_to_load(ckpt: os.PathLike, process_index: int) -> None:
    """Refuse a checkpoint whose optimiser or RNG state would need arbitrary unpickling.

    The weights are safetensors; accelerate stores the optimiser (``optimizer.bin``) and the RNG states
    (``random_states_<rank>.pkl``) with ``torch.save`` and loads them with ``weights_only=True`` (tensors, numbers,
    NumPy arrays, nothing executable). It ignores a failure to load the RNG states, though, which would make a resumed
    run silently differ from an uninterrupted one; this check loads both files the same way first and raises
    :class:`UnsafeCheckpointError` naming the file instead.
    """
    from accelerate.utils import load

    rng_state = f"random_states_{process_index}.pkl"
    for name in sorted(os.listdir(ckpt)):
        if not (name.startswith("optimizer") and name.endswith(".bin")) and name != rng_state:
            continue
        try:
            load(os.path.join(ckpt, name), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle.UnpicklingError and friends
            raise UnsafeCheckpointError(
                f"--resume: {os.path.join(ckpt, name)} is not a plain tensor file ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); refusing to unpickle it. A checkpoint written by "
                f"smi-timm never needs that: was the file replaced? Resume from another checkpoint, or start from "
                f"the weights only with --init-from."
            ) from exc
