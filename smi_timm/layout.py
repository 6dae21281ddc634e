"""File layouts of run directories and export folders: every file name, checkpoint discovery and atomic writes.

The one home for where things live on disk (as timm's ``models/_hub.py`` is for hub files). Training, export,
evaluation and analysis all find files through this module.

Run directory (``smi-pretrain --output-dir RUN_DIR``)::

    RUN_DIR/run_config.json                    RUN_CONFIG: model, projector, stem, image size, mean/std, loss, recipe
    RUN_DIR/metrics.jsonl                      METRICS: one JSON object per line, each with a "step"
    RUN_DIR/training_curve.png                 CURVE_PNG
    RUN_DIR/train_summary.json                 TRAIN_SUMMARY: status, steps, run-average throughput
    RUN_DIR/checkpoints/step_000001000/        a complete checkpoint (accelerate state incl. model.safetensors,
                                               plus trainer_state.json)
    RUN_DIR/checkpoints/.tmp-step_000001500/   a save in progress: ignored, removed by the next save
    RUN_DIR/export/                            EXPORT_DIR: the end-of-run export folder

Export folder (``smi-export RUN_DIR OUT``)::

    OUT/model.safetensors       WEIGHTS_NAME: the backbone, timm key names
    OUT/projector.safetensors   PROJECTOR_NAME: optional, ``SSLModel.projector`` key names
    OUT/config.json             CONFIG_NAME: timm's pretrained-config format + an ``smi`` block
    OUT/README.md               MODEL_CARD: optional, the Hugging Face Hub model card (``smi-export --push-to-hub``)

Writes are atomic: a temporary file in the target folder, fsync, ``os.replace``, fsync of the folder. The standard
library has no such call and the libraries we use keep theirs private, hence :func:`atomic_write_bytes`.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .errors import ConfigError, NotFoundError

__all__ = [
    "RUN_CONFIG", "METRICS", "CURVE_PNG", "TRAIN_SUMMARY", "CHECKPOINTS", "EXPORT_DIR", "TRAINER_STATE", "WEIGHTS_NAME",
    "PROJECTOR_NAME", "CONFIG_NAME", "MODEL_CARD", "TMP_PREFIX",
    "step_dir_name", "step_of", "checkpoint_dir", "list_checkpoints", "latest_checkpoint", "is_run_dir",
    "is_export_dir", "find_run_config", "load_run_config", "locate_weights", "read_trainer_state",
    "atomic_write_bytes", "write_json_atomic", "fsync_dir", "fsync_files",
]

PathLike = Union[str, os.PathLike]

RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
CURVE_PNG = "training_curve.png"
TRAIN_SUMMARY = "train_summary.json"
CHECKPOINTS = "checkpoints"
EXPORT_DIR = "export"
TRAINER_STATE = "trainer_state.json"
WEIGHTS_NAME = "model.safetensors"
PROJECTOR_NAME = "projector.safetensors"
CONFIG_NAME = "config.json"
MODEL_CARD = "README.md"
TMP_PREFIX = ".tmp-"

_STEP_DIR = re.compile(r"^step_(\d+)$")


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------------

def step_dir_name(step: int) -> str:
    """Folder name of the checkpoint of ``step``: ``step_000001000`` (zero-padded, so names sort by step)."""
    return f"step_{int(step):09d}"


def step_of(path: PathLike) -> Optional[int]:
    """The step of a checkpoint folder, or of a file inside one (``.../step_000000200/model.safetensors`` -> 200)."""
    path = Path(path)
    for part in (path.name, path.parent.name):
        m = _STEP_DIR.match(part)
        if m:
            return int(m.group(1))
    return None


def checkpoint_dir(run_dir: PathLike) -> Path:
    """``RUN_DIR/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: PathLike, needs: str = TRAINER_STATE) -> List[Path]:
    """Complete checkpoints of a run, oldest first: ``step_<N>`` folders that hold the file ``needs``.

    ``needs`` is what the caller reads: ``TRAINER_STATE`` to resume a run (the trainer writes it last, so its presence
    means the accelerate state is complete), ``WEIGHTS_NAME`` to read the weights. Hidden ``.tmp-*`` folders are saves
    in progress and never match.
    """
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / needs).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: PathLike, needs: str = TRAINER_STATE) -> Optional[Path]:
    """The complete checkpoint (see :func:`list_checkpoints`) with the highest step, or None."""
    ckpts = list_checkpoints(run_dir, needs)
    return ckpts[-1] if ckpts else None


