"""The configuration of a pretraining run and its command-line interface.

Every field of :class:`TrainConfig` is a command-line flag (``model`` → ``--model``, ``loss_args`` →
``--loss-args KEY=VALUE ...``); recipes only change defaults. ``build_parser(defaults)`` is shared by
``smi-pretrain`` and the scripts in ``recipes/``.

The loss is one name and one mapping: ``loss="smi", loss_args={"neg_weight": 16.0}``; what a loss takes comes from
the loss registry (:mod:`smi_timm.losses.registry`). Every hyper-parameter of every registered loss is also a flag of
its own, an alias of ``--loss-args`` (``--neg-weight 16`` = ``--loss-args neg_weight=16``; the SMI backend is
``--loss-backend``), and :meth:`TrainConfig.from_dict` / recipe defaults accept the same names as keys.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..data.loaders import DEFAULT_SHUFFLE_BUFFER
from ..errors import ConfigError
from ..losses import LOSSES, LossEntry

__all__ = ["TrainConfig", "build_parser", "config_from_args", "parse_kv", "loss_arg_flags"]


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
    data: List[str] = _f(None, "training data: shards (brace pattern, glob, pipe: URL), a folder of shards or of "
                               "images, @list.txt (one shard or image per line), or 'sample' for the bundled "
                               "CIFAR-10 sample", nargs="+")
    epoch_samples: Optional[int] = _f(None, "samples per epoch (default: the data's size, from the metadata next to "
                                            "the shards, the tar headers, or the image files; with data of unknown "
                                            "size and --max-steps, the whole run is one epoch)")
    shuffle_buffer: int = _f(DEFAULT_SHUFFLE_BUFFER, "samples in each loader worker's shuffle buffer (never more than "
                                                     "its share of the data: no sample is in it twice)")
    image_size: int = _f(224, "training crop size in pixels")
    augment: str = _f("byol", "two-view augmentation preset: byol, barlow or cifar")
    batch_size: int = _f(256, "batch size per process (the global batch is this × processes × grad-accum)")
    grad_accum: int = _f(1, "gradient accumulation steps")
    workers: Optional[int] = _f(None, "data loader worker processes per process (default: from the CPU cores "
                                      "available to each process and where augmentation runs)")
    augment_device: str = _f("auto", "where the two views are decoded and augmented: auto (on the GPU when "
                                     "training on one, else in the CPU workers), cpu, or device")
    # loss
    loss: str = _f("smi", "the loss, by its registry name: " + ", ".join(LOSSES))
    loss_args: Dict[str, Any] = _f(None, "the loss's settings as KEY=VALUE (JSON values), e.g. neg_weight=16 eps=0.01; "
                                         "each also has a flag of its own (below)", nargs="*", kv=True)
    gather: bool = _f(False, "compute the loss on the global batch (all-gather with gradients)")
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

    def __post_init__(self):
        if isinstance(self.loss_args, (list, tuple)):
            self.loss_args = parse_kv(self.loss_args, "--loss-args")
        self.loss_args = self.loss_entry().check_args(self.loss_args or {})

    def loss_entry(self) -> LossEntry:
        """The registry entry of ``loss`` (an unknown name is an error listing the registered ones)."""
        return LOSSES.entry(self.loss)

    def loss_settings(self) -> Dict[str, Any]:
        """Every hyper-parameter of the loss: its defaults with ``loss_args`` on top."""
        return self.loss_entry().settings(self.loss_args)

    def create_loss(self):
        """The loss module of this run (``loss`` with ``loss_args``, and ``gather``)."""
        return self.loss_entry().create(self.loss_args, gather=self.gather)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """A config from a flat mapping of field names and loss hyper-parameters (``neg_weight=16`` goes into
        ``loss_args``, as its flag does); anything else is an error naming the valid keys."""
        fields, loss_args = _split_loss_args(values)
        return cls(**fields, loss_args=loss_args)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def parse_kv(items: Optional[List[str]], flag: str = "--model-kwargs") -> Dict[str, Any]:
    """``["img_size=32", "drop_path_rate=0.1"]`` → ``{"img_size": 32, "drop_path_rate": 0.1}`` (JSON values)."""
    out: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{flag} expects KEY=VALUE items, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_FIELDS = None


def _field_names() -> set:
    global _FIELDS
    if _FIELDS is None:
        _FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
    return _FIELDS


def loss_arg_flags() -> Dict[str, str]:
    """``{hyper-parameter: alias key}`` for every hyper-parameter of every registered loss: the key of its own flag
    (``neg_weight`` → ``--neg-weight``), ``loss_<name>`` where the name would clash with a config field or is too
    generic (``backend`` → ``--loss-backend``)."""
    out = {}
    for name in LOSSES.hparam_owners():
        out[name] = f"loss_{name}" if name in _field_names() or name in ("backend",) else name
    return out


def _split_loss_args(values: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(config fields, loss args)`` of a flat mapping whose extra keys are loss hyper-parameters (their alias
    keys); a hyper-parameter of a loss other than the chosen one is an error naming which loss takes it."""
    aliases = {alias: name for name, alias in loss_arg_flags().items()}
    fields = {k: v for k, v in values.items() if k in _field_names()}
    extra = {k: v for k, v in values.items() if k not in fields}
    unknown = [k for k in extra if k not in aliases]
    if unknown:
        raise ConfigError(f"unknown TrainConfig fields {sorted(unknown)}; valid: the fields of TrainConfig and the "
                          f"settings of a loss ({', '.join(sorted(aliases))})")
    loss = fields.get("loss", TrainConfig.loss)
    entry = LOSSES.entry(loss)
    loss_args = dict(fields.pop("loss_args", None) or {})
    for key, value in extra.items():
        name = aliases[key]
        if name not in entry.hparams:
            owners = ", ".join(o for o, _ in LOSSES.hparam_owners()[name])
            raise ConfigError(f"{_flag(key)} is a setting of the {owners} loss, not of --loss {loss} (its settings: "
                              f"{', '.join(entry.hparams) or 'none'})")
        loss_args[name] = value
    return fields, loss_args


