"""Frozen-feature extraction for kNN, linear probes and analysis, and the feature cache.

* :func:`extract_features` runs a model over any iterable of ``(images, labels)`` batches;
* :func:`eval_loader` turns a data spec (shard patterns, an ImageFolder dir, ``sample:train`` / ``sample:test``: the
  loaders understand them all) into the deterministic eval loader, and passes an iterable of batches through;
* :func:`extract_pair` extracts the features of a bank split and a query split (what kNN and linear probes need),
  through the cache;
* the cache: with a ``cache_dir``, on disk as ``CACHE_DIR/features-<key>.safetensors`` (``train_feats``,
  ``train_labels``, ``test_feats``, ``test_labels``). ``key`` (:func:`feature_cache_key`) hashes the model weights
  (file sha256, or the random-init seed), the data specs, the image size and the extraction options, so any change
  gives a new file. Within one process nothing is cached behind the caller's back: code that needs the same
  features twice (kNN and the probe of one size) keeps the :class:`FeaturePair` it got.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..data import make_eval_loader
from ..errors import ConfigError, InputError
from ..layout import atomic_write_bytes

__all__ = ["extract_features", "resolve_amp_dtype", "DataSpec", "eval_loader", "loader_urls", "data_list",
           "data_label", "is_data_spec", "FeaturePair", "extract_pair", "feature_cache_key", "load_cached_features",
           "save_cached_features"]

#: Shard pattern(s), an ImageFolder dir, ``sample:train`` / ``sample:test``, or a list of those.
DataSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]
#: ``(bank_feats, bank_labels, query_feats, query_labels)``
Features = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def resolve_amp_dtype(amp: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """``None``/``"no"``/``"fp32"`` -> None; ``"bf16"`` -> ``torch.bfloat16``; ``"fp16"`` -> ``torch.float16``."""
    if amp is None or isinstance(amp, torch.dtype):
        return amp
    text = str(amp).lower()
    if text in ("no", "none", "off", "fp32", "float32", ""):
        return None
    if text in ("bf16", "bfloat16"):
        return torch.bfloat16
    if text in ("fp16", "float16", "half"):
        return torch.float16
    raise ConfigError(f"amp={amp!r} is not one of 'no', 'bf16', 'fp16'")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _unpack(batch: Any) -> Tuple[torch.Tensor, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise InputError(f"the loader must yield (images, labels) batches, got {type(batch).__name__}")


def extract_features(model: nn.Module, loader: Iterable, device: Optional[Union[str, torch.device]] = None,
                     amp_dtype: Union[None, str, torch.dtype] = None, max_batches: Optional[int] = None,
                     flip: bool = False, *, output_index: int = 0, progress: bool = True,
                     desc: str = "features") -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over ``loader`` without gradients and collect its outputs.

    Args:
        model: maps a batch of images to ``(batch, dim)`` features (a timm backbone with ``num_classes=0``); a model
            returning a tuple (e.g. ``SSLModel`` -> ``(features, embeddings)``) contributes ``output[output_index]``.
        loader: iterable of ``(images, labels)`` batches.
        device: where to run; default the model's device. The model is not moved back.
        amp_dtype: autocast dtype (``torch.bfloat16``/``"bf16"``) or None for full precision.
        max_batches: stop after this many batches.
        flip: also embed the horizontally flipped images; their features are appended after all the originals
            (2N rows, labels repeated), e.g. as extra linear-probe training samples.
        progress: show a tqdm bar.

    Returns:
        ``(features, labels)``: float32 ``(N, dim)`` and int64 ``(N,)`` CPU tensors (``2N`` rows with ``flip``).
        The model's train/eval mode is restored afterwards.
    """
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else _model_device(model)
    model.to(device)
    dtype = resolve_amp_dtype(amp_dtype)
    autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext())
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)

    def _embed(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        if isinstance(out, (tuple, list)):
            out = out[output_index]
        if out.ndim != 2:
            raise InputError(f"the model returned {tuple(out.shape)} for a batch; expected (batch, features). Use a "
                               f"timm backbone created with num_classes=0 (global pooling on).")
        return out.float().cpu()

    feats, flipped, labels = [], [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast:
            bar = tqdm(loader, total=total, desc=desc, unit="batch", disable=not progress, leave=False)
            for i, batch in enumerate(bar):
                if max_batches is not None and i >= max_batches:
                    break
                images, targets = _unpack(batch)
                images = images.to(device, non_blocking=True)
                feats.append(_embed(images))
                if flip:
                    flipped.append(_embed(torch.flip(images, dims=[-1])))
                labels.append(torch.as_tensor(targets).reshape(-1).to(torch.int64).cpu())
            bar.close()
    finally:
        model.train(was_training)
    if not feats:
        raise ConfigError("the loader yielded no batches: check the data paths/patterns")
    out_feats = torch.cat(feats + flipped)
    out_labels = torch.cat(labels)
    if flip:
        out_labels = torch.cat([out_labels, out_labels])
    if out_feats.shape[0] != out_labels.shape[0]:
        raise ConfigError(f"{out_feats.shape[0]} feature rows but {out_labels.shape[0]} labels: each batch needs one "
                         f"label per image")
    return out_feats, out_labels


# ---------------------------------------------------------------------------------------------------------------------
# data specs and loaders
# ---------------------------------------------------------------------------------------------------------------------

def is_data_spec(data: Any) -> bool:
    """A data spec (a string / path or a non-empty list of them), as opposed to an iterable of batches."""
    if isinstance(data, (str, os.PathLike)):
        return True
    return isinstance(data, (list, tuple)) and bool(data) and all(isinstance(d, (str, os.PathLike)) for d in data)


def data_list(spec: DataSpec) -> List[str]:
    """A data spec as a list of strings (not expanded)."""
    if isinstance(spec, (str, os.PathLike)):
        return [os.fspath(spec)]
    return [os.fspath(s) for s in spec]


def loader_urls(spec: DataSpec) -> Union[str, List[str]]:
    """What the loaders take: the single string of a one-item spec (an ImageFolder dir must be a string), else the
    list. ``sample:train`` / ``sample:test`` (the bundled CIFAR-10 sample) and patterns are expanded by the loaders."""
    items = data_list(spec)
    return items[0] if len(items) == 1 else items


def data_label(data: Any) -> str:
    """Short name of a data spec for tables: ``sample:test``, or the last two path parts of the first item."""
    if not is_data_spec(data):
        return type(data).__name__
    items = data_list(data)
    if len(items) == 1 and items[0].startswith("sample:"):
        return items[0]
    label = "/".join(Path(items[0].rstrip("/\\")).parts[-2:])
    return label + (f" (+{len(items) - 1})" if len(items) > 1 else "")


def eval_loader(data: Any, *, batch_size: int, image_size: int, workers: Optional[int] = None,
                mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                crop_pct: Optional[float] = None, label_key: Optional[str] = None,
                classes_file: Optional[str] = None) -> Iterable:
    """The deterministic eval loader (:func:`smi_timm.data.make_eval_loader`) of a data spec; any other iterable of
    ``(images, labels)`` batches is returned as it is. ``mean``/``std``/``crop_pct`` None: the loader's defaults;
    ``label_key`` / ``classes_file``: where labels are read (``cls`` by default)."""
    if not is_data_spec(data):
        return data
    norm = {k: tuple(float(x) for x in v) for k, v in (("mean", mean), ("std", std)) if v is not None}
    return make_eval_loader(loader_urls(data), batch_size=batch_size, image_size=image_size, num_workers=workers,
                            crop_pct=None if crop_pct is None else float(crop_pct), label_key=label_key,
                            classes_file=classes_file, **norm)


# ---------------------------------------------------------------------------------------------------------------------
# bank + query features, through the cache
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class FeaturePair:
    """Features and labels of a bank (training) split and a query (test) split."""

    bank: torch.Tensor
    bank_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    cached: bool = False
    times: Dict[str, float] = field(default_factory=dict)  #: extract_train_s, extract_test_s
    #: the bank holds the features of the flipped training images too (after all the originals): the probe uses
    #: them all, kNN only the originals (:meth:`unflipped`)
    flipped: bool = False
    #: the loaders' counters per split (``read``, ``samples`` used, and what was dropped and why); empty when cached
    data: Dict[str, Dict[str, int]] = field(default_factory=dict)

    def tensors(self) -> Features:
        return self.bank, self.bank_labels, self.query, self.query_labels

    def unflipped(self) -> "FeaturePair":
        """The pair without the flipped training images' features (itself when it has none)."""
        if not self.flipped:
            return self
        n = self.bank.shape[0] // 2
        return FeaturePair(self.bank[:n], self.bank_labels[:n], self.query, self.query_labels, self.cached,
                           dict(self.times), data=self.data)

    @property
    def num_classes(self) -> int:
        return int(max(self.bank_labels.max().item(), self.query_labels.max().item())) + 1


def extract_pair(model: nn.Module, bank: Any, query: Any, *, image_size: int, batch_size: int = 256,
                 workers: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, crop_pct: Optional[float] = None,
                 device: Optional[Union[str, torch.device]] = None, amp: Union[None, str, torch.dtype] = None,
                 flip: bool = False, max_batches: Optional[int] = None, progress: bool = False,
                 cache_key: Optional[str] = None, cache_dir: Optional[Union[str, os.PathLike]] = None,
                 metadata: Optional[Dict[str, str]] = None, label_key: Optional[str] = None,
                 classes_file: Optional[str] = None) -> FeaturePair:
    """Features of ``bank`` and ``query`` (data specs or iterables of batches; see :func:`eval_loader`).

    ``flip`` adds the flipped bank images' features (linear-probe training); ``max_batches`` caps each split. With a
    ``cache_key`` and a ``cache_dir`` the pair is looked up in (and saved to) the on-disk cache. The loaders'
    counters (samples read, used, and dropped by reason) are in ``pair.data``.
    """
    if cache_key is not None and cache_dir is not None:
        hit = load_cached_features(cache_key, cache_dir)
        if hit is not None:
            return FeaturePair(*hit, cached=True, times={"extract_train_s": 0.0, "extract_test_s": 0.0}, flipped=flip)
    opts = dict(batch_size=batch_size, image_size=image_size, workers=workers, mean=mean, std=std, crop_pct=crop_pct,
                label_key=label_key, classes_file=classes_file)
    run = dict(device=device, amp_dtype=amp, max_batches=max_batches, progress=progress)
    t0 = time.perf_counter()
    bank_loader, query_loader = eval_loader(bank, **opts), eval_loader(query, **opts)
    bank_feats, bank_labels = extract_features(model, bank_loader, flip=flip, desc="train features", **run)
    t1 = time.perf_counter()
    query_feats, query_labels = extract_features(model, query_loader, desc="test features", **run)
    pair = FeaturePair(bank_feats, bank_labels, query_feats, query_labels,
                       times={"extract_train_s": t1 - t0, "extract_test_s": time.perf_counter() - t1}, flipped=flip,
                       data={name: loader.stats() for name, loader in (("train", bank_loader), ("test", query_loader))
                             if hasattr(loader, "stats")})
    if cache_key is not None and cache_dir is not None:
        save_cached_features(cache_key, pair.tensors(), cache_dir, metadata=metadata)
    return pair


def feature_cache_key(**parts: Any) -> str:
    """Stable hex key of the things that determine extracted features (weights hash, data, image size, options)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def _cache_path(cache_dir: Union[str, os.PathLike], key: str) -> Path:
    return Path(cache_dir) / f"features-{key}.safetensors"


def load_cached_features(key: str, cache_dir: Union[str, os.PathLike]) -> Optional[Features]:
    """``(train_feats, train_labels, test_feats, test_labels)`` from ``cache_dir``; None on a miss."""
    if not _cache_path(cache_dir, key).is_file():
        return None
    from safetensors.torch import load_file

    d = load_file(str(_cache_path(cache_dir, key)))
    return d["train_feats"], d["train_labels"], d["test_feats"], d["test_labels"]


def save_cached_features(key: str, feats: Features, cache_dir: Union[str, os.PathLike],
                         metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write ``feats`` atomically to ``CACHE_DIR/features-<key>.safetensors``; returns the path."""
    from safetensors.torch import save

    names = ("train_feats", "train_labels", "test_feats", "test_labels")
    data = save({n: t.contiguous() for n, t in zip(names, feats)}, metadata=dict(metadata or {}))
    path = _cache_path(cache_dir, key)
    atomic_write_bytes(path, data)
    return path
