"""SimCLR's NT-Xent loss (Chen et al., 2020) — the sample-level softmax baseline.

For embeddings ``za``, ``zb`` of shape ``(N, D)`` (two views of the same N images):

1. the 2N embeddings ``z = [za; zb]``, each L2-normalised: ``u_k = z_k / ||z_k||``
2. cosine similarities over a temperature ``τ``: ``s_kl = u_k·u_l / τ``
3. for each of the 2N rows k, its positive is the other view of the same image (``p(k) = k ± N``) and its
   negatives are the other 2N − 2 embeddings; the loss is the mean cross-entropy over the 2N rows::

       L = −(1/2N)·Σ_k log( exp(s_k,p(k)) / Σ_{l≠k} exp(s_kl) )

Like SMI it works on a sample-level matrix (of cosine similarities under a softmax instead of a map of Pearson
correlations). Computed in float32. With ``gather=True`` both views are all-gathered with gradients, so every
embedding meets the negatives of the global batch (the parameter gradients after DDP averaging equal those of one
process on the concatenated batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ._common import check_embeddings, gather_with_grad

__all__ = ["SimCLRLoss", "simclr_loss", "DEFAULT_TEMPERATURE"]

#: SimCLR's published temperature for large-batch ImageNet pretraining
DEFAULT_TEMPERATURE = 0.1


def simclr_loss(za: torch.Tensor, zb: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE,
                gather: bool = False) -> torch.Tensor:
    """Functional NT-Xent loss; see the module docstring. Returns a float32 scalar."""
    check_embeddings(za, zb, "simclr_loss")
    if temperature <= 0:
        raise ConfigError(f"simclr_loss: temperature must be > 0, got {temperature}")
    if gather:
        za, zb = gather_with_grad(za), gather_with_grad(zb)
    n = za.shape[0]
    u = F.normalize(torch.cat([za, zb]).float(), dim=1)
    logits = u @ u.t() / temperature
    self_pair = torch.eye(2 * n, dtype=torch.bool, device=u.device)
    logits = logits.masked_fill(self_pair, float("-inf"))
    idx = torch.arange(n, device=u.device)
    targets = torch.cat([idx + n, idx])
    return F.cross_entropy(logits, targets)


class SimCLRLoss(nn.Module):
    """SimCLR's NT-Xent: ``L = −(1/2N)·Σ_k log softmax_{l≠k}(u_k·u_l/τ)_{p(k)}`` over the 2N L2-normalised
    embeddings of both views, the positive ``p(k)`` being the other view of the same image.

    Args:
        temperature: τ. Default 0.1 (SimCLR's ImageNet value); on CIFAR-10 the harness tunes it in
            {0.1, 0.2, 0.5}.
        gather: all-gather both views across ranks (with gradients): negatives from the global batch.

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