def read_trainer_state(ckpt: PathLike) -> Dict[str, Any]:
    """``trainer_state.json`` of a checkpoint folder."""
    with open(Path(ckpt) / TRAINER_STATE, "r", encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------------------
# run directories and export folders
# ---------------------------------------------------------------------------------------------------------------------

def is_run_dir(path: PathLike) -> bool:
    """A run directory: ``run_config.json`` and a ``checkpoints`` folder."""
    path = Path(path)
    return (path / RUN_CONFIG).is_file() and checkpoint_dir(path).is_dir()


def is_export_dir(path: PathLike) -> bool:
    """An export folder: ``config.json`` and ``model.safetensors``."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def find_run_config(path: PathLike) -> Path:
    """``run_config.json`` of a run dir, or of the run a checkpoint dir/file belongs to (searched upwards)."""
    path = Path(path).resolve()
    start = path if path.is_dir() else path.parent
    for folder in [start, *start.parents][:4]:
        if (folder / RUN_CONFIG).is_file():
            return folder / RUN_CONFIG
    raise NotFoundError(f"no {RUN_CONFIG} in {start} or the three folders above it; pass a run directory "
                            f"written by smi-pretrain (or a checkpoint folder inside one)")


def load_run_config(path: PathLike) -> Dict[str, Any]:
    """Read a ``run_config.json``: the file, or the one of a run / checkpoint folder (:func:`find_run_config`)."""
    path = Path(path)
    if path.is_dir():
        path = find_run_config(path)
    with open(path, "r", encoding="utf-8") as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ConfigError(f"{path} is not a run config: expected a JSON object with at least a 'model' key")
    return cfg


def locate_weights(path: PathLike) -> Tuple[Path, Dict[str, Any]]:
    """``(weights file, run config)`` of a run dir (its latest checkpoint with weights), a checkpoint folder or a
    checkpoint's ``model.safetensors``."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path} does not exist; pass a run directory or a checkpoint folder/file")
    if path.is_file():
        weights = path
    elif is_run_dir(path):
        latest = latest_checkpoint(path, needs=WEIGHTS_NAME)
        if latest is None:
            raise NotFoundError(
                f"no complete checkpoint in {checkpoint_dir(path)} (expected step_<N>/{WEIGHTS_NAME} folders); is "
                f"{path} a run directory written by smi-pretrain, and has it saved a checkpoint yet?")
        weights = latest / WEIGHTS_NAME
    elif (path / WEIGHTS_NAME).is_file():
        weights = path / WEIGHTS_NAME
    else:
        raise NotFoundError(f"{path} is neither a run directory ({RUN_CONFIG} + {CHECKPOINTS}/) nor a checkpoint "
                                f"folder holding {WEIGHTS_NAME}")
    return weights, load_run_config(find_run_config(weights))


# ---------------------------------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: PathLike) -> None:
    """Make renames inside ``path`` durable (a no-op where folders cannot be opened, e.g. on Windows)."""
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


def fsync_files(folder: PathLike) -> None:
    """fsync every regular file directly inside ``folder`` (before a rename makes the folder visible)."""
    for f in Path(folder).iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync, ``os.replace``, fsync the folder.

    Readers see the old file or the new one, never a partial one; on error no temporary file stays behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp creates 0600; give the file the usual permissions
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: PathLike, data: Any, *, sort_keys: bool = True) -> None:
    """Write ``data`` as indented JSON (non-JSON values as ``str``) with :func:`atomic_write_bytes`."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys, default=str) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
