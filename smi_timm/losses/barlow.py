"""Barlow Twins loss (Zbontar et al., 2021) — the D×D feature-level baseline.

For embeddings ``za``, ``zb`` of shape ``(N, D)``:

1. per-feature batch standardisation (as ``BatchNorm1d(affine=False)``: biased variance, eps 1e-5)::

       ẑ = (z − mean_batch(z)) / sqrt(var_batch(z) + 1e-5)

2. the D×D cross-correlation ``c = ẑaᵀ · ẑb / N``
3. ``L = Σ_i (1 − c_ii)² + λ·Σ_{i≠j} c_ij²``

With ``gather=True`` the statistics and ``c`` are those of the global batch, computed from local sums: each rank
standardises its rows with the all-reduced per-feature sums and all-reduces its ``ẑaᵀ·ẑb`` (n×D by D×D products
only, ``1/W`` of the global batch's ``N·D²``; one all-reduce of D×D), all with gradients, so the gradients are
exact (the reference implementation all-reduces ``c`` without a gradient path, which under-counts the other ranks'
contribution). Every rank returns the global loss.
"""
from __future__ import annotations

import torch
from torch import nn

from ._common import batch_sums, check_embeddings, feature_stats

__all__ = ["BarlowTwinsLoss", "barlow_twins_loss", "DEFAULT_LAMBD"]

BN_EPS = 1e-5
#: the off-diagonal weight published for an 8192-d projector (Zbontar et al., 2021)
DEFAULT_LAMBD = 0.0051


def _standardize_features(z: torch.Tensor, n_total: int, reduce) -> torch.Tensor:
    z = z.float()
    mean, var = feature_stats(z, n_total, reduce)
    return (z - mean) / torch.sqrt(var + BN_EPS)


def barlow_twins_loss(za: torch.Tensor, zb: torch.Tensor, lambd: float = DEFAULT_LAMBD,
                      gather: bool = False) -> torch.Tensor:
    """Functional Barlow Twins loss; see the module docstring. Returns a float32 scalar."""
    check_embeddings(za, zb, "barlow_twins_loss")
    reduce, n_total = batch_sums(za, gather)
    a, b = _standardize_features(za, n_total, reduce), _standardize_features(zb, n_total, reduce)
    c = reduce(a.t() @ b) / n_total
    diag = torch.diagonal(c)
    on_diag = (1.0 - diag).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return on_diag + lambd * off_diag


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins: ``L = Σ_i (1 − c_ii)² + λ·Σ_{i≠j} c_ij²`` on the D×D cross-correlation of batch-standardised
    embeddings.

    Args:
        lambd: λ, the weight of the off-diagonal (redundancy) term. Default 0.0051, the value published for an
            8192-d projector.
        gather: statistics and ``c`` of the global batch across ranks, from all-reduced local sums (with
            gradients).
    """

    def __init__(self, lambd: float = DEFAULT_LAMBD, gather: bool = False):
        super().__init__()
        self.lambd = float(lambd)
        self.gather = bool(gather)

    def forward(self, za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
        return barlow_twins_loss(za, zb, lambd=self.lambd, gather=self.gather)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}, gather={self.gather}"
