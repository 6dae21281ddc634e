"""SimCLR's NT-Xent loss (Chen et al., 2020) — the sample-level softmax baseline.

For embeddings ``za``, ``zb`` of shape ``(N, D)`` (two views of the same N images):

1. the 2N embeddings ``z = [za; zb]``, each L2-normalised: ``u_k = z_k / ||z_k||``
2. cosine similarities over a temperature ``τ``: ``s_kl = u_k·u_l / τ``
3. for each of the 2N rows k, its positive is the other view of the same image (``p(k) = k ± N``) and its
   negatives are the other 2N − 2 embeddings; the loss is the mean cross-entropy over the 2N rows::

       L = −(1/2N)·Σ_k log( exp(s_k,p(k)) / Σ_{l≠k} exp(s_kl) )

Like SMI it works on a sample-level matrix (of cosine similarities under a softmax instead of a map of Pearson
correlations). Computed in float32. With ``gather=True`` the loss is that of the global batch, computed by local rows
(OpenCLIP's ``local_loss``): both views are all-gathered with gradients and each rank forms only the ``2n × 2N`` logits
of its own rows (four ``n × D`` by ``D × N`` products), so every embedding meets the negatives of the global batch
at ``1/W`` of the full matrix's work per rank; the value is the global loss and the parameter gradients after DDP
averaging equal those of one process on the concatenated batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ._common import check_embeddings, gather_with_grad, global_value, is_distributed, rank_and_world

__all__ = ["SimCLRLoss", "simclr_loss", "DEFAULT_TEMPERATURE"]

#: SimCLR's published temperature for large-batch ImageNet pretraining
DEFAULT_TEMPERATURE = 0.1


def simclr_loss(za: torch.Tensor, zb: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE,
                gather: bool = False) -> torch.Tensor:
    """Functional NT-Xent loss; see the module docstring. Returns a float32 scalar."""
    check_embeddings(za, zb, "simclr_loss")
    if temperature <= 0:
        raise ConfigError(f"simclr_loss: temperature must be > 0, got {temperature}")
    if gather and is_distributed():
        return _local_rows(za, zb, temperature)
    n = za.shape[0]
    u = F.normalize(torch.cat([za, zb]).float(), dim=1)
    logits = u @ u.t() / temperature
    self_pair = torch.eye(2 * n, dtype=torch.bool, device=u.device)
    logits = logits.masked_fill(self_pair, float("-inf"))
    idx = torch.arange(n, device=u.device)
    targets = torch.cat([idx + n, idx])
    return F.cross_entropy(logits, targets)


def _local_rows(za: torch.Tensor, zb: torch.Tensor, temperature: float) -> torch.Tensor:
    """The global-batch NT-Xent by this rank's ``2n`` rows against all ``2N`` gathered columns."""
    rank, world = rank_and_world()
    n = za.shape[0]
    n_total = n * world
    ua, ub = F.normalize(za.float(), dim=1), F.normalize(zb.float(), dim=1)
    ua_all, ub_all = gather_with_grad(ua), gather_with_grad(ub)
    mine = torch.arange(n, device=ua.device)
    me = rank * n + mine  # global index of my rows within each view
    total = ua.new_zeros(())
    for rows, self_col, pos_col in ((ua, me, n_total + me), (ub, n_total + me, me)):
        logits = torch.cat([rows @ ua_all.t(), rows @ ub_all.t()], dim=1) / temperature
        logits = logits.masked_fill(torch.nn.functional.one_hot(self_col, 2 * n_total).bool(), float("-inf"))
        total = total + F.cross_entropy(logits, pos_col, reduction="sum")
    return global_value(total / (2 * n_total))


class SimCLRLoss(nn.Module):
    """SimCLR's NT-Xent: ``L = −(1/2N)·Σ_k log softmax_{l≠k}(u_k·u_l/τ)_{p(k)}`` over the 2N L2-normalised
    embeddings of both views, the positive ``p(k)`` being the other view of the same image.

    Args:
        temperature: τ. Default 0.1 (SimCLR's ImageNet value); on CIFAR-10 the harness tunes it in
            {0.1, 0.2, 0.5}.
        gather: the loss of the global batch (negatives from every rank), by local rows: ``1/W`` of the full
            matrix's work per rank, same value and DDP-averaged gradients as one process on the concatenated batch.

    Shapes: ``za``, ``zb``: ``(N, D)`` floating tensors, N ≥ 2, D ≥ 2. Output: float32 scalar.
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, gather: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"SimCLRLoss: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.gather = bool(gather)

    def forward(self, za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
        return simclr_loss(za, zb, temperature=self.temperature, gather=self.gather)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather={self.gather}"
