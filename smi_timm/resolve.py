"""One backbone resolver: a weights source in, a timm backbone with its weights and everything known about it out.

:func:`resolve_backbone` understands every source the command-line tools accept:

==============================  ====================================================================================
source                          what is built
==============================  ====================================================================================
``"random"``                    ``model`` (timm name) randomly initialised with ``seed`` (the global RNG is untouched)
``"timm:NAME"``                 timm architecture ``NAME`` with the local ``weights_file`` (timm's published weights,
                                downloaded once by the user; its classifier is ignored)
an export folder                ``smi-export`` output: model, stem, input size, mean/std and the projector (when
                                exported with it) from ``config.json``; the weights' sha256 is checked
a run directory                 its latest checkpoint with weights, settings from ``run_config.json``
a checkpoint folder / file      ``RUN_DIR/checkpoints/step_N`` or its ``model.safetensors``, with the run's config
a ``.safetensors`` file         backbone or full ``SSLModel`` weights of ``model`` [``cifar_stem``, ``timm_kwargs``]
==============================  ====================================================================================

Only safetensors files are ever read (pickles are refused with a message saying how to convert them), and weights
that do not fit the architecture raise :class:`~smi_timm.models.weights.WeightsMismatchError` naming the first
missing, unexpected and mis-shaped keys with their shapes.

The result, :class:`ResolvedBackbone`, carries what callers need besides the module: the model name, stem, timm
kwargs, input size and mean/std when the source records them, and the projector's spec and state dict when the source
has one. Evaluation (``smi-eval``), analysis (``smi-analyze``), the quick start and the comparison harness use it;
starting a pretraining run from existing weights is ``resolve_backbone(path).load_into(ssl_model)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import timm
import torch
from torch import nn

from .errors import ConfigError, NotFoundError
from .export import load_export, read_export_config
from .layout import PROJECTOR_NAME, WEIGHTS_NAME, is_export_dir, locate_weights, step_of
from .models.hub import resolve_weights
from .models.ssl import apply_cifar_stem, build_projector, parse_projector
from .models.weights import check_state_dict, load_safetensors, load_weights_checked, sha256_file, split_state_dict

__all__ = ["BackboneSource", "ResolvedBackbone", "resolve_backbone", "records_architecture"]

Source = Union[str, os.PathLike]


def records_architecture(weights: Source) -> bool:
    """Whether a source records its own architecture (an export, a run, a checkpoint) rather than needing ``model``
    (``random``, ``timm:NAME``, a bare ``.safetensors`` file)."""
    text = os.fspath(weights)
    return not (text == "random" or text.startswith("timm:") or text.endswith(".safetensors"))


@dataclass(frozen=True)
class BackboneSource:
    """Where a backbone comes from (``weights``: any source of :func:`resolve_backbone`) and, for the sources that do
    not record it, its architecture (``model``, ``cifar_stem``, ``timm_kwargs``) and ``weights_file`` / ``seed``.

    :meth:`of` builds one for a source and drops the architecture arguments where the source records its own, so one
    command can evaluate an export, a run and ``random`` (with ``--model``) side by side.
    """

    weights: str = "random"
    model: Optional[str] = None
    cifar_stem: bool = False
    timm_kwargs: Optional[Dict[str, Any]] = None
    weights_file: Optional[str] = None
    seed: int = 0

    @classmethod
    def of(cls, weights: Source, *, model: Optional[str] = None, cifar_stem: bool = False,
           timm_kwargs: Optional[Dict[str, Any]] = None, weights_file: Optional[str] = None,
           seed: int = 0) -> "BackboneSource":
        """The source ``weights`` with the architecture arguments only where it needs them (see
        :func:`records_architecture`)."""
        text = os.fspath(weights)
        if records_architecture(text):
            return cls(text, weights_file=weights_file, seed=seed)
        return cls(text, model, bool(cifar_stem), dict(timm_kwargs) if timm_kwargs else None, weights_file, seed)

    def resolve(self) -> "ResolvedBackbone":
        """:func:`resolve_backbone` of this source."""
        return resolve_backbone(self.weights, model=self.model, cifar_stem=self.cifar_stem,
                                timm_kwargs=self.timm_kwargs, weights_file=self.weights_file, seed=self.seed)


@dataclass
class ResolvedBackbone:
    """A backbone with its weights loaded, and what its source says about it."""

    backbone: nn.Module
    model: str                                     #: timm name the backbone was built from (``resnet18``)
    cifar_stem: bool
    timm_kwargs: Dict[str, Any]
    kind: str                                      #: random | timm | export | run | checkpoint | file
    weights: str                                   #: label: ``random (seed 0)``, ``timm:NAME`` or the weights path
    weights_file: Optional[Path] = None
    weights_sha256: Optional[str] = None
    image_size: Optional[int] = None               #: input size the source was trained / exported at, when known
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    crop_pct: Optional[float] = None
    projector_spec: Optional[str] = None           #: set together with ``projector_state`` (both or neither)
    projector_state: Optional[Dict[str, torch.Tensor]] = None
    step: Optional[int] = None                     #: training step of a run checkpoint / export, when known
    config: Dict[str, Any] = field(default_factory=dict)  #: the run config or export config.json read

    @property
    def num_features(self) -> int:
        return int(getattr(self.backbone, "num_features", 0))

    def default_image_size(self) -> int:
        """The recorded input size; else 32 for the CIFAR stem; else the architecture's default input size."""
        if self.image_size:
            return int(self.image_size)
        if self.cifar_stem:
            return 32
        cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        return int(cfg.get("input_size", (3, 224, 224))[-1])

    def describe(self, image_size: Optional[int] = None) -> Dict[str, Any]:
        """The fields evaluation results record (model, weights, sha256, stem, size, normalisation)."""
        info = {"model": self.model, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "cifar_stem": self.cifar_stem, "image_size": int(image_size or self.default_image_size()),
                "mean": self.mean, "std": self.std, "crop_pct": self.crop_pct, "num_features": self.num_features}
        if self.kind == "timm":
            info["weights_file"] = str(self.weights_file)
        return info

    def build_projector(self, spec: Optional[str] = None, seed: int = 0) -> Tuple[Optional[nn.Module], Optional[str]]:
        """``(projector, "loaded" | "random")`` or ``(None, None)``.

        With ``spec`` None the source's projector is rebuilt with its weights (None when the source has none); with
        a ``spec`` a fresh projector of those widths is initialised from ``seed`` (loaded instead when the source's
        projector has exactly that spec).
        """
        dims = parse_projector(spec if spec is not None else self.projector_spec)
        if not dims:
            return None, None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            proj = build_projector(self.num_features, dims)
        if self.projector_state is not None and dims == parse_projector(self.projector_spec):
            proj.load_state_dict(self.projector_state)
            return proj, "loaded"
        return proj, "random"

    def load_into(self, ssl_model: nn.Module, projector: bool = True) -> List[str]:
        """Copy these weights into an ``SSLModel`` (e.g. to start pretraining from them); returns the parts loaded.

        The backbone always (its keys and shapes must match the model's: the error names the first that do not);
        the projector too when ``projector`` is set and the source has one, which must then have the model's widths.
        A model without a matching source projector keeps its fresh one.
        """
        state = self.backbone.state_dict()
        check_state_dict(state, ssl_model.backbone, name=f"the model's backbone (source {self.weights})")
        ssl_model.backbone.load_state_dict(state)
        loaded = ["backbone"]
        if projector and self.projector_state is not None:
            check_state_dict(self.projector_state, ssl_model.projector,
                             name=f"the model's projector (source projector {self.projector_spec}; pass that "
                                  f"projector spec, or do not load the source's projector)")
            ssl_model.projector.load_state_dict(self.projector_state)
            loaded.append("projector")
        return loaded


