"""Weighted k-nearest-neighbour classification on frozen features.

The classifier of Wu et al. (2018, InstDisc), also used by DINO: features are L2-normalised, each test sample takes
its ``k`` most cosine-similar training samples, and each neighbour votes for its class with weight ``exp(sim / T)``.

:func:`knn_evaluate` is the one "backbone + bank + queries -> kNN accuracy" path: ``smi-eval knn``, the quick start,
the comparison harness and the training loop's online monitor all call it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .features import FeaturePair, extract_pair

__all__ = ["knn_classify", "knn_classify_multi", "knn_evaluate", "KnnResult"]


def knn_classify_multi(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                       test_labels: torch.Tensor, ks: Iterable[int] = (200, 20), T: float = 0.1,
                       num_classes: Optional[int] = None, chunk_size: int = 256,
                       device: Optional[Union[str, torch.device]] = None) -> Dict[int, Dict[str, float]]:
    """:func:`knn_classify` for several ``k`` at once (one similarity pass): ``{k: {"top1": %, "top5": %}}``."""
    ks = sorted({int(k) for k in ks}, reverse=True)
    if not ks or ks[-1] < 1:
        raise ConfigError(f"k must be positive integers, got {ks}")
    if T <= 0:
        raise ConfigError(f"temperature T must be > 0, got {T}")
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ConfigError(f"features must be (N, D) with the same D; got train {tuple(train_feats.shape)} and test "
                         f"{tuple(test_feats.shape)}")
    if train_feats.shape[0] != train_labels.shape[0] or test_feats.shape[0] != test_labels.shape[0]:
        raise ConfigError("one label per feature row is needed (train and test)")
    device = torch.device(device) if device is not None else train_feats.device
    train = F.normalize(train_feats.to(device, torch.float32), dim=1)
    test = F.normalize(test_feats.to(device, torch.float32), dim=1)
    train_labels = train_labels.to(device, torch.int64)
    test_labels = test_labels.to(device, torch.int64)
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    k_max = min(ks[0], train.shape[0])
    top_n = min(5, num_classes)
    correct = {k: [0, 0] for k in ks}
    for start in range(0, test.shape[0], chunk_size):
        sims, idx = (test[start:start + chunk_size] @ train.T).topk(k_max, dim=1)  # sorted, most similar first
        neighbour_labels = train_labels[idx]
        weights = (sims / T).exp()
        target = test_labels[start:start + chunk_size, None]
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(sims.shape[0], num_classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            pred = votes.topk(top_n, dim=1).indices
            hits = pred == target
            correct[k][0] += int(hits[:, 0].sum())
            correct[k][1] += int(hits.any(dim=1).sum())
    n = test.shape[0]
    return {k: {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n} for k, (c1, c5) in correct.items()}


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 200, T: float = 0.1, num_classes: Optional[int] = None,
                 chunk_size: int = 256, device: Optional[Union[str, torch.device]] = None) -> Dict[str, float]:
    """Weighted kNN accuracy of ``test`` against the ``train`` bank: ``{"top1": %, "top5": %}``.

    Args:
        train_feats, test_feats: ``(N, D)`` features (normalised here).
        train_labels, test_labels: int class indices.
        k: neighbours (clipped to the bank size). T: temperature of the ``exp(sim / T)`` vote weights.
        num_classes: default ``max label + 1``. top-5 is top-``min(5, num_classes)``.
        chunk_size: test rows per similarity block (memory ~ ``chunk_size * N_train`` floats).
        device: where to compute; default the device of ``train_feats``.
    """
    return knn_classify_multi(train_feats, train_labels, test_feats, test_labels, ks=(k,), T=T,
                              num_classes=num_classes, chunk_size=chunk_size, device=device)[int(k)]


@dataclass
class KnnResult:
    """Accuracies of :func:`knn_evaluate`, with the features they were computed from."""

    accuracy: Dict[int, Dict[str, float]]  #: ``{k: {"top1": %, "top5": %}}``
    T: float
    features: FeaturePair
    seconds: float  #: time of the classification itself (extraction times are in ``features.times``)

    def monitor(self, k: int) -> Dict[str, float]:
        """``{"knn_top1", "knn_top5"}`` of ``k``: the record the training loop writes to ``metrics.jsonl``."""
        return {"knn_top1": float(self.accuracy[k]["top1"]), "knn_top5": float(self.accuracy[k]["top5"])}


def knn_evaluate(backbone: nn.Module, bank: Any, query: Any, *, ks: Sequence[int] = (200, 20), T: float = 0.1,
                 image_size: int, batch_size: int = 256, workers: Optional[int] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 crop_pct: Optional[float] = None, device: Optional[Union[str, torch.device]] = None,
                 amp: Union[None, str, torch.dtype] = None, max_batches: Optional[int] = None,
                 progress: bool = False, cache_key: Optional[str] = None, cache_dir: Optional[str] = None,
                 metadata: Optional[Dict[str, str]] = None) -> KnnResult:
    """Weighted kNN accuracy of ``backbone``'s features: ``query`` classified against the ``bank``, for every ``k``.

    Args:
        backbone: maps images to ``(batch, dim)`` features (a timm backbone with ``num_classes=0``).
        bank, query: data specs (shard patterns, an ImageFolder dir, ``sample:train`` / ``sample:test``) read with
            the eval loader at ``image_size`` (``mean``/``std``/``crop_pct``: None = the loader's defaults), or any
            iterables of ``(images, labels)`` batches.
        ks, T: neighbour counts (one similarity pass for all) and the vote temperature.
        device, amp: where and in which autocast dtype features are extracted; the kNN runs on ``device`` too.
        max_batches: cap on each split (quick checks). cache_key, cache_dir: see
            :func:`~smi_timm.eval.features.extract_pair` (only for fixed weights: a training monitor passes none).
    """
    pair = extract_pair(backbone, bank, query, image_size=image_size, batch_size=batch_size, workers=workers,
                        mean=mean, std=std, crop_pct=crop_pct, device=device, amp=amp, max_batches=max_batches,
                        progress=progress, cache_key=cache_key, cache_dir=cache_dir, metadata=metadata)
    t0 = time.perf_counter()
    accuracy = knn_classify_multi(*pair.tensors(), ks=ks, T=T, device=device)
    return KnnResult(accuracy, float(T), pair, time.perf_counter() - t0)
