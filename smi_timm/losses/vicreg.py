"""VICReg loss (Bardes, Ponce & LeCun, 2022): variance, invariance and covariance terms.

For embeddings ``za``, ``zb`` of shape ``(N, D)``:

- invariance: ``s = mean((za − zb)²)``  (mean squared error over all entries)
- variance: ``v = ½·[mean_j relu(1 − sqrt(Var(za_j) + 1e-4)) + mean_j relu(1 − sqrt(Var(zb_j) + 1e-4))]``
  (unbiased variance over the batch, per feature j)
- covariance: ``c = Σ_{i≠j} C(za)_ij² / D + Σ_{i≠j} C(zb)_ij² / D`` with ``C(z) = (z − z̄)ᵀ(z − z̄)/(N − 1)``

``L = sim_coeff·s + std_coeff·v + cov_coeff·c`` (defaults 25, 25, 1 as in the paper). With ``gather=True`` all terms
use the global batch, as in the official implementation, but from local sums: per-feature sums, the squared error
and each rank's ``(z − z̄)ᵀ(z − z̄)`` are all-reduced with gradients (n×D by D×D products only, ``1/W`` of the global
batch's work; the official code all-gathers both views and repeats the whole computation on every rank). Every rank
returns the global loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import batch_sums, check_embeddings, feature_stats

__all__ = ["VICRegLoss", "vicreg_loss"]


def _off_diagonal_sq_sum(m: torch.Tensor) -> torch.Tensor:
    return m.pow(2).sum() - torch.diagonal(m).pow(2).sum()


def vicreg_loss(za: torch.Tensor, zb: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, gather: bool = False) -> torch.Tensor:
    """Functional VICReg loss; see the module docstring. Returns a float32 scalar."""
    check_embeddings(za, zb, "vicreg_loss")
    reduce, n = batch_sums(za, gather)
    x, y = za.float(), zb.float()
    d = x.shape[1]
    repr_loss = reduce((x - y).pow(2).sum()) / (n * d)
    mean_x, var_x = feature_stats(x, n, reduce, unbiased=True)
    mean_y, var_y = feature_stats(y, n, reduce, unbiased=True)
    x, y = x - mean_x, y - mean_y
    std_x = torch.sqrt(var_x + 1e-4)
    std_y = torch.sqrt(var_y + 1e-4)
    std_loss = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
    cov_x = reduce(x.t() @ x) / (n - 1)
    cov_y = reduce(y.t() @ y) / (n - 1)
    cov_loss = _off_diagonal_sq_sum(cov_x) / d + _off_diagonal_sq_sum(cov_y) / d
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


class VICRegLoss(nn.Module):
    """VICReg: ``sim_coeff·invariance + std_coeff·variance + cov_coeff·covariance`` (see the module docstring).

    Args:
        sim_coeff: weight of the invariance term (mean squared error of the two views). Default 25, as published.
        std_coeff: weight of the variance term (hinge on each feature's standard deviation). Default 25.
        cov_coeff: weight of the covariance term (off-diagonal covariances). Default 1.
        gather: every term over the global batch across ranks, from all-reduced local sums (with gradients).
    """

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0, gather: bool = False):
        super().__init__()
        self.sim_coeff, self.std_coeff, self.cov_coeff = float(sim_coeff), float(std_coeff), float(cov_coeff)
        self.gather = bool(gather)

    def forward(self, za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
        return vicreg_loss(za, zb, self.sim_coeff, self.std_coeff, self.cov_coeff, gather=self.gather)

    def extra_repr(self) -> str:
        return (f"sim_coeff={self.sim_coeff}, std_coeff={self.std_coeff}, cov_coeff={self.cov_coeff}, "
                f"gather={self.gather}")
