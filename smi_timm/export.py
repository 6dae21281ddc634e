"""The export folder: a pretrained backbone as a folder timm loads, written and read here (one home for the format,
like timm's ``_hub.py``).

:func:`export_backbone` / :func:`export_run` (``smi-export RUN_DIR_OR_CHECKPOINT OUT_DIR [--with-projector]``)
write

* ``OUT_DIR/model.safetensors`` — the backbone only, with timm's own key names (no ``backbone.`` prefix), so timm
  loads it strictly;
* ``OUT_DIR/projector.safetensors`` — only with ``--with-projector``: the projector's state dict with the keys of
  ``SSLModel.projector`` (``0.weight``, ``1.running_mean``, ...). It is a separate file because timm's ``local-dir:``
  loader reads ``model.safetensors`` strictly and would reject extra keys;
* ``OUT_DIR/config.json`` — timm's pretrained-config format (``architecture``, ``num_classes: 0``, ``num_features``,
  ``model_args``, ``pretrained_cfg`` with ``input_size``/``mean``/``std``/``interpolation``/``crop_pct``), plus
  ``sha256`` (of ``model.safetensors``), ``cifar_stem`` and an ``smi`` block (backbone name, image size, projector,
  loss, training recipe, checkpoint step, sha256 of the projector file).

Then::

    import smi_timm, timm   # smi_timm registers the *_cifar names a CIFAR-stem export needs
    backbone = timm.create_model("local-dir:OUT_DIR", pretrained=True)                  # pooled features
    classifier = timm.create_model("local-dir:OUT_DIR", pretrained=True, num_classes=10)  # + a new head

``architecture`` is the plain timm name (``resnet50``, ``vit_small_patch16_224``; loadable without smi_timm) except
for ResNets with the CIFAR stem, which timm cannot express: those use the registered ``smi_resnet18_cifar`` /
``smi_resnet50_cifar`` (see :mod:`smi_timm.models.registry`). A CIFAR-stem backbone without such a name is still
exported (for ``smi-eval``), with a warning that ``local-dir:`` cannot rebuild it.

Every file is written atomically (:func:`smi_timm.layout.atomic_write_bytes`); ``config.json`` comes last, so a folder
with a config always has the weights the config's sha256 describes. The file names and the run-directory layout live
in :mod:`smi_timm.layout`.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from . import __version__
from .errors import ConfigError, NotFoundError
from .layout import (
    CONFIG_NAME,
    PROJECTOR_NAME,
    WEIGHTS_NAME,
    atomic_write_bytes,
    is_export_dir,
    locate_weights,
    step_of,
    write_json_atomic,
)
from .models.registry import cifar_architecture
from .models.ssl import apply_cifar_stem
from .models.weights import (
    WeightsHashError,
    check_state_dict,
    load_safetensors,
    load_weights_checked,
    safetensors_bytes,
    sha256_file,
    split_state_dict,
)

__all__ = ["export_backbone", "export_run", "load_export", "read_export_config", "WEIGHTS_NAME", "PROJECTOR_NAME",
           "CONFIG_NAME"]

# timm kwargs that only matter for training; kept in the `smi` block but not in `model_args`
_TRAINING_ONLY_KWARGS = ("drop_rate", "drop_path_rate", "drop_block_rate", "proj_drop_rate", "attn_drop_rate",
                         "pos_drop_rate", "patch_drop_rate")


# ---------------------------------------------------------------------------------------------------------------------
# state dicts and configs
# ---------------------------------------------------------------------------------------------------------------------

def _config_from_model(model: nn.Module) -> Dict[str, Any]:
    """A minimal run config for an in-memory SSLModel/backbone exported without one."""
    name = getattr(model, "backbone_name", None) or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not name:
        raise ConfigError("export_backbone needs run_config (at least {'model': '<timm name>', 'image_size': S}) "
                         "when the model does not say which timm architecture it is")
    return {"model": name, "cifar_stem": bool(getattr(model, "cifar_stem", False)),
            "projector": getattr(model, "projector_spec", None)}


def _build_reference(model_name: str, cifar_stem: bool, model_args: Dict[str, Any]) -> Tuple[nn.Module, str]:
    """Architecture name for config.json and an (uninitialised, meta-device) model to check the weights against."""
    import timm

    base = model_name.split(".")[0]
    arch = base
    if base.startswith("smi_"):  # already one of ours: the CIFAR names carry their stem
        cifar_stem = False
    elif cifar_stem:
        registered = cifar_architecture(base)
        if registered:
            arch, cifar_stem = registered, False
        else:
            warnings.warn(
                f"{base} with the CIFAR stem has no registered timm name, so timm.create_model('local-dir:...') "
                f"will build the ImageNet stem and refuse these weights; smi-eval and smi-analyze still load the "
                f"export (they read 'cifar_stem' from config.json).",
                stacklevel=3,
            )
    if not timm.is_model(arch):
        raise ConfigError(f"unknown timm model {arch!r} in the run config; see timm.list_models()")
    kwargs = dict(model_args, num_classes=0)
    try:
        with torch.device("meta"):
            ref = timm.create_model(arch, **kwargs)
    except Exception:  # some constructors run real ops; fall back to the CPU
        ref = timm.create_model(arch, **kwargs)
    if cifar_stem:
        apply_cifar_stem(ref)
    return ref, arch


def _pretrained_cfg(ref: nn.Module, image_size: int, mean, std, run_config: Mapping[str, Any]) -> Dict[str, Any]:
    """timm's ``pretrained_cfg`` of the architecture with the run's input size, interpolation, crop and mean/std.

    timm's own ``save_config_for_hf`` writes the same format, but writes the file in place (not atomically) and has
    changed its arguments between timm 1.0 releases; building the dict here keeps exports identical across them.
    """
    from timm.models import filter_pretrained_cfg

    src = filter_pretrained_cfg(dict(getattr(ref, "pretrained_cfg", None) or {}), remove_source=True)
    keep = ("fixed_input_size", "pool_size", "first_conv", "classifier", "crop_mode")
    cfg: Dict[str, Any] = {k: src[k] for k in keep if k in src}
    default_input = tuple(src.get("input_size", (3, 224, 224)))
    cfg.update(
        custom_load=False,
        input_size=[int(default_input[0]), int(image_size), int(image_size)],
        interpolation=run_config.get("interpolation", "bicubic"),
        crop_pct=float(run_config.get("crop_pct", 0.875 if image_size >= 128 else 1.0)),
        crop_mode=cfg.get("crop_mode", "center"),
        mean=[float(x) for x in mean],
        std=[float(x) for x in std],
        num_classes=0,
    )
    if tuple(default_input[1:]) != (image_size, image_size):
        cfg["pool_size"] = None
    if isinstance(cfg.get("pool_size"), tuple):
        cfg["pool_size"] = list(cfg["pool_size"])
    return cfg


def _export_config(run_config: Mapping[str, Any], ref: nn.Module, arch: str, model_args: Dict[str, Any],
                   weights_sha: str, projector_sha: Optional[str], step: Optional[int],
                   source: Optional[str]) -> Dict[str, Any]:
    """The dict written to ``config.json`` (timm's format plus ``sha256``, ``cifar_stem`` and the ``smi`` block)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cifar_stem = bool(run_config.get("cifar_stem", False))
    default_size = int((getattr(ref, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1])
    image_size = int(run_config.get("image_size") or default_size)
    mean = run_config.get("mean") or list(IMAGENET_DEFAULT_MEAN)
    std = run_config.get("std") or list(IMAGENET_DEFAULT_STD)
    return {
        "architecture": arch,
        "num_classes": 0,
        "num_features": int(getattr(ref, "num_features", 0)),
        "model_args": model_args,
        "pretrained_cfg": _pretrained_cfg(ref, image_size, mean, std, run_config),
        "sha256": weights_sha,
        "cifar_stem": cifar_stem,
        "smi": {
            "model": str(run_config["model"]),
            "cifar_stem": cifar_stem,
            "image_size": image_size,
            "timm_kwargs": dict(run_config.get("timm_kwargs") or {}),
            "projector": run_config.get("projector"),
            "projector_file": PROJECTOR_NAME if projector_sha else None,
            "projector_sha256": projector_sha,
            "loss": run_config.get("loss"),
            "recipe": run_config.get("recipe"),
            "step": step,
            "source": source,
            "smi_timm_version": __version__,
        },
    }


def export_backbone(model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]],
                    out_dir: Union[str, os.PathLike], run_config: Optional[Mapping[str, Any]] = None,
                    with_projector: bool = False, *, step: Optional[int] = None, source: Optional[str] = None,
                    validate: bool = True) -> Dict[str, Any]:
    """Write ``model.safetensors`` (+ ``projector.safetensors``) and ``config.json`` into ``out_dir``.

    Args:
        model_or_state_dict: an ``SSLModel``, a bare timm backbone, or a state dict (full ``backbone.*``/
            ``projector.*`` keys or bare backbone keys).
        out_dir: output folder (created).
        run_config: the run's ``run_config.json`` contents (``model``, ``cifar_stem``, ``timm_kwargs``,
            ``image_size``, ``mean``, ``std``, ``projector``, ``loss``, ``recipe``). Optional for an ``SSLModel``.
        with_projector: also write ``projector.safetensors`` (error if there is no projector).
        step: training step recorded in the config. source: where the weights came from, recorded too.
        validate: check every key and shape against the architecture before writing.

    Returns:
        The dict written to ``config.json``.
    """
    if run_config is None:
        if not isinstance(model_or_state_dict, nn.Module):
            raise ConfigError("export_backbone needs run_config when given a state dict")
        run_config = _config_from_model(model_or_state_dict)
    if "model" not in run_config:
        raise ConfigError("run_config has no 'model' (the timm architecture name)")
    backbone_sd, projector_sd = split_state_dict(model_or_state_dict)
    if not backbone_sd:
        raise ConfigError("no backbone tensors to export (empty state dict, or no 'backbone.*' keys)")
    if with_projector and not projector_sd:
        raise ConfigError("with_projector=True but the model/state dict has no projector tensors")

    cifar_stem = bool(run_config.get("cifar_stem", False))
    timm_kwargs = dict(run_config.get("timm_kwargs") or {})
    model_args = {k: v for k, v in timm_kwargs.items() if k not in _TRAINING_ONLY_KWARGS and k != "num_classes"}
    ref, arch = _build_reference(str(run_config["model"]), cifar_stem, model_args)
    if validate:
        check_state_dict(backbone_sd, ref, name=f"{arch} (cifar_stem={cifar_stem})")

    weights_bytes = safetensors_bytes(backbone_sd)
    projector_bytes = safetensors_bytes(projector_sd) if with_projector else None
    config = _export_config(run_config, ref, arch, model_args, hashlib.sha256(weights_bytes).hexdigest(),
                            hashlib.sha256(projector_bytes).hexdigest() if projector_bytes else None, step, source)
    out = Path(out_dir)
    atomic_write_bytes(out / WEIGHTS_NAME, weights_bytes)
    if projector_bytes is not None:
        atomic_write_bytes(out / PROJECTOR_NAME, projector_bytes)
    elif (out / PROJECTOR_NAME).exists():  # a stale projector from an earlier export would not match
        (out / PROJECTOR_NAME).unlink()
    write_json_atomic(out / CONFIG_NAME, config, sort_keys=False)  # last: a config means its weights are complete
    return config


