"""Shared input checks and the differentiable collectives (all-gather, all-reduce) used by every loss."""
from __future__ import annotations

from typing import Callable, Tuple

import torch

from ..errors import ConfigError, InputError

VALID_TRANSFORMS = ("mi", "square")
VALID_BACKENDS = ("auto", "torch", "triton")


def check_embeddings(za: torch.Tensor, zb: torch.Tensor, loss_name: str) -> None:
    """Validate a pair of ``(N, D)`` embedding batches; raise ``ValueError`` naming the shapes otherwise."""
    for name, z in (("za", za), ("zb", zb)):
        if not isinstance(z, torch.Tensor):
            raise InputError(f"{loss_name}: {name} must be a torch.Tensor, got {type(z).__name__}")
        if z.ndim != 2:
            raise InputError(
                f"{loss_name}: {name} must be a 2-D (N, D) batch of embeddings, got shape {tuple(z.shape)} "
                f"({z.ndim}-D). Flatten extra dimensions first, e.g. z.flatten(1)."
            )
        if not z.is_floating_point():
            raise InputError(
                f"{loss_name}: {name} must be a floating tensor (float32/float16/bfloat16/float64), got {z.dtype} "
                f"with shape {tuple(z.shape)}. Cast it with .float()."
            )
    if za.shape != zb.shape:
        raise InputError(
            f"{loss_name}: za and zb must have the same shape, got za {tuple(za.shape)} and zb {tuple(zb.shape)}"
        )
    n, d = za.shape
    if n < 2:
        raise InputError(f"{loss_name}: needs at least 2 samples per batch, got za/zb of shape {tuple(za.shape)}")
    if d < 2:
        raise InputError(f"{loss_name}: needs at least 2 features per sample, got za/zb of shape {tuple(za.shape)}")


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


_CHECKED_SIZES: set = set()


def rank_and_world() -> Tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` outside torch.distributed."""
    if not is_distributed():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def _check_equal_sizes(z: torch.Tensor) -> None:
    """Every rank must hold the same number of rows; checked once per row count (a host sync), not every step."""
    import torch.distributed as dist

    n = int(z.shape[0])
    if n in _CHECKED_SIZES:
        return
    sizes = [torch.zeros(1, dtype=torch.long, device=z.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=z.device))
    sizes_list = [int(s.item()) for s in sizes]
    if len(set(sizes_list)) != 1:
        raise InputError(
            f"gather=True needs the same local batch size on every rank, got {sizes_list}; drop the last "
            f"incomplete batch (drop_last=True) or use gather=False"
        )
    _CHECKED_SIZES.add(n)


def gather_with_grad(z: torch.Tensor) -> torch.Tensor:
    """All-gather ``z`` (N_local, D) from every rank into (N_global, D), keeping gradients.

    The backward of ``torch.distributed.nn.functional.all_gather`` sums (reduce-scatters) the gradient of every
    rank's copy into each rank's local input. Outside torch.distributed (or with one rank) this is the identity.
    """
    if not is_distributed():
        return z
    import torch.distributed.nn.functional as dist_fn

    _check_equal_sizes(z)
    return torch.cat(dist_fn.all_gather(z.contiguous()), dim=0)


def all_reduce_with_grad(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the ranks, differentiable (its backward sums the gradients of every rank's copy);
    the identity outside torch.distributed."""
    if not is_distributed():
        return t
    import torch.distributed.nn.functional as dist_fn

    return dist_fn.all_reduce(t.contiguous())


def global_batch_size(z: torch.Tensor) -> int:
    """Rows of the global batch: ``W·n`` for ``n`` rows on each of ``W`` ranks (checked equal once per size), ``n``
    outside torch.distributed."""
    if not is_distributed():
        return int(z.shape[0])
    _check_equal_sizes(z)
    return int(z.shape[0]) * rank_and_world()[1]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def batch_sums(z: torch.Tensor, gather: bool) -> Tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """``(reduce, n_total)`` of a loss built from sums over the batch: with ``gather``, sums all-reduced over the
    ranks with gradients and the global batch's rows; otherwise the identity and this batch's rows."""
    if gather:
        return all_reduce_with_grad, global_batch_size(z)
    return _identity, int(z.shape[0])


def feature_stats(x: torch.Tensor, n_total: int, reduce: Callable[[torch.Tensor], torch.Tensor],
                  unbiased: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and variance (biased, or ``unbiased``) of ``x`` over the batch the loss sees: ``reduce``
    sums the local sums over the ranks, with gradients (:func:`all_reduce_with_grad`; the identity for one process).
    Two passes: the mean, then the centred squares."""
    mean = reduce(x.sum(dim=0)) / n_total
    var = reduce((x - mean).pow(2).sum(dim=0)) / (n_total - 1 if unbiased else n_total)
    return mean, var


def global_value(local: torch.Tensor) -> torch.Tensor:
    """The loss a rank returns for its share ``local`` of a global loss ``L = Σ_r local_r`` (the local-rows form
    of a sample-level loss, as OpenCLIP's ``local_loss``).

    Its value is ``L`` itself (``local`` all-reduced, without a gradient: every rank reports the global loss); its
    gradient is that of ``W·local``. The all-gathers' backward sums every rank's column gradients into the rank that
    owns them, so each local input receives ``W·∂L/∂z``, and DDP's averaging over the ``W`` ranks leaves the
    parameters exactly ``∂L/∂θ``: the gradients of one process on the concatenated batch. The identity outside
    torch.distributed.
    """
    if not is_distributed():
        return local
    import torch.distributed as dist

    world = dist.get_world_size()
    total = local.detach().clone()
    dist.all_reduce(total)
    scaled = local * world
    return scaled + (total - scaled).detach()
