"""Weights files: safetensors I/O, sha256, state-dict checks and splits, and the weights errors.

The one home of how smi-timm reads and writes weights (:mod:`smi_timm.export` writes export folders with it; the
registry, ``torch.hub`` entries and the resolver read through it):

* :func:`load_safetensors` reads a safetensors file onto the CPU and refuses pickles (``.pth``, ``.pt``, ...) with
  the command that converts them; :func:`safetensors_bytes` writes deterministic bytes (same tensors, same sha256);
* :func:`sha256_file` hashes a file in chunks;
* :func:`split_state_dict` splits an ``SSLModel`` (or its state dict) into backbone and projector parts;
  :func:`strip_ssl_prefix` keeps the backbone part of any state dict;
* :func:`check_state_dict` compares keys and shapes with a model and raises :class:`WeightsMismatchError` naming the
  first offenders; :func:`load_weights_checked` loads a state dict into a timm model that way.

This module imports only torch and safetensors.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Tuple, Union

import torch
from torch import nn

from ..errors import InputError, WeightsError

__all__ = ["WeightsMismatchError", "WeightsHashError", "WeightsNotPublishedError", "WeightsFileError",
           "PICKLE_SUFFIXES", "sha256_file", "load_safetensors", "safetensors_bytes", "split_state_dict",
           "strip_ssl_prefix", "classifier_keys", "check_state_dict", "load_weights_checked"]

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle", ".tar", ".npz")


class WeightsMismatchError(WeightsError):
    """A weights file whose tensors do not fit the architecture (missing, unexpected or differently shaped keys)."""


class WeightsHashError(WeightsError):
    """A weights file whose sha256 differs from the expected digest."""


class WeightsNotPublishedError(WeightsError):
    """``pretrained=True`` for a model whose SMI weights have not been released (pass a local file instead)."""


class WeightsFileError(WeightsError, ValueError):
    """A file that is not a readable safetensors weights file (a pickle, or corrupt)."""


def sha256_file(path: Union[str, os.PathLike], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def load_safetensors(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Read a safetensors file onto the CPU; refuse pickle checkpoints with a message saying how to convert them."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(PICKLE_SUFFIXES) or name.endswith(".pth.tar"):
        raise WeightsFileError(
            f"{path} looks like a pickle checkpoint ({path.suffix}); smi-timm only reads .safetensors files because "
            f"unpickling can execute code. Convert it once where you trust it: python -c \"import torch, "
            f"safetensors.torch as st; st.save_file(torch.load('{path.name}', weights_only=True), "
            f"'model.safetensors')\""
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise WeightsFileError(f"{path} is not a readable safetensors file ({err}); pass a .safetensors weights file "
                         f"such as the model.safetensors written by smi-export") from None


def safetensors_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Deterministic safetensors bytes (same tensors -> same sha256).

    The only metadata is ``format: pt``: safetensors writes metadata keys in hash-map order, so several keys would
    make the bytes, and a recorded sha256, differ from run to run.
    """
    from safetensors.torch import save

    # clone: safetensors refuses tensors that share storage; contiguous CPU copies are always accepted
    clean = {k: tensors[k].detach().to("cpu").contiguous().clone() for k in sorted(tensors)}
    return save(clean, metadata={"format": "pt"})


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
        raise InputError(f"split_state_dict takes an SSLModel, a backbone module or a state dict, not "
                        f"{type(obj).__name__}")
    state = dict(obj)
    for prefix in ("module.", "_orig_mod."):  # DDP, then torch.compile
        consume_prefix_in_state_dict_if_present(state, prefix)
    if any(k.startswith("backbone.") for k in state):
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        projector = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
        return backbone, projector
    return state, {}


def strip_ssl_prefix(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Bare backbone keys from a full ``SSLModel`` state dict (``backbone.*`` kept without prefix, ``projector.*``
    dropped). DDP/compile prefixes (``module.``, ``_orig_mod.``) are removed too. Other dicts pass unchanged."""
    out: Dict[str, Any] = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    if any(k.startswith("backbone.") for k in out):
        out = {k[len("backbone."):]: v for k, v in out.items() if k.startswith("backbone.")}
    return out


def classifier_keys(model: nn.Module) -> List[str]:
    """The classifier's ``weight`` / ``bias`` keys of a timm model (from its ``pretrained_cfg``)."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not classifier:
        return []
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return [f"{n}.{p}" for n in names for p in ("weight", "bias")]


def _shape(t: Any) -> Tuple[int, ...]:
    return tuple(getattr(t, "shape", ()))


def _first(items: Iterable[str], n: int = 5) -> str:
    items = list(items)
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_state_dict(state_dict: Mapping[str, Any], model: nn.Module, *, name: str = "",
                     ignore: Iterable[str] = ()) -> None:
    """Raise :class:`WeightsMismatchError` unless ``state_dict`` has exactly the keys and shapes of ``model``.

    Keys in ``ignore`` (typically the classifier) may be missing or extra. The message names the first missing,
    unexpected and differently shaped keys, with shapes.
    """
    ignore = set(ignore)
    expected = {k: _shape(v) for k, v in model.state_dict().items()}
    got = {k: _shape(v) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in got and k not in ignore]
    unexpected = [k for k in got if k not in expected and k not in ignore]
    mismatched = [f"{k}: file {list(got[k])} vs model {list(expected[k])}"
                  for k in expected if k in got and got[k] != expected[k] and k not in ignore]
    if not (missing or unexpected or mismatched):
        return
    name = name or type(model).__name__
    parts = []
    if mismatched:
        parts.append(f"{len(mismatched)} tensor(s) with a different shape ({_first(mismatched, 3)})")
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({_first(unexpected)})")
    hint = ("Check that the file was exported from the same architecture and options (image size, patch size, "
            "stem): weights of a CIFAR-stem ResNet need the *_cifar names (e.g. smi_resnet18_cifar), and the "
            "config.json written by smi-export names the architecture to use.")
    if any(k.startswith("conv1.weight") for k in mismatched):
        hint = ("conv1 has a different shape: the file and the model use different stems (CIFAR 3x3 vs ImageNet "
                "7x7); use the *_cifar name for CIFAR-stem weights (e.g. smi_resnet18_cifar) or the plain one.")
    raise WeightsMismatchError(f"weights do not fit {name}: " + "; ".join(parts) + ". " + hint)


def load_weights_checked(model: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    """Load backbone (or full ``SSLModel``) weights into a timm model: every key and shape must match, except the
    classifier's (the file may carry one, the model may have a new one).

    Not timm's ``load_checkpoint``: that one also unpickles ``.pth`` files and reports a mismatch as torch's full key
    lists; here the state comes from a safetensors file and the error
    (:class:`WeightsMismatchError`) names the first offending keys with their shapes.
    """
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    ignore = [f"{c}.{p}" for c in names for p in ("weight", "bias")]
    state = {k: v for k, v in strip_ssl_prefix(state).items() if k not in ignore}
    check_state_dict(state, model, name=name, ignore=ignore)
    model.load_state_dict(state, strict=False)


