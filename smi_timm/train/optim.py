"""Optimisers and the learning-rate schedule of the pretraining loop.

- :class:`LARS` as in Barlow Twins: biases and normalisation parameters are excluded from weight decay and from the
  layer-wise adaptation, and get their own learning rate (``lr_biases``).
- AdamW (ViTs) and SGD with momentum, both with weight decay on weights only.
- :func:`lr_at_step`: linear warmup, then cosine decay to ``min_lr_ratio × peak``. It is a pure function of the
  optimiser step, so resuming needs nothing but the step.

Learning rates are given for a global batch of 256 and scaled linearly: ``peak = lr × global_batch / 256``.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["LARS", "param_groups", "build_optimizer", "lr_at_step", "set_lr", "OPTIMIZERS"]

OPTIMIZERS = ("lars", "adamw", "sgd")


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al., 2017) in the Barlow Twins form.

    For a parameter group with ``lars_adapt=True``: ``g ← g + wd·w``, then ``g ← g · η·‖w‖/‖g‖`` (when both norms are
    positive), then heavy-ball momentum. Groups with ``lars_adapt=False`` (biases, norm layers) skip the first two.

    Why not ``timm.optim.Lars``: both scale ``g + wd·w``, but timm divides by ``‖g‖ + wd·‖w‖ + ε`` (an upper bound)
    where Barlow Twins divides by ``‖g + wd·w‖`` itself; the published recipes (and our comparison with them) need
    Barlow Twins' update exactly.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001):
        if lr < 0:
            raise ConfigError(f"LARS: lr must be >= 0, got {lr}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_adapt=True))

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient, as multi-tensor (``torch._foreach_*``) operations: a few
        kernels per parameter group instead of ~10 per parameter, and no host synchronisation (the trust ratios stay
        on the device)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["lars_adapt"]:
                updates = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                param_norm = torch.stack(torch._foreach_norm(params))
                update_norm = torch.stack(torch._foreach_norm(updates))
                one = torch.ones_like(param_norm)
                trust = torch.where(param_norm > 0.0, torch.where(update_norm > 0.0,
                                                                  group["eta"] * param_norm / update_norm, one), one)
                torch._foreach_mul_(updates, list(trust.unbind(0)))
            else:
                updates = grads
            mus = []
            for p in params:
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mus.append(state["mu"])
            torch._foreach_mul_(mus, group["momentum"])
            torch._foreach_add_(mus, updates)
            torch._foreach_add_(params, mus, alpha=-group["lr"])
        return loss


def _is_no_decay(name: str, p: nn.Parameter) -> bool:
    """Biases and normalisation parameters (all 1-D tensors), plus ViT position embeddings / tokens."""
    return p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in ("pos_embed", "cls_token", "reg_token"))


def param_groups(model: nn.Module, weight_decay: float, lr_weights: float, lr_biases: float) -> List[Dict]:
    """Two groups: weights (decay, LARS adaptation) and biases/norms (no decay, no adaptation, own lr)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if _is_no_decay(name, p) else decay).append(p)
    return [
        dict(params=decay, weight_decay=weight_decay, lars_adapt=True, peak_lr=lr_weights, name="weights"),
        dict(params=no_decay, weight_decay=0.0, lars_adapt=False, peak_lr=lr_biases, name="biases_and_norms"),
    ]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, global_batch: int,
                    lr_biases: float = None, momentum: float = 0.9, betas=(0.9, 0.999)) -> torch.optim.Optimizer:
    """Create the optimiser with batch-scaled peak learning rates stored per group as ``peak_lr``.

    ``lr`` (and ``lr_biases``, LARS only; defaults to ``lr``) are per 256 images of global batch.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; valid values are: {', '.join(map(repr, OPTIMIZERS))}")
    scale = global_batch / 256.0
    lr_w = lr * scale
    lr_b = (lr if lr_biases is None or name != "lars" else lr_biases) * scale
    groups = param_groups(model, weight_decay, lr_w, lr_b)
    for g in groups:
        g["lr"] = g["peak_lr"]
    if name == "lars":
        return LARS(groups, lr=lr_w, weight_decay=weight_decay, momentum=momentum)
    for g in groups:
        g.pop("lars_adapt")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr_w, betas=betas, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr_w, momentum=momentum, weight_decay=weight_decay)


def lr_at_step(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.001) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based): linear warmup, then cosine."""
    if total_steps <= 0:
        raise ConfigError(f"total_steps must be positive, got {total_steps}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> Iterable[float]:
    """Set every group's lr to ``peak_lr × factor``; return the new rates."""
    rates = []
    for g in optimizer.param_groups:
        g["lr"] = g["peak_lr"] * factor
        rates.append(g["lr"])
    return rates
