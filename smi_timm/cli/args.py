"""The argument groups the command lines share, defined once, and their translation into library settings.

``smi-eval`` and ``smi-analyze`` take the same backbone flags (:func:`add_backbone_args`) and extraction flags
(:func:`add_extraction_args`); ``smi-eval`` adds the probe's (:func:`add_probe_args`). :func:`backbone_source` and
:func:`eval_settings` turn the parsed flags into :class:`~smi_timm.resolve.BackboneSource` and
:class:`~smi_timm.eval.settings.EvalSettings`.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional

from ..eval.settings import EvalSettings
from ..resolve import BackboneSource

__all__ = ["add_backbone_args", "add_extraction_args", "add_probe_args", "backbone_source", "eval_settings",
           "apply_threads"]


def add_backbone_args(p: argparse.ArgumentParser, several: bool = False, required: bool = True) -> None:
    """``--weights`` (repeatable with ``several``) and the architecture of sources that do not record one."""
    p.add_argument("--weights", required=required, action="append" if several else "store",
                   help="'random' (with --model), an export folder, a run dir / checkpoint, a .safetensors file (with "
                        "--model), or 'timm:NAME' (with --weights-file)"
                        + ("; repeat it to compare several backbones" if several else ""))
    p.add_argument("--model", help="timm architecture (needed for --weights random or a bare .safetensors file)")
    p.add_argument("--weights-file", help="local .safetensors file for --weights timm:NAME")
    p.add_argument("--cifar-stem", action="store_true", help="ResNet with the 3x3 stride-1 CIFAR stem")
    p.add_argument("--timm-kwargs", type=json.loads, default=None,
                   help='extra timm.create_model kwargs as JSON, e.g. \'{"img_size": 32, "patch_size": 4}\'')
    p.add_argument("--seed", type=int, default=0, help="seed of --weights random (and of the linear probe)")


def add_extraction_args(p: argparse.ArgumentParser, batch_size: int = 256) -> None:
    """How features are extracted: input size, batch, workers, autocast, device, threads, progress."""
    p.add_argument("--image-size", type=int, help="input size (default: from the export/run, else 32 with "
                                                  "--cifar-stem, else the model's default)")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"feature-extraction batch size (default {batch_size})")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loading workers")
    p.add_argument("--amp", choices=("no", "bf16", "fp16"), default="no", help="autocast during extraction")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is often fastest on a "
                                                "busy shared machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_probe_args(p: argparse.ArgumentParser) -> None:
    """The linear probe's schedule."""
    p.add_argument("--epochs", type=int, default=100, help="linear-probe epochs (default 100)")
    p.add_argument("--lr", type=float, default=0.1, help="linear-probe peak SGD learning rate (cosine to 0)")
    p.add_argument("--wd", type=float, default=1e-4, help="linear-probe weight decay on the weights")
    p.add_argument("--probe-batch-size", type=int, default=256, help="linear-probe mini-batch size")
    p.add_argument("--flip", action="store_true", help="add the features of flipped training images to the probe")


def backbone_source(args: argparse.Namespace, weights: Optional[str] = None) -> BackboneSource:
    """The :class:`BackboneSource` of ``--weights`` (or ``weights``) with the architecture flags where they apply."""
    return BackboneSource.of(weights if weights is not None else args.weights, model=args.model,
                             cifar_stem=args.cifar_stem, timm_kwargs=args.timm_kwargs,
                             weights_file=args.weights_file, seed=args.seed)


def eval_settings(args: argparse.Namespace, **overrides) -> EvalSettings:
    """:class:`EvalSettings` from the flags the command has (missing ones keep their defaults)."""
    names = {"image_size": "image_size", "batch_size": "batch_size", "workers": "workers", "threads": "threads",
             "amp": "amp", "device": "device", "seed": "seed", "cache_dir": "cache_dir", "max_batches": "max_batches",
             "probe_epochs": "epochs", "probe_lr": "lr", "probe_wd": "wd", "probe_batch_size": "probe_batch_size",
             "flip": "flip", "T": "T", "label_key": "label_key", "classes_file": "classes_file"}
    values = {field: getattr(args, flag) for field, flag in names.items() if getattr(args, flag, None) is not None}
    if hasattr(args, "no_progress"):
        values["progress"] = not args.no_progress
    values.update(overrides)
    return EvalSettings(**values)


def apply_threads(args: argparse.Namespace) -> None:
    """``--threads N``: torch's CPU threads for this process."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
