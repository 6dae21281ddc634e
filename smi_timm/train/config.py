"""The configuration of a pretraining run and its command-line interface.

Every field of :class:`TrainConfig` is a command-line flag (``model`` → ``--model``, ``neg_weight`` →
``--neg-weight``); recipes only change defaults. ``build_parser(defaults)`` is shared by ``smi-pretrain`` and the
scripts in ``recipes/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..losses.simclr import DEFAULT_TEMPERATURE
from ..losses.smi import DEFAULT_EPS, DEFAULT_NEG_WEIGHT

__all__ = ["TrainConfig", "build_parser", "config_from_args", "parse_kv"]


def _f(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class TrainConfig:
    # model
    model: str = _f("resnet50", "any timm model name (resnet50, vit_small_patch16_224, convnext_tiny, ...)")
    projector: str = _f("8192-8192-8192", "projector widths, '-'-separated (hidden ... output), or 'none'")
    cifar_stem: bool = _f(False, "3x3 stride-1 ResNet stem without max-pool, for 32 px images")
    model_kwargs: Dict[str, Any] = _f(None, "extra timm.create_model kwargs as KEY=VALUE (e.g. img_size=32 "
                                            "patch_size=4 drop_path_rate=0.1)", nargs="*", kv=True)
    init_from: Optional[str] = _f(None, "start from existing weights (a new run: fresh optimiser and schedule, unlike "
                                        "--resume): an export folder (its projector too when it was exported with "
                                        "it), a run directory or checkpoint, a .safetensors backbone file, or "
                                        "timm:NAME with --weights-file")
    weights_file: Optional[str] = _f(None, "the local .safetensors file of --init-from timm:NAME (timm's published "
                                           "weights, downloaded once; nothing is fetched at run time)")
    init_projector: bool = _f(True, "with --init-from: also load the source's projector when it has one (its widths "
                                    "must match --projector); otherwise the projector starts fresh")
    channels_last: Optional[bool] = _f(None, "channels-last memory format (default: on for a CUDA device, where "
                                             "convnets run faster with it; off on a CPU)")
    compile: bool = _f(False, "torch.compile the model (through accelerate's dynamo backend 'inductor')")
    tf32: bool = _f(True, "CUDA: TF32 tensor cores for fp32 convolutions and matmuls of the model (Ampere and "
                          "newer); the SMI loss kernels stay exact unless their own TF32 option is set")
    sync_bn: bool = _f(False, "multi-process runs: convert every BatchNorm (backbone and projector) to SyncBatchNorm, "
                              "so that batch statistics span the global batch (Barlow Twins' recipe; the R50 and "
                              "ViT recipes turn it on)")
    # data
    data: List[str] = _f(None, "training shards: brace pattern, glob, list or 'sample' for the bundled CIFAR-10 "
                               "sample", nargs="+")
    epoch_samples: Optional[int] = _f(None, "samples per epoch (default: from the shards' JSON index)")
    image_size: int = _f(224, "training crop size in pixels")
    augment: str = _f("byol", "two-view augmentation preset: byol, barlow or cifar")
    batch_size: int = _f(256, "batch size per process (the global batch is this × processes × grad-accum)")
    grad_accum: int = _f(1, "gradient accumulation steps")
    workers: Optional[int] = _f(None, "data loader worker processes per process (default: from the CPU cores "
                                      "available to each process and where augmentation runs)")
    augment_device: str = _f("auto", "where the two views are decoded and augmented: auto (on the GPU when "
                                     "training on one, else in the CPU workers), cpu, or device")
    # loss
    loss: str = _f("smi", "smi, barlow, vicreg or simclr")
    transform: str = _f("mi", "SMI dependency map: mi (Gaussian MI) or square (ablation)")
    standardize: str = _f("row", "SMI standardisation: row (each sample over its features) or feature_row (first "
                                 "each feature over the batch; an alternative reading, torch backend)")
    negatives: str = _f("mean", "SMI independence term: mean (of phi over the negatives) or logmeanexp "
                                "(Donsker-Varadhan form; an alternative reading, torch backend)")
    neg_weight: float = _f(DEFAULT_NEG_WEIGHT, "SMI weight of the mean off-diagonal dependency")
    eps: float = _f(DEFAULT_EPS, "SMI smoothing epsilon")
    gather: bool = _f(False, "compute the loss on the global batch (all-gather with gradients)")
    lambd: float = _f(0.0051, "Barlow Twins off-diagonal weight")
    sim_coeff: float = _f(25.0, "VICReg invariance weight")
    std_coeff: float = _f(25.0, "VICReg variance weight")
    cov_coeff: float = _f(1.0, "VICReg covariance weight")
    temperature: float = _f(DEFAULT_TEMPERATURE, "SimCLR softmax temperature")
    loss_backend: str = _f("auto", "SMI backend: auto (Triton on CUDA), torch or triton")
    # optimisation
    optimizer: str = _f("lars", "lars, adamw or sgd")
    lr: float = _f(0.2, "peak learning rate per 256 images of global batch (weights)")
    lr_biases: Optional[float] = _f(0.0048, "LARS: peak learning rate per 256 images for biases and norms")
    weight_decay: float = _f(1.5e-6, "weight decay (weights only; never biases or norm parameters)")
    momentum: float = _f(0.9, "momentum (LARS, SGD)")
    epochs: float = _f(1000, "training length in epochs (ignored when --max-steps is given)")
    max_steps: Optional[int] = _f(None, "training length in optimiser steps")
    warmup_epochs: float = _f(10, "linear warmup length in epochs")
    warmup_steps: Optional[int] = _f(None, "linear warmup length in steps (overrides --warmup-epochs)")
    min_lr_ratio: float = _f(0.001, "final learning rate as a fraction of the peak (cosine schedule)")
    clip_grad: Optional[float] = _f(None, "clip the gradient norm to this value")
    mixed_precision: str = _f("auto", "no, fp16, bf16 or auto (the accelerate launch setting when it asks for "
                                      "fp16/bf16, else bf16 on a CUDA device that supports it, else no)")
    seed: int = _f(0, "random seed (model init, data order, augmentations)")
    # bookkeeping
    output_dir: str = _f("runs/smi", "run directory (checkpoints, metrics.jsonl, export/)")
    save_every: int = _f(1000, "checkpoint every N optimiser steps (and at the end)")
    keep_last: int = _f(3, "number of checkpoints to keep")
    resume: Optional[str] = _f(None, "'auto' (latest checkpoint of --output-dir), a checkpoint or a run directory")
    log_every: int = _f(10, "write metrics.jsonl every N steps (the only steps that read the loss on the host)")
    check_every: Optional[int] = _f(None, "read the non-finite-loss / stop-signal flags on the host every N steps "
                                          "(default and maximum: --log-every; always before a checkpoint, an "
                                          "evaluation or the export)")
    log_with: Optional[List[str]] = _f(None, "experiment trackers, any that accelerate supports (tensorboard, wandb, "
                                             "mlflow, aim, comet_ml, clearml, dvclive, swanlab, trackio); several "
                                             "allowed; metrics.jsonl is always written", nargs="+")
    tensorboard: bool = _f(False, "alias of --log-with tensorboard")
    tracker_project: str = _f("smi-timm", "project name given to the trackers")
    progress: bool = _f(True, "show a tqdm progress bar on the main process")
    eval_train: Optional[List[str]] = _f(None, "labelled shards for the online kNN monitor's feature bank",
                                         nargs="+")
    eval_test: Optional[List[str]] = _f(None, "labelled shards for the online kNN monitor's queries", nargs="+")
    eval_every: int = _f(0, "run the kNN monitor every N steps (0: only at the end, if eval shards are given)")
    eval_k: int = _f(200, "k of the kNN monitor")
    eval_image_size: Optional[int] = _f(None, "image size for the kNN monitor (default: --image-size)")
    export: bool = _f(True, "export the backbone to RUN_DIR/export at the end")

    def loss_kwargs(self) -> Dict[str, Any]:
        if self.loss == "smi":
            return dict(neg_weight=self.neg_weight, eps=self.eps, transform=self.transform, gather=self.gather,
                        backend=self.loss_backend, standardize=self.standardize, negatives=self.negatives)
        if self.loss == "barlow":
            return dict(lambd=self.lambd, gather=self.gather)
        if self.loss == "vicreg":
            return dict(sim_coeff=self.sim_coeff, std_coeff=self.std_coeff, cov_coeff=self.cov_coeff,
                        gather=self.gather)
        if self.loss == "simclr":
            return dict(temperature=self.temperature, gather=self.gather)
        raise ValueError(f"unknown loss {self.loss!r}; valid values are: 'smi', 'barlow', 'vicreg', 'simclr'")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def parse_kv(items: Optional[List[str]]) -> Dict[str, Any]:
    """``["img_size=32", "drop_path_rate=0.1"]`` → ``{"img_size": 32, "drop_path_rate": 0.1}`` (JSON values)."""
    out: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--model-kwargs expects KEY=VALUE items, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _optional(base):
    """An argparse type for an Optional[int/float] field: ``none`` gives None (e.g. ``--lr-biases none``)."""

    def parse(value: str):
        return None if value.strip().lower() == "none" else base(value)

    parse.__name__ = base.__name__  # argparse names the type in its error messages
    return parse


def build_parser(defaults: Optional[Dict[str, Any]] = None, description: str = "",
                 prog: Optional[str] = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per :class:`TrainConfig` field; ``defaults`` override the field defaults."""
    defaults = dict(defaults or {})
    unknown = set(defaults) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown TrainConfig fields in recipe defaults: {sorted(unknown)}")
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        default = defaults.get(f.name, f.default)
        help_text = f"{meta['help']} (default: {default})"
        if f.type in ("bool", bool, "Optional[bool]"):
            parser.add_argument(_flag(f.name), default=default, action=argparse.BooleanOptionalAction,
                                help=help_text)
            continue
        kwargs: Dict[str, Any] = dict(default=default, help=help_text)
        if "nargs" in meta:
            kwargs["nargs"] = meta["nargs"]
        else:
            t = str(f.type)
            base = int if "int" in t else float if "float" in t else str
            kwargs["type"] = _optional(base) if "Optional" in t and base is not str else base
        parser.add_argument(_flag(f.name), **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args).copy()
    if isinstance(values.get("model_kwargs"), list):
        values["model_kwargs"] = parse_kv(values["model_kwargs"])
    return TrainConfig(**values)
