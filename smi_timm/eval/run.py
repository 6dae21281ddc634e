"""Evaluation of frozen backbones by weighted kNN and a linear probe: the library side of ``smi-eval``.

The order of work is explicit: a backbone source is resolved **once** (:meth:`Evaluation.prepare`: weights read and
their sha256 checked), features are extracted **once per image size** (:meth:`Evaluation.features`, through the
on-disk cache when ``settings.cache_dir`` is set), and kNN and the probe of that size run on the same
:class:`~smi_timm.eval.features.FeaturePair` (:meth:`Evaluation.knn`, :meth:`Evaluation.linear`). With
``settings.flip`` the pair holds the flipped training images' features too; the probe trains on them and kNN uses
only the originals, so the images are read once.

:func:`run_knn`, :func:`run_linear` and :func:`evaluate` (both from one extraction) wrap those steps for one call.
They return result dicts (model, weights and their sha256, data, sizes, accuracies, times, versions); they do not
print or write files: ``smi-eval`` does (:mod:`smi_timm.cli.eval`).

Sources: anything :func:`smi_timm.resolve.resolve_backbone` accepts, as a :class:`~smi_timm.resolve.BackboneSource`
(with the architecture of ``random`` / ``timm:NAME`` / bare files), a path string, or an already
:class:`~smi_timm.resolve.ResolvedBackbone`.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import timm
import torch

from .. import __version__
from ..errors import ConfigError
from ..resolve import BackboneSource, ResolvedBackbone
from .features import DataSpec, FeaturePair, data_label, data_list, extract_pair, feature_cache_key
from .knn import knn_classify_multi
from .linear import train_linear_probe
from .settings import EvalSettings

__all__ = ["Evaluation", "run_knn", "run_linear", "evaluate", "data_summary", "SourceLike"]

#: the counters that mean "a sample was read but not evaluated"
DROP_KINDS = ("missing_label", "bad_label", "missing_image", "undecodable")


def data_summary(stats: Dict[str, int]) -> Dict[str, Any]:
    """``{"read", "evaluated", "dropped": {reason: n}, ...}`` of an eval loader's counters."""
    dropped = {k: int(stats.get(k, 0)) for k in DROP_KINDS if stats.get(k)}
    out = {"read": int(stats.get("read", 0)), "evaluated": int(stats.get("samples", 0)), "dropped": dropped}
    for k in ("missing_shard", "bad_shard"):
        if stats.get(k):
            out[k] = int(stats[k])
    return out

log = logging.getLogger(__name__)

#: a backbone source: a path / ``random`` / ``timm:NAME`` string, a BackboneSource, or a resolved backbone
SourceLike = Union[str, os.PathLike, BackboneSource, ResolvedBackbone]


def _default_device(device: Optional[str]) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve(source: SourceLike, seed: int) -> ResolvedBackbone:
    if isinstance(source, ResolvedBackbone):
        return source
    if not isinstance(source, BackboneSource):
        source = BackboneSource.of(source, seed=seed)
    return source.resolve()


