"""Linear probe on frozen features.

Features are extracted once (see :func:`smi_timm.eval.features.extract_pair`; with ``flip`` the training set also
gets the features of its horizontally flipped images), cached in memory and optionally on disk (the cache lives with
the extraction, in :mod:`smi_timm.eval.features`), standardised with the training statistics, and a single linear
layer (no batch norm) is trained with SGD + momentum and a cosine learning rate schedule. Everything after extraction
works on ``(N, D)`` tensors, so 100 epochs over 50k x 512 features take seconds on a CPU.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["train_linear_probe", "standardize"]


def standardize(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6) -> Tuple[torch.Tensor, ...]:
    """Centre and scale every feature with the mean/std of ``train``; the same transform is applied to ``others``."""
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True).clamp_min(eps)
    return tuple((t - mean) / std for t in (train, *others))


def train_linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                       test_labels: torch.Tensor, num_classes: Optional[int] = None, epochs: int = 100,
                       lr: float = 0.1, weight_decay: float = 1e-4, batch_size: int = 256, momentum: float = 0.9,
                       seed: int = 0, progress: bool = True, device: Optional[Union[str, torch.device]] = None,
                       num_threads: Optional[int] = 1) -> Dict[str, float]:
    """Train ``Linear(D, num_classes)`` on standardised ``train_feats`` and evaluate on ``test_feats``.

    SGD (momentum, weight decay on the weights only), learning rate ``lr`` decayed to 0 by a per-step cosine schedule
    over ``epochs``; mini-batches of ``batch_size`` reshuffled every epoch (seeded).

    On the CPU the loop runs with ``num_threads`` torch threads (default 1, restored afterwards): its matrices are
    small, and with more threads synchronisation costs more than it saves, badly so on a busy machine.

    Returns:
        ``{"top1", "top5"}`` on the test set and ``"train_top1"``, ``"train_loss"`` (last epoch, mean) in percent/nats.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(f"need epochs >= 1, batch_size >= 1, lr > 0 (got {epochs}, {batch_size}, {lr})")
    device = torch.device(device) if device is not None else train_feats.device
    old_threads = torch.get_num_threads()
    if device.type == "cpu" and num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _train(train_feats, train_labels, test_feats, test_labels, num_classes, epochs, lr, weight_decay,
                      batch_size, momentum, seed, progress, device)
    finally:
        torch.set_num_threads(old_threads)


def _train(train_feats, train_labels, test_feats, test_labels, num_classes, epochs, lr, weight_decay, batch_size,
           momentum, seed, progress, device) -> Dict[str, float]:
    x_train, x_test = standardize(train_feats.to(device, torch.float32), test_feats.to(device, torch.float32))
    y_train = train_labels.to(device, torch.int64)
    y_test = test_labels.to(device, torch.int64)
    if num_classes is None:
        num_classes = int(max(y_train.max().item(), y_test.max().item())) + 1
    n, dim = x_train.shape
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same initial weights on every device
    weight = torch.empty(num_classes, dim).normal_(0.0, 0.01, generator=gen).to(device)
    weight.requires_grad_(True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    opt = torch.optim.SGD([{"params": [weight], "weight_decay": weight_decay},
                           {"params": [bias], "weight_decay": 0.0}], lr=lr, momentum=momentum)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    step = 0
    last_loss = float("nan")
    from tqdm.auto import trange

    for _ in trange(epochs, desc="linear probe", unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(n, generator=gen).to(device)
        loss_sum = 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / total_steps))
            logits = F.linear(x_train[idx], weight, bias)
            loss = F.cross_entropy(logits, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * idx.numel()
            step += 1
        last_loss = loss_sum / n

    with torch.no_grad():
        top_n = min(5, num_classes)

        def _acc(x: torch.Tensor, y: torch.Tensor) -> Tuple[float, float]:
            pred = F.linear(x, weight, bias).topk(top_n, dim=1).indices
            hits = pred == y[:, None]
            return 100.0 * hits[:, 0].float().mean().item(), 100.0 * hits.any(dim=1).float().mean().item()

        top1, top5 = _acc(x_test, y_test)
        train_top1, _ = _acc(x_train, y_train)
    return {"top1": top1, "top5": top5, "train_top1": train_top1, "train_loss": last_loss}