def export_run(path: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
               with_projector: bool = False) -> Dict[str, Any]:
    """Export the latest complete checkpoint of a run dir (or the given checkpoint dir/file) to ``out_dir``."""
    weights, run_config = locate_weights(path)
    state = load_safetensors(weights)
    return export_backbone(state, out_dir, run_config, with_projector=with_projector, step=step_of(weights),
                           source=str(weights))


def read_export_config(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """``config.json`` of an export folder (error naming the fix when ``path`` is not one)."""
    folder = Path(path)
    if not is_export_dir(folder):
        raise NotFoundError(f"{folder} is not an export folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                                f"(write one with smi-export RUN_DIR {folder})")
    with open(folder / CONFIG_NAME, "r", encoding="utf-8") as f:
        return json.load(f)


def load_export(path: Union[str, os.PathLike], num_classes: int = 0, check_hash: bool = True) -> nn.Module:
    """Rebuild the backbone of an export folder (as written by :func:`export_backbone`) with its weights.

    Uses ``timm.create_model('local-dir:...')`` when timm can rebuild the architecture, and otherwise (a CIFAR-stem
    backbone without a registered name) the timm architecture plus :func:`~smi_timm.models.apply_cifar_stem`.
    ``check_hash`` verifies ``model.safetensors`` against the ``sha256`` recorded in ``config.json``.
    """
    import timm

    folder = Path(path)
    config = read_export_config(folder)
    if check_hash and config.get("sha256"):
        actual = sha256_file(folder / WEIGHTS_NAME)
        if actual != config["sha256"]:
            raise WeightsHashError(f"{folder / WEIGHTS_NAME} has sha256 {actual} but config.json records "
                                   f"{config['sha256']}: the weights were replaced or corrupted; re-export them")
    arch = config["architecture"]
    needs_stem = bool(config.get("cifar_stem")) and not arch.endswith("_cifar")
    if not needs_stem:
        return timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=num_classes)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **config.get("model_args", {}))
    apply_cifar_stem(model)
    load_weights_checked(model, load_safetensors(folder / WEIGHTS_NAME), f"{arch} (cifar_stem=True)")
    return model