def _optional(base):
    """An argparse type for an Optional[int/float] field: ``none`` gives None (e.g. ``--lr-biases none``)."""

    def parse(value: str):
        return None if value.strip().lower() == "none" else base(value)

    parse.__name__ = base.__name__  # argparse names the type in its error messages
    return parse


def build_parser(defaults: Optional[Dict[str, Any]] = None, description: str = "",
                 prog: Optional[str] = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per :class:`TrainConfig` field; ``defaults`` override the field defaults."""
    fields, recipe_loss_args = _split_loss_args(dict(defaults or {}))
    defaults = dict(fields, loss_args=None)
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # the recipe's loss settings apply to the recipe's loss only (a recipe for SMI run with --loss barlow drops them)
    parser.set_defaults(recipe_loss__=(fields.get("loss", TrainConfig.loss), recipe_loss_args))
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
    _add_loss_arg_flags(parser)
    return parser


def _add_loss_arg_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per loss hyper-parameter (an alias of ``--loss-args NAME=VALUE``), with the loss's own help."""
    group = parser.add_argument_group("loss settings (each an alias of --loss-args NAME=VALUE)")
    owners = LOSSES.hparam_owners()
    for name, alias in loss_arg_flags().items():
        text = "; ".join(f"{LOSSES[o].display_name}: {h.help or name} (default {h.default})" for o, h in owners[name])
        group.add_argument(_flag(alias), dest=f"loss_arg__{alias}", default=argparse.SUPPRESS, metavar="VALUE",
                           help=text.replace("%", "%%"))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args).copy()
    recipe_loss, recipe_args = values.pop("recipe_loss__", (None, {}))
    if isinstance(values.get("model_kwargs"), list):
        values["model_kwargs"] = parse_kv(values["model_kwargs"])
    given = parse_kv(values["loss_args"], "--loss-args") if isinstance(values.get("loss_args"), list) else {}
    values["loss_args"] = {**(recipe_args if values.get("loss") == recipe_loss else {}), **(given or {})}
    aliases = {k[len("loss_arg__"):]: values.pop(k) for k in list(values) if k.startswith("loss_arg__")}
    return TrainConfig.from_dict({**values, **aliases})