@dataclass
class Evaluation:
    """A resolved backbone on its device with the settings it is evaluated with."""

    resolved: ResolvedBackbone
    device: torch.device
    settings: EvalSettings

    @classmethod
    def prepare(cls, source: SourceLike, settings: Optional[EvalSettings] = None) -> "Evaluation":
        """Resolve ``source`` (once) and put its backbone in eval mode on the settings' device."""
        settings = settings or EvalSettings()
        resolved = _resolve(source, settings.seed)
        resolved.backbone.eval()
        return cls(resolved, _default_device(settings.device), settings)

    def info(self, image_size: Optional[int] = None) -> Dict[str, Any]:
        """What the results record about the backbone at ``image_size`` (default: the settings', else its own)."""
        return self.resolved.describe(image_size or self.settings.image_size)

    def features(self, train: DataSpec, test: DataSpec, *, image_size: Optional[int] = None,
                 flip: bool = False) -> Tuple[FeaturePair, Dict[str, Any]]:
        """``(features of train and test, info)`` at ``image_size``; ``flip`` adds the flipped training images'."""
        if not train or not test:
            raise ConfigError("evaluation needs train= and test= data (shard patterns or ImageFolder dirs)")
        s, info = self.settings, self.info(image_size)
        key = feature_cache_key(weights=info["weights_sha256"] or info["weights"], model=info["model"],
                                cifar_stem=info["cifar_stem"], train=data_list(train), test=data_list(test),
                                image_size=info["image_size"], flip=flip, amp=s.amp, max_batches=s.max_batches,
                                mean=info.get("mean"), std=info.get("std"), crop_pct=info.get("crop_pct"),
                                labels=(s.label_key, s.classes_file))
        pair = extract_pair(self.resolved.backbone, train, test, image_size=info["image_size"],
                            batch_size=s.batch_size, workers=s.workers, mean=info["mean"], std=info["std"],
                            crop_pct=info["crop_pct"], device=self.device, amp=s.amp, flip=flip,
                            max_batches=s.max_batches, progress=s.progress, cache_key=key, cache_dir=s.cache_dir,
                            metadata={"model": str(info["model"]), "weights": str(info["weights"])},
                            label_key=s.label_key, classes_file=s.classes_file)
        log.debug("features of %s at %d px: bank %s, queries %s (cached: %s)", info["weights"], info["image_size"],
                  tuple(pair.bank.shape), tuple(pair.query.shape), pair.cached)
        return pair, info

    def knn(self, pair: FeaturePair, info: Dict[str, Any], train: DataSpec, test: DataSpec) -> Dict[str, Any]:
        """Weighted kNN (``settings.ks``, ``settings.T``) of the queries against the bank (never its flipped
        copies)."""
        s, pair = self.settings, pair.unflipped()
        t0 = time.perf_counter()
        accs = knn_classify_multi(*pair.tensors(), ks=s.ks, T=s.T, device=self.device)
        result = _base_result("knn", info, train, test, pair, self.device, s.amp)
        k = int(s.k)
        result.update(k=k, T=float(s.T), top1=accs[k]["top1"], top5=accs[k]["top5"],
                      results={f"k={kk}": accs[kk] for kk in s.ks},
                      times=dict(pair.times, knn_s=time.perf_counter() - t0), eval=f"kNN k={k}, T={s.T:g}",
                      notes="; ".join(f"k={kk}: {accs[kk]['top1']:.2f} / {accs[kk]['top5']:.2f}" for kk in s.ks[1:]))
        return result

    def linear(self, pair: FeaturePair, info: Dict[str, Any], train: DataSpec, test: DataSpec) -> Dict[str, Any]:
        """The linear probe (:mod:`smi_timm.eval.linear`) trained on the bank (with its flipped copies, if any)."""
        s = self.settings
        t0 = time.perf_counter()
        accs = train_linear_probe(*pair.tensors(), epochs=s.probe_epochs, lr=s.probe_lr, weight_decay=s.probe_wd,
                                  batch_size=s.probe_batch_size, seed=s.seed, progress=s.progress, device=self.device)
        result = _base_result("linear", info, train, test, pair, self.device, s.amp)
        result.update(top1=accs["top1"], top5=accs["top5"], train_top1=accs["train_top1"],
                      train_loss=accs["train_loss"], epochs=s.probe_epochs, lr=s.probe_lr, wd=s.probe_wd,
                      probe_batch_size=s.probe_batch_size, flip=pair.flipped,
                      times=dict(pair.times, probe_s=time.perf_counter() - t0),
                      eval=f"linear {s.probe_epochs} ep" + (", flip" if pair.flipped else ""),
                      notes=f"lr {s.probe_lr:g}, wd {s.probe_wd:g}, batch {s.probe_batch_size}")
        return result


def _base_result(task: str, info: Dict[str, Any], train: DataSpec, test: DataSpec, pair: FeaturePair, device,
                 amp) -> Dict[str, Any]:
    return {
        "task": task, "model": info["model"], "weights": info["weights"], "weights_sha256": info["weights_sha256"],
        "cifar_stem": info["cifar_stem"], "image_size": info["image_size"], "num_features": int(pair.bank.shape[1]),
        "train": data_list(train), "test": data_list(test), "train_label": data_label(train),
        "test_label": data_label(test), "num_train": int(pair.bank.shape[0] // (2 if pair.flipped else 1)),
        "num_test": int(pair.query.shape[0]), "num_classes": pair.num_classes, "features_cached": pair.cached,
        "data": {split: data_summary(stats) for split, stats in pair.data.items()},
        "device": str(device), "amp": amp,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"smi_timm": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
    }


def _timed(result: Dict[str, Any], t_start: float) -> Dict[str, Any]:
    result["times"]["total_s"] = time.perf_counter() - t_start
    return result


def run_knn(source: SourceLike, train: DataSpec, test: DataSpec,
            settings: Optional[EvalSettings] = None) -> Dict[str, Any]:
    """Weighted kNN of ``test`` against the ``train`` bank (``settings.k``, also every ``settings.extra_k``)."""
    t0 = time.perf_counter()
    ev = Evaluation.prepare(source, settings)
    pair, info = ev.features(train, test)
    return _timed(ev.knn(pair, info, train, test), t0)


def run_linear(source: SourceLike, train: DataSpec, test: DataSpec,
               settings: Optional[EvalSettings] = None) -> Dict[str, Any]:
    """Linear probe on frozen features of ``train`` (with flipped copies when ``settings.flip``), tested on
    ``test``."""
    t0 = time.perf_counter()
    ev = Evaluation.prepare(source, settings)
    pair, info = ev.features(train, test, flip=ev.settings.flip)
    return _timed(ev.linear(pair, info, train, test), t0)


def evaluate(source: Union[SourceLike, Evaluation], train: DataSpec, test: DataSpec,
             settings: Optional[EvalSettings] = None, *, image_size: Optional[int] = None) -> Dict[str, Dict[str, Any]]:
    """kNN **and** the linear probe from one resolution of the source (or a prepared :class:`Evaluation`, whose
    settings then apply) and one feature extraction: ``{"knn": result, "linear": result}``."""
    t0 = time.perf_counter()
    ev = source if isinstance(source, Evaluation) else Evaluation.prepare(source, settings)
    pair, info = ev.features(train, test, image_size=image_size, flip=ev.settings.flip)
    return {"knn": _timed(ev.knn(pair, info, train, test), t0),
            "linear": _timed(ev.linear(pair, info, train, test), t0)}
