"""Shared input checks and the differentiable all-gather used by every loss."""
from __future__ import annotations

from typing import Tuple

import torch

from ..errors import ConfigError

VALID_TRANSFORMS = ("mi", "square")
VALID_BACKENDS = ("auto", "torch", "triton")


def check_embeddings(za: torch.Tensor, zb: torch.Tensor, loss_name: str) -> None:
    """Validate a pair of ``(N, D)`` embedding batches; raise ``ValueError`` naming the shapes otherwise."""
    for name, z in (("za", za), ("zb", zb)):
        if not isinstance(z, torch.Tensor):
            raise ConfigError(f"{loss_name}: {name} must be a torch.Tensor, got {type(z).__name__}")
        if z.ndim != 2:
            raise ConfigError(
                f"{loss_name}: {name} must be a 2-D (N, D) batch of embeddings, got shape {tuple(z.shape)} "
                f"({z.ndim}-D). Flatten extra dimensions first, e.g. z.flatten(1)."
            )
        if not z.is_floating_point():
            raise ConfigError(
                f"{loss_name}: {name} must be a floating tensor (float32/float16/bfloat16/float64), got {z.dtype} "
                f"with shape {tuple(z.shape)}. Cast it with .float()."
            )
    if za.shape != zb.shape:
        raise ConfigError(
            f"{loss_name}: za and zb must have the same shape, got za {tuple(za.shape)} and zb {tuple(zb.shape)}"
        )
    n, d = za.shape
    if n < 2:
        raise ConfigError(f"{loss_name}: needs at least 2 samples per batch, got za/zb of shape {tuple(za.shape)}")
    if d < 2:
        raise ConfigError(f"{loss_name}: needs at least 2 features per sample, got za/zb of shape {tuple(za.shape)}")


def check_choice(value: str, valid: Tuple[str, ...], what: str) -> str:
    if value not in valid:
        raise ConfigError(f"unknown {what} {value!r}; valid values are: {', '.join(repr(v) for v in valid)}")
    return value


def is_distributed() -> bool:
    """True when a default torch.distributed process group is initialised with more than one rank."""
    if not torch.distributed.is_available():
        return False
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(z: torch.Tensor) -> torch.Tensor:
    """All-gather ``z`` (N_local, D) from every rank into (N_global, D), keeping gradients.

    The backward of ``torch.distributed.nn.functional.all_gather`` sums (reduce-scatters) the gradient of every
    rank's copy of the global loss into each rank's local input. Every rank computes the same global loss, so each
    local input receives ``world_size`` times its share; DDP's averaging of parameter gradients divides that factor
    out again, and the parameter gradients equal those of one process on the concatenated batch.

    Outside torch.distributed (or with one rank) this is the identity.
    """
    if not is_distributed():
        return z
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    sizes = [torch.zeros(1, dtype=torch.long, device=z.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([z.shape[0]], dtype=torch.long, device=z.device))
    sizes_list = [int(s.item()) for s in sizes]
    if len(set(sizes_list)) != 1:
        raise ConfigError(
            f"gather=True needs the same local batch size on every rank, got {sizes_list}; drop the last "
            f"incomplete batch (drop_last=True) or use gather=False"
        )
    return torch.cat(dist_fn.all_gather(z.contiguous()), dim=0)
