"""Export a pretrained backbone as a timm-loadable folder.

``smi-export RUN_DIR_OR_CHECKPOINT OUT_DIR [--with-projector]`` writes

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

import argparse
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .layout import (
    CONFIG_NAME,
    PROJECTOR_NAME,
    WEIGHTS_NAME,
    atomic_write_bytes,
    is_export_dir,
    is_run_dir,
    locate_weights,
    step_of,
    write_json_atomic,
)

__all__ = ["export_backbone", "export_run", "load_export", "read_export_config", "split_state_dict",
           "load_weights_checked", "main",
           "WEIGHTS_NAME", "PROJECTOR_NAME", "CONFIG_NAME"]

# timm kwargs that only matter for training; kept in the `smi` block but not in `model_args`
_TRAINING_ONLY_KWARGS = ("drop_rate", "drop_path_rate", "drop_block_rate", "proj_drop_rate", "attn_drop_rate",
                         "pos_drop_rate", "patch_drop_rate")


def _safetensors_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Deterministic safetensors bytes (same tensors -> same sha256).

    The only metadata is ``format: pt``: safetensors writes metadata keys in hash-map order, so several keys would
    make the bytes, and the recorded sha256, differ from run to run. Everything else lives in config.json.
    """
    from safetensors.torch import save

    # clone: safetensors refuses tensors that share storage; contiguous CPU copies are always accepted
    clean = {k: tensors[k].detach().to("cpu").contiguous().clone() for k in sorted(tensors)}
    return save(clean, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------------------------
# state dicts and configs
# ---------------------------------------------------------------------------------------------------------------------

def split_state_dict(obj: Union[nn.Module, Mapping[str, torch.Tensor]]) -> Tuple[Dict[str, torch.Tensor],
                                                                                  Dict[str, torch.Tensor]]:
    """``(backbone, projector)`` state dicts, without the ``backbone.``/``projector.`` prefixes.

    ``obj`` is an ``SSLModel``, a bare backbone, a DDP / ``torch.compile`` wrapper of either, or a state dict of any of
    them (full ``backbone.*``/``projector.*`` keys or bare backbone keys; ``projector`` is then empty).
    """
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    if isinstance(obj, nn.Module):
        if hasattr(obj, "backbone") and hasattr(obj, "projector"):
            return dict(obj.backbone.state_dict()), dict(obj.projector.state_dict())
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"export_backbone takes an SSLModel, a backbone module or a state dict, not "
                        f"{type(obj).__name__}")
    state = dict(obj)
    for prefix in ("module.", "_orig_mod."):  # DDP, then torch.compile
        consume_prefix_in_state_dict_if_present(state, prefix)
    if any(k.startswith("backbone.") for k in state):
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        projector = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
        return backbone, projector
    return state, {}


def _config_from_model(model: nn.Module) -> Dict[str, Any]:
    """A minimal run config for an in-memory SSLModel/backbone exported without one."""
    name = getattr(model, "backbone_name", None) or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not name:
        raise ValueError("export_backbone needs run_config (at least {'model': '<timm name>', 'image_size': S}) "
                         "when the model does not say which timm architecture it is")
    return {"model": name, "cifar_stem": bool(getattr(model, "cifar_stem", False)),
            "projector": getattr(model, "projector_spec", None)}


def _build_reference(model_name: str, cifar_stem: bool, model_args: Dict[str, Any]) -> Tuple[nn.Module, str]:
    """Architecture name for config.json and an (uninitialised, meta-device) model to check the weights against."""
    import timm

    from .models.registry import cifar_architecture
    from .models.ssl import apply_cifar_stem

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
        raise ValueError(f"unknown timm model {arch!r} in the run config; see timm.list_models()")
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

    from . import __version__

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
    from .models.registry import check_state_dict

    if run_config is None:
        if not isinstance(model_or_state_dict, nn.Module):
            raise ValueError("export_backbone needs run_config when given a state dict")
        run_config = _config_from_model(model_or_state_dict)
    if "model" not in run_config:
        raise ValueError("run_config has no 'model' (the timm architecture name)")
    backbone_sd, projector_sd = split_state_dict(model_or_state_dict)
    if not backbone_sd:
        raise ValueError("no backbone tensors to export (empty state dict, or no 'backbone.*' keys)")
    if with_projector and not projector_sd:
        raise ValueError("with_projector=True but the model/state dict has no projector tensors")

    cifar_stem = bool(run_config.get("cifar_stem", False))
    timm_kwargs = dict(run_config.get("timm_kwargs") or {})
    model_args = {k: v for k, v in timm_kwargs.items() if k not in _TRAINING_ONLY_KWARGS and k != "num_classes"}
    ref, arch = _build_reference(str(run_config["model"]), cifar_stem, model_args)
    if validate:
        check_state_dict(backbone_sd, ref, name=f"{arch} (cifar_stem={cifar_stem})")

    weights_bytes = _safetensors_bytes(backbone_sd)
    projector_bytes = _safetensors_bytes(projector_sd) if with_projector else None
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
    from .models.hub import load_safetensors

    weights, run_config = locate_weights(path)
    state = load_safetensors(weights)
    return export_backbone(state, out_dir, run_config, with_projector=with_projector, step=step_of(weights),
                           source=str(weights))


