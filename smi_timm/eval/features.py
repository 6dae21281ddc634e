"""Frozen-feature extraction for kNN, linear probes and analysis."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Iterable, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["extract_features", "resolve_amp_dtype"]


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
    raise ValueError(f"amp={amp!r} is not one of 'no', 'bf16', 'fp16'")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _unpack(batch: Any) -> Tuple[torch.Tensor, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"the loader must yield (images, labels) batches, got {type(batch).__name__}")


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
            raise RuntimeError(f"the model returned {tuple(out.shape)} for a batch; expected (batch, features). Use a "
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
        raise ValueError("the loader yielded no batches: check the data paths/patterns")
    out_feats = torch.cat(feats + flipped)
    out_labels = torch.cat(labels)
    if flip:
        out_labels = torch.cat([out_labels, out_labels])
    if out_feats.shape[0] != out_labels.shape[0]:
        raise ValueError(f"{out_feats.shape[0]} feature rows but {out_labels.shape[0]} labels: each batch needs one "
                         f"label per image")
    return out_feats, out_labels
