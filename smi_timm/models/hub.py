"""``torch.hub`` entry points (re-exported by the repository's ``hubconf.py``).

::

    model = torch.hub.load("REPO_OR_CLONE", "smi_resnet50", source="local", pretrained=False)       # random init
    model = torch.hub.load("REPO_OR_CLONE", "smi_resnet50", source="local", weights="model.safetensors")
    model = torch.hub.load("REPO_OR_CLONE", "smi_resnet50", source="local",
                           weights="https://.../model.safetensors", sha256="<hex>", num_classes=10)

Every entry has the signature ``(pretrained=True, weights=None, num_classes=0, **kwargs)`` and returns a timm model
(``num_classes=0``: pooled features; ``num_classes>0``: a freshly initialised classifier on top).

* ``weights`` — a local ``.safetensors`` file, an export directory holding ``model.safetensors``, or an http(s)/file
  URL. URLs are downloaded once into ``torch.hub.get_dir()/checkpoints`` and checked against ``sha256=`` (a full
  hex digest or a prefix of at least 8 characters). ``weights`` wins over ``pretrained``.
* ``pretrained=True`` without ``weights`` downloads the published file of the model's default config, checked
  against its recorded sha256. No SMI weights are published yet, so this raises
  :class:`~smi_timm.models.weights.WeightsNotPublishedError` explaining how to pass ``weights=``; it never returns a
  silently random model.
* Only safetensors are read. Pickle checkpoints (``.pth``, ``.pt``, ``.bin``, ``.ckpt``, ...) are refused, because
  unpickling can run arbitrary code; convert them once with
  ``safetensors.torch.save_file(torch.load(path, weights_only=True), "model.safetensors")``.
* A file whose tensors do not fit the architecture raises
  :class:`~smi_timm.models.weights.WeightsMismatchError` naming the first missing, unexpected and mis-shaped keys.
  A full ``SSLModel`` state dict (``backbone.*``/``projector.*``) is accepted; the projector is ignored.

This module imports only torch, timm, safetensors, :mod:`smi_timm.models.registry`, :mod:`smi_timm.models.weights`
and the file names of :mod:`smi_timm.layout` (standard library only).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from ..errors import ConfigError, NotFoundError
from ..layout import WEIGHTS_NAME
from .registry import published_weights
from .weights import (
    WeightsHashError,
    WeightsMismatchError,
    WeightsNotPublishedError,
    load_safetensors,
    sha256_file,
)

__all__ = [
    "load_model",
    "resolve_weights",
    "load_safetensors",
    "sha256_file",
    "WeightsHashError",
    "WeightsMismatchError",
    "WeightsNotPublishedError",
    "smi_resnet18",
    "smi_resnet50",
    "smi_vit_small_patch16_224",
    "smi_resnet18_cifar",
    "smi_resnet50_cifar",
]

def _normalise_hash(sha256: Optional[str]) -> Optional[str]:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if value.startswith("sha256:"):
        value = value[len("sha256:"):]
    if len(value) < 8 or any(c not in "0123456789abcdef" for c in value):
        raise ConfigError(f"sha256={sha256!r} is not a hex digest (or a prefix of at least 8 hex characters)")
    return value


def _check_hash(path: Path, expected: Optional[str], source: str) -> None:
    if expected is None:
        return
    actual = sha256_file(path)
    if not actual.startswith(expected):
        raise WeightsHashError(
            f"sha256 of {source} is {actual}, expected {expected}: the file is corrupt, truncated or not the one "
            f"the digest was recorded for. Re-download or re-export it, or pass the right sha256=."
        )


def _is_url(text: str) -> bool:
    return urlparse(text).scheme in ("http", "https", "file")


def _download(url: str, expected: Optional[str], progress: bool = True) -> Path:
    """Download ``url`` into the torch hub cache (once) and check its sha256."""
    if expected is None:
        warnings.warn(f"downloading {url} without sha256=: its integrity is not checked", stacklevel=3)
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cache_dir.mkdir(parents=True, exist_ok=True)
    parsed = urlparse(url)
    base = os.path.basename(parsed.path) or "weights.safetensors"
    dst = cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}"
    if dst.exists():
        try:
            _check_hash(dst, expected, f"the cached file {dst}")
            return dst
        except WeightsHashError:
            dst.unlink()  # stale or partial cache entry: fetch again
    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=expected, progress=progress)
    except RuntimeError as err:
        if "invalid hash value" in str(err):
            raise WeightsHashError(
                f"the file downloaded from {url} does not match sha256 {expected} ({err}); the URL serves a "
                f"different or corrupted file. Check the URL and the sha256= you passed."
            ) from None
        raise
    return dst


def resolve_weights(weights: Union[str, os.PathLike], sha256: Optional[str] = None, progress: bool = True) -> Path:
    """Local path of ``weights`` (a file, an export dir with ``model.safetensors``, or a URL to download),
    checked against ``sha256`` when given."""
    expected = _normalise_hash(sha256)
    text = os.fspath(weights)
    if _is_url(text):
        return _download(text, expected, progress=progress)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            raise NotFoundError(f"weights directory {path} has no {WEIGHTS_NAME}; pass the weights file "
                                    f"itself or a directory written by smi-export")
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise NotFoundError(f"weights file {path} does not exist; pass weights= the path of a .safetensors file "
                                f"(e.g. OUT_DIR/model.safetensors written by smi-export) or an https:// URL")
    _check_hash(path, expected, str(path))
    return path


def load_model(name: str, pretrained: bool = True, weights: Optional[Union[str, os.PathLike]] = None,
               num_classes: int = 0, sha256: Optional[str] = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    """Create the registered model ``name`` with weights from ``weights`` / the published file / nothing.

    Args:
        name: a registered smi-timm name (``smi_resnet50``, ``smi_resnet18_cifar``, ...).
        pretrained: load the published weights when ``weights`` is None (raises while none are published).
        weights: local ``.safetensors`` path, export directory, or http(s)/file URL; overrides ``pretrained``.
        num_classes: 0 for pooled features; >0 adds a newly initialised classifier.
        sha256: expected digest (or prefix >= 8 hex chars) of the weights file; required for published weights,
            checked for local files and URLs when given.
        progress: show a download progress bar.
        **kwargs: passed to ``timm.create_model`` (``img_size``, ``drop_path_rate``, ...).
    """
    if weights is None and not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if weights is None:
        url, published_hash = published_weights(name)  # raises WeightsNotPublishedError while nothing is released
        path = _download(url, _normalise_hash(sha256) or published_hash, progress=progress)
    else:
        path = resolve_weights(weights, sha256=sha256, progress=progress)
    state_dict = load_safetensors(path)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=None, state_dict=state_dict)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes,
                              **kwargs)
    model.pretrained_cfg.pop("state_dict", None)
    model.pretrained_cfg["file"] = str(path)
    return model


def _entry(name: str):
    def entry(pretrained: bool = True, weights: Optional[Union[str, os.PathLike]] = None, num_classes: int = 0,
              **kwargs: Any) -> nn.Module:
        return load_model(name, pretrained=pretrained, weights=weights, num_classes=num_classes, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"``{name}``: timm model with SMI weights.\n\n"
        f"Args:\n"
        f"    pretrained: load the published weights (raises while none are published; pass ``weights``).\n"
        f"    weights: local .safetensors path, export dir, or http(s)/file URL (with ``sha256=``).\n"
        f"    num_classes: 0 for pooled features, >0 for a new classifier.\n"
        f"    **kwargs: ``sha256``, ``progress`` and anything ``timm.create_model`` accepts.\n"
    )
    return entry


smi_resnet18 = _entry("smi_resnet18")
smi_resnet50 = _entry("smi_resnet50")
smi_vit_small_patch16_224 = _entry("smi_vit_small_patch16_224")
smi_resnet18_cifar = _entry("smi_resnet18_cifar")
smi_resnet50_cifar = _entry("smi_resnet50_cifar")