def read_export_config(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """``config.json`` of an export folder (error naming the fix when ``path`` is not one)."""
    folder = Path(path)
    if not is_export_dir(folder):
        raise FileNotFoundError(f"{folder} is not an export folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
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

    from .models.hub import WeightsHashError, load_safetensors, sha256_file
    from .models.ssl import apply_cifar_stem

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


def load_weights_checked(model: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    """Load backbone (or full ``SSLModel``) weights into a timm model: every key and shape must match, except the
    classifier's (the file may carry one, the model may have a new one).

    Not timm's ``load_checkpoint``: that one also unpickles ``.pth`` files and reports a mismatch as torch's full key
    lists; here the state comes from a safetensors file and the error
    (:class:`~smi_timm.models.registry.WeightsMismatchError`) names the first offending keys with their shapes.
    """
    from .models.registry import check_state_dict, strip_ssl_prefix

    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    ignore = [f"{c}.{p}" for c in names for p in ("weight", "bias")]
    state = {k: v for k, v in strip_ssl_prefix(state).items() if k not in ignore}
    check_state_dict(state, model, name=name, ignore=ignore)
    model.load_state_dict(state, strict=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="smi-export",
        description="Export a run's backbone (latest complete checkpoint) as a folder timm loads with "
                    "timm.create_model('local-dir:OUT_DIR', pretrained=True).",
    )
    parser.add_argument("path", help="run directory, checkpoint folder (checkpoints/step_N) or its model.safetensors")
    parser.add_argument("out_dir", help="output folder (model.safetensors + config.json)")
    parser.add_argument("--with-projector", action="store_true",
                        help="also write projector.safetensors (projector keys without the 'projector.' prefix)")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", default=None,
                        help="then upload the folder, with a model card (README.md), to this Hugging Face Hub "
                             "repo (token: huggingface-cli login or HF_TOKEN); timm.create_model('hf-hub:ORG/NAME') "
                             "loads it")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")
    parser.add_argument("--results", nargs="+", default=[], metavar="JSON",
                        help="smi-eval result files (--out) measured on this export, for the model card")
    args = parser.parse_args(argv)
    try:
        config = export_run(args.path, args.out_dir, with_projector=args.with_projector)
        results = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.results]
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"smi-export: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    print(f"wrote {out / WEIGHTS_NAME} (sha256 {config['sha256']}, architecture {config['architecture']}, "
          f"step {config['smi']['step']})")
    if args.with_projector:
        print(f"wrote {out / PROJECTOR_NAME} (sha256 {config['smi']['projector_sha256']})")
    print(f"wrote {out / CONFIG_NAME}")
    print(f"load with: import smi_timm, timm; timm.create_model('local-dir:{out}', pretrained=True)")
    if args.push_to_hub:
        from .publish import push_to_hub, write_model_card

        run_dir = Path(args.path) if is_run_dir(Path(args.path)) else None
        print(f"wrote {write_model_card(out, repo_id=args.push_to_hub, run_dir=run_dir, results=results)}")
        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private)
        except Exception as err:  # network, authentication, permissions: say so, the export itself is done
            print(f"smi-export: error: the export is in {out}, but uploading it to {args.push_to_hub} failed: "
                  f"{type(err).__name__}: {err}", file=sys.stderr)
            return 1
        print(f"uploaded to https://huggingface.co/{args.push_to_hub} ({url}); load with: "
              f"timm.create_model('hf-hub:{args.push_to_hub}', pretrained=True)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
