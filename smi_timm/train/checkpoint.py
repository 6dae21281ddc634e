"""Atomic checkpoints of a run directory.

Layout::

    RUN_DIR/checkpoints/step_000001000/      a complete checkpoint (accelerate ``save_state`` + trainer_state.json)
    RUN_DIR/checkpoints/.tmp-step_000001500/  a save in progress (ignored; removed by the next save)

A checkpoint is written into a ``.tmp-*`` directory and renamed to ``step_*`` only once every rank has finished
writing and ``trainer_state.json`` is on disk, so a crash while saving leaves the previous checkpoint usable. Only
the last ``keep_last`` complete checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["checkpoint_dir", "list_checkpoints", "latest_checkpoint", "resolve_resume", "write_json_atomic",
           "save_checkpoint", "read_trainer_state", "TRAINER_STATE"]

TRAINER_STATE = "trainer_state.json"
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: os.PathLike) -> List[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: os.PathLike) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: Optional[str], run_dir: os.PathLike) -> Optional[Path]:
    """``None``/``""`` → no resume; ``"auto"`` → the latest checkpoint of ``run_dir`` if any; else a path."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if (path / "checkpoints").is_dir():  # a run directory
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"--resume {resume}: the run directory has no complete checkpoint")
        return latest
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: not a checkpoint directory (no {TRAINER_STATE}); pass a RUN_DIR/checkpoints/step_* "
            f"directory, a run directory, or 'auto'"
        )
    return path


def write_json_atomic(path: os.PathLike, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(accelerator, run_dir: os.PathLike, step: int, state: Dict[str, Any], keep_last: int) -> Path:
    """Save the accelerate state and ``state`` atomically as ``step_{step:09d}``; every rank must call this."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:09d}"
    tmp = root / f".tmp-step_{step:09d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for f in tmp.iterdir():  # accelerate does not fsync; do it before the rename makes the checkpoint visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        write_json_atomic(tmp / TRAINER_STATE, state)
        if final.exists():  # re-saving the same step (e.g. the end of a resumed run)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(ckpt: os.PathLike) -> Dict[str, Any]:
    with open(Path(ckpt) / TRAINER_STATE) as f:
        return json.load(f)