# ---------------------------------------------------------------------------------------------------------------------
# building and loading
# ---------------------------------------------------------------------------------------------------------------------

def _create(model: str, cifar_stem: bool, timm_kwargs: Optional[Dict[str, Any]]) -> nn.Module:
    if not timm.is_model(model):
        raise ConfigError(f"unknown timm model {model!r}; see timm.list_models() (smi names need `import smi_timm`)")
    kwargs = dict(timm_kwargs or {})
    kwargs.pop("num_classes", None)
    backbone = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
    if cifar_stem:
        apply_cifar_stem(backbone)
    return backbone


# ---------------------------------------------------------------------------------------------------------------------
# one branch per kind of source
# ---------------------------------------------------------------------------------------------------------------------

def _random(model: Optional[str], cifar_stem: bool, timm_kwargs, seed: int) -> ResolvedBackbone:
    if not model:
        raise ConfigError("--weights random needs --model (the timm architecture to initialise)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = _create(model, cifar_stem, timm_kwargs)
    return ResolvedBackbone(backbone, model, cifar_stem, dict(timm_kwargs or {}), "random", f"random (seed {seed})")


def _timm(name: str, weights_file: Optional[Source], cifar_stem: bool, timm_kwargs) -> ResolvedBackbone:
    if not weights_file:
        raise ConfigError(f"--weights timm:{name} needs --weights-file F.safetensors: loading {name}'s published "
                         f"weights would need the network; download the file once and pass it")
    file = resolve_weights(weights_file)
    backbone = _create(name, cifar_stem, timm_kwargs)
    load_weights_checked(backbone, load_safetensors(file), name)
    cfg = backbone.pretrained_cfg or {}
    return ResolvedBackbone(backbone, name, cifar_stem, dict(timm_kwargs or {}), "timm", f"timm:{name}",
                            weights_file=file, weights_sha256=sha256_file(file),
                            mean=list(cfg.get("mean", ())) or None, std=list(cfg.get("std", ())) or None,
                            crop_pct=cfg.get("crop_pct"))


def _export(path: Path, model: Optional[str]) -> ResolvedBackbone:
    config = read_export_config(path)
    backbone = load_export(path)
    smi = config.get("smi") or {}
    name = smi.get("model") or config["architecture"]
    if model and model not in (name, config["architecture"]):
        raise ConfigError(f"--model {model} contradicts the export in {path} ({name}); drop --model")
    pcfg = config.get("pretrained_cfg", {})
    has_projector = (path / PROJECTOR_NAME).is_file() and smi.get("projector")
    return ResolvedBackbone(
        backbone, name, bool(config.get("cifar_stem", False)), dict(smi.get("timm_kwargs") or {}), "export", str(path),
        weights_file=path / WEIGHTS_NAME, weights_sha256=config.get("sha256"),
        image_size=int(pcfg.get("input_size", (3, 224, 224))[-1]), mean=pcfg.get("mean"), std=pcfg.get("std"),
        crop_pct=pcfg.get("crop_pct"), projector_spec=smi.get("projector") if has_projector else None,
        projector_state=load_safetensors(path / PROJECTOR_NAME) if has_projector else None, step=smi.get("step"),
        config=config)


def _weights_file(path: Path, model: Optional[str], cifar_stem: bool, timm_kwargs) -> ResolvedBackbone:
    """A run dir, a checkpoint folder / file of a run, or (with ``model``) a bare ``.safetensors`` file."""
    if path.is_file() and path.suffix != ".safetensors":
        load_safetensors(path)  # refuses a pickle with the conversion recipe; a safetensors file by another name passes
    if path.is_file() and path.suffix == ".safetensors" and model:
        file, run_config, kind = path, {"model": model, "cifar_stem": cifar_stem, "timm_kwargs": timm_kwargs}, "file"
    else:
        try:
            file, run_config = locate_weights(path)
        except FileNotFoundError as err:
            raise NotFoundError(f"{err}; for a bare weights file pass --model NAME [--cifar-stem]") from None
        if model and model != run_config["model"]:
            raise ConfigError(f"--model {model} contradicts the run config of {path} ({run_config['model']})")
        kind = "checkpoint" if path.is_file() or step_of(path) is not None else "run"
    name, stem = run_config["model"], bool(run_config.get("cifar_stem"))
    state = load_safetensors(file)
    backbone = _create(name, stem, run_config.get("timm_kwargs"))
    load_weights_checked(backbone, state, name)
    projector_state = split_state_dict(state)[1] or None
    spec = run_config.get("projector") if projector_state and kind != "file" else None
    return ResolvedBackbone(
        backbone, name, stem, dict(run_config.get("timm_kwargs") or {}), kind, str(file), weights_file=file,
        weights_sha256=sha256_file(file), image_size=run_config.get("image_size"), mean=run_config.get("mean"),
        std=run_config.get("std"), projector_spec=spec, projector_state=projector_state if spec else None,
        step=step_of(file), config=dict(run_config))


def resolve_backbone(source: Source = "random", *, model: Optional[str] = None, cifar_stem: bool = False,
                     timm_kwargs: Optional[Dict[str, Any]] = None, weights_file: Optional[Source] = None,
                     seed: int = 0) -> ResolvedBackbone:
    """Build the backbone named by ``source`` (see the module doc) with its weights.

    Args:
        source: ``"random"``, ``"timm:NAME"``, an export folder, a run directory, a checkpoint folder or file, or a
            ``.safetensors`` file.
        model, cifar_stem, timm_kwargs: the architecture for ``random``, ``timm:NAME`` and bare files; for an
            export or run they come from its config (a contradicting ``model`` is an error).
        weights_file: the local ``.safetensors`` file of ``timm:NAME``.
        seed: initialisation seed of ``random``.

    Returns:
        A :class:`ResolvedBackbone`; its ``backbone`` is in training mode, as ``timm.create_model`` returns it.
    """
    text = os.fspath(source)
    path = Path(text)
    if text == "random":
        return _random(model, cifar_stem, timm_kwargs, seed)
    if text.startswith("timm:"):
        return _timm(text[len("timm:"):], weights_file, cifar_stem, timm_kwargs)
    if is_export_dir(path):
        return _export(path, model)
    if path.exists():
        return _weights_file(path, model, cifar_stem, timm_kwargs)
    raise NotFoundError(f"--weights {text!r} is not 'random', 'timm:NAME', an existing export/run folder or a "
                            f".safetensors file")
