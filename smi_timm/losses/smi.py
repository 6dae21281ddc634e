"""SMI: the Semantic Mutual Information loss on a sample-level dependency matrix.

This is our reading of the SMI objective of arXiv 2606.08332, whose equations are not public; the definition below is
the one this library implements, and every backend computes exactly it.

For two batches of embeddings ``za``, ``zb`` of shape ``(N, D)`` (two augmented views of the same N images):

1. ``a = za.float()``, ``b = zb.float()`` (any floating input dtype; computed in float32)
2. row standardisation over the D features::

       â = (a - mean_row(a)) / sqrt(var_row(a) + 1e-6)     (biased variance), the same for b̂

3. the N×N matrix of Pearson correlations between view-A sample i and view-B sample j::

       ρ = â · b̂ᵀ / D

4. the Gaussian mutual-information map, smoothed by ε (``transform="mi"``)::

       φ(ρ) = ½·log(1 + ε) − ½·log(1 + ε − min(ρ², 1))          (φ(0) = 0, φ grows to ½·log(1 + 1/ε) at |ρ| = 1)

   or the ablation without the nonlinearity (``transform="square"``)::

       φ(ρ) = ½·ρ²

5. positive pairs (the diagonal) are maximised, all other pairs pushed towards independence::

       L = −(1/N)·Σ_i φ(ρ_ii) + neg_weight · (1/(N(N−1)))·Σ_{i≠j} φ(ρ_ij)

Two alternative readings, behind options (the defaults above are the library's definition):

- ``standardize="feature_row"`` (default ``"row"``): before step 2, each feature is standardised over the N samples
  the loss sees (the global batch with ``gather=True``)::

       a ← (a − mean_batch(a)) / sqrt(var_batch(a) + 1e-6)     (biased variance, per feature), the same for b

  then each row is standardised as in step 2; ρ, φ and L are unchanged. The sample-side counterpart of Barlow Twins'
  batch-standardised features: it removes a common mode across samples and unequal feature variances.
- ``negatives="logmeanexp"`` (default ``"mean"``): the independence term in the Donsker–Varadhan form::

       L = −(1/N)·Σ_i φ(ρ_ii) + neg_weight · log( (1/(N(N−1)))·Σ_{i≠j} exp(φ(ρ_ij)) )

  which weights strongly dependent negatives more (to first order at small φ it equals the mean form); computed with
  a max-shifted log-sum-exp in float32.

The fused Triton kernels compute the default reading (``standardize="row"``, ``negatives="mean"``, either
``transform``); the alternatives run on the torch backend (``backend="auto"`` falls back to it with a one-time
warning, ``backend="triton"`` refuses them).

Unlike Barlow Twins (a D×D feature cross-correlation) the matrix is N×N: its cost is O(N²·D) and it needs no
cross-rank synchronisation. With ``gather=False`` (default) each rank computes the loss on its local batch. With
``gather=True`` the loss is that of the global batch of ``N = W·n`` samples, computed by local rows (as OpenCLIP's
``local_loss``): view b is all-gathered with gradients and each rank forms only the ``n × N`` block of ρ of its own
rows, so its cost is ``O(n·N·D)`` (``1/W`` of the full matrix) plus an all-gather of ``N × D`` embeddings and the
all-reduce of one scalar; the reported value is the global loss and the parameter gradients after DDP averaging
equal those of one process on the concatenated batch (:func:`smi_loss_local_rows`).

Backends: ``"torch"`` is the reference (autograd, chunked over rows so that memory stays O(N·D + chunk·N));
``"triton"`` runs the fused kernels of :mod:`smi_timm.kernels`; ``"auto"`` picks Triton for CUDA tensors when
Triton is importable and compiles for the GPU, and the torch path otherwise: it never runs the Triton interpreter
(``TRITON_INTERPRET=1``) on CUDA tensors (:func:`resolve_backend`).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from ._common import (
    VALID_BACKENDS,
    VALID_TRANSFORMS,
    all_reduce_with_grad,
    check_choice,
    check_embeddings,
    feature_stats,
    gather_with_grad,
    global_value,
    is_distributed,
    rank_and_world,
)

__all__ = ["SMILoss", "smi_loss", "smi_loss_reference", "standardize_rows", "standardize_features",
           "dependency_matrix", "phi", "resolve_backend", "is_fused", "DEFAULT_NEG_WEIGHT", "DEFAULT_EPS",
           "VALID_STANDARDIZE", "VALID_NEGATIVES"]

# Library defaults of the two hyper-parameters, chosen by the neg_weight x eps sweep of the comparison harness on a
# validation split of CIFAR-10 training images (docs/RESULTS.md, "SMI defaults"). They are tuning values, not part
# of the definition above; every function takes them as arguments.
DEFAULT_NEG_WEIGHT = 64.0
DEFAULT_EPS = 1e-3

ROW_STD_EPS = 1e-6
FEATURE_STD_EPS = 1e-6

#: ``standardize``: rows over their features (the definition) or, first, features over the batch, then rows
VALID_STANDARDIZE = ("row", "feature_row")
#: ``negatives``: mean of the off-diagonal φ (the definition) or its log-mean-exp (Donsker–Varadhan form)
VALID_NEGATIVES = ("mean", "logmeanexp")
# Default row-chunk: keep one ρ chunk at most 2^24 float32 entries (64 MiB).
_MAX_CHUNK_ELEMENTS = 1 << 24


def standardize_rows(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standardise each row over its features: (x − mean) / sqrt(biased var + 1e-6), computed in ``dtype``."""
    x = x.to(dtype)
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + ROW_STD_EPS)


def standardize_features(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standardise each feature (column) over the batch: (x − mean) / sqrt(biased var + 1e-6), in ``dtype``."""
    x = x.to(dtype)
    mean = x.mean(dim=0, keepdim=True)
    var = x.var(dim=0, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + FEATURE_STD_EPS)


def standardize_view(x: torch.Tensor, how: str = "row", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The loss's standardisation of one view: ``"row"`` (rows over features) or ``"feature_row"`` (features over
    the batch, then rows over features)."""
    if how == "feature_row":
        return standardize_rows(standardize_features(x, dtype), dtype)
    check_choice(how, VALID_STANDARDIZE, "standardize")
    return standardize_rows(x, dtype)


def is_fused(standardize: str = "row", negatives: str = "mean") -> bool:
    """Whether the fused Triton kernels compute this reading (the default one: rows standardised, mean negatives)."""
    return standardize == "row" and negatives == "mean"


def phi(rho: torch.Tensor, eps: float = DEFAULT_EPS, transform: str = "mi") -> torch.Tensor:
    """The dependency map φ(ρ) applied elementwise (see the module docstring)."""
    if check_choice(transform, VALID_TRANSFORMS, "transform") == "square":
        return 0.5 * rho * rho
    # ½·log(1+ε) − ½·log(1+ε−min(ρ²,1)), written with log1p for accuracy near ρ = 0.
    return 0.5 * (math.log1p(eps) - torch.log1p(eps - torch.clamp(rho * rho, max=1.0)))


def dependency_matrix(za: torch.Tensor, zb: torch.Tensor, eps: float = DEFAULT_EPS,
                      transform: str = "mi", standardize: str = "row") -> torch.Tensor:
    """The full N×N dependency matrix φ(ρ) (for analysis and plots; the loss never needs it whole)."""
    check_embeddings(za, zb, "dependency_matrix")
    a, b = _standardize_pair(za, zb, standardize)
    return phi(a @ b.t() / a.shape[1], eps, transform)


def _standardize_pair(za, zb, how: str, dtype: torch.dtype = torch.float32):
    return standardize_view(za, how, dtype), standardize_view(zb, how, dtype)


def _chunk_terms(a_chunk: torch.Tensor, b: torch.Tensor, row0: torch.Tensor, eps: float, transform: str,
                 logmeanexp: bool):
    """For rows [row0, row0 + chunk) of ρ: (Σ φ over the chunk, Σ φ over the chunk's diagonal entries, and with
    ``logmeanexp`` the log-sum-exp of φ over the chunk's off-diagonal entries, else 0)."""
    d = a_chunk.shape[1]
    rho = a_chunk @ b.t() / d
    dep = phi(rho, eps, transform)
    rows = torch.arange(a_chunk.shape[0], device=a_chunk.device)
    cols = rows + row0
    diag = dep[rows, cols]
    if not logmeanexp:
        return dep.sum(), diag.sum(), dep.new_zeros(())
    on_diag = cols.unsqueeze(1) == torch.arange(b.shape[0], device=b.device).unsqueeze(0)
    lse = torch.logsumexp(dep.masked_fill(on_diag, float("-inf")).flatten(), dim=0)
    return dep.sum(), diag.sum(), lse


def _terms(a: torch.Tensor, b: torch.Tensor, diag0: int, eps: float, transform: str, lme: bool,
           chunk_size: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Σ φ, Σ φ of the positives, log-sum-exp of φ over the negatives)`` of the rows ``a`` (M, D) against the
    columns ``b`` (N, D), both standardised, row ``i``'s positive being column ``diag0 + i``; chunked over rows (each
    chunk recomputed in the backward when there is more than one)."""
    m, n = a.shape[0], b.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _MAX_CHUNK_ELEMENTS // n)
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    if chunk_size >= m:
        return _chunk_terms(a, b, torch.tensor(diag0), eps, transform, lme)
    parts = [checkpoint(_chunk_terms, a[start:start + chunk_size], b, torch.tensor(diag0 + start, device=a.device),
                        eps, transform, lme, use_reentrant=False) for start in range(0, m, chunk_size)]
    total, diag, lse = (torch.stack(p) for p in zip(*parts))
    return total.sum(), diag.sum(), torch.logsumexp(lse, dim=0)


def smi_loss_reference(za: torch.Tensor, zb: torch.Tensor, neg_weight: float = DEFAULT_NEG_WEIGHT,
                       eps: float = DEFAULT_EPS, transform: str = "mi", chunk_size: Optional[int] = None,
                       compute_dtype: torch.dtype = torch.float32, standardize: str = "row",
                       negatives: str = "mean") -> torch.Tensor:
    """The SMI loss in plain PyTorch (autograd), chunked over rows of ρ; every reading (``standardize``,
    ``negatives``, ``transform``) of the module docstring.

    ``chunk_size`` rows of ρ are formed at a time; when there is more than one chunk each is recomputed in the
    backward pass (activation checkpointing), so that peak extra memory is O(N·D + chunk_size·N) instead of O(N²).
    ``None`` picks the largest chunk with at most 2^24 entries (one chunk, no recomputation, for N ≤ 4096).
    ``compute_dtype`` is float32 by definition of the loss; float64 exists for gradient checks in tests.
    """
    check_embeddings(za, zb, "smi_loss")
    check_choice(transform, VALID_TRANSFORMS, "transform")
    check_choice(standardize, VALID_STANDARDIZE, "standardize")
    lme = check_choice(negatives, VALID_NEGATIVES, "negatives") == "logmeanexp"
    n = za.shape[0]
    a, b = _standardize_pair(za, zb, standardize, compute_dtype)
    total, diag, lse = _terms(a, b, 0, eps, transform, lme, chunk_size)
    if lme:
        return -diag / n + neg_weight * (lse - math.log(n * (n - 1)))
    return -diag / n + neg_weight * (total - diag) / (n * (n - 1))


def smi_loss_local_rows(za: torch.Tensor, zb: torch.Tensor, neg_weight: float = DEFAULT_NEG_WEIGHT,
                        eps: float = DEFAULT_EPS, transform: str = "mi", chunk_size: Optional[int] = None,
                        standardize: str = "row", negatives: str = "mean") -> torch.Tensor:
    """The SMI loss of the global batch, ``gather=True``, computed by its local rows (torch backend).

    This rank's ``n`` rows of view a meet the ``N = W·n`` all-gathered rows of view b: the ``n × N`` block of ρ,
    never the ``N × N`` matrix (no product larger than ``n × D`` by ``D × N``, forward or backward). The rank's
    share of the loss is ``−(1/N)·Σ_{i mine} φ(ρ_ii) + w/(N(N−1))·Σ_{i mine, j≠i} φ(ρ_ij)`` (with
    ``negatives="logmeanexp"``: the log-sum-exps of the blocks are all-gathered and combined); with
    ``standardize="feature_row"`` the feature statistics are those of the global batch (view a's all-reduced, view
    b's from its gathered rows), with gradients. :func:`~smi_timm.losses._common.global_value` makes the value the
    global loss and the parameter gradients, after DDP's averaging, those of one process on the concatenated batch.
    """
    rank, world = rank_and_world()
    n = za.shape[0]
    n_total = n * world
    lme = negatives == "logmeanexp"
    zb_all = gather_with_grad(zb)
    a = za.float()
    if standardize == "feature_row":
        mean, var = feature_stats(a, n_total, all_reduce_with_grad)
        a = (a - mean) / torch.sqrt(var + FEATURE_STD_EPS)
    a = standardize_rows(a)
    b = standardize_view(zb_all, standardize)  # the gathered rows are the global batch: their own statistics
    total, diag, lse = _terms(a, b, rank * n, eps, transform, lme, chunk_size)
    if lme:
        lse_all = gather_with_grad(lse.reshape(1))
        negative = (neg_weight / world) * (torch.logsumexp(lse_all, dim=0) - math.log(n_total * (n_total - 1)))
    else:
        negative = neg_weight * (total - diag) / (n_total * (n_total - 1))
    return global_value(-diag / n_total + negative)


def _load_kernels():
    """Import :mod:`smi_timm.kernels` (Triton), also from a source checkout that was not pip-installed.

    The kernels live in the top-level folder ``kernels/``; an install maps it to ``smi_timm.kernels``. In a plain
    clone (e.g. ``torch.hub.load(..., source='local')``) the mapping does not exist, so the folder next to the
    package is loaded under the same name.
    """
    try:
        return importlib.import_module("smi_timm.kernels")
    except ModuleNotFoundError as err:
        if err.name not in ("smi_timm.kernels",):
            raise
    folder = Path(__file__).resolve().parents[2] / "kernels"
    init = folder / "__init__.py"
    if not init.is_file():
        raise ConfigError(
            "smi_timm.kernels is not installed; install the package (pip install smi-timm) or use backend='torch'"
        )
    spec = importlib.util.spec_from_file_location("smi_timm.kernels", init, submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["smi_timm.kernels"] = module
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreter_active() -> bool:
    """Whether the fused kernels run (or would run, once imported) under the Triton interpreter."""
    loaded = sys.modules.get("smi_timm.kernels")
    if loaded is not None and hasattr(loaded, "INTERPRET"):
        return bool(loaded.INTERPRET)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str, device) -> str:
    """The backend :func:`smi_loss` runs for embeddings on ``device`` (``"torch"`` or ``"triton"``).

    ``"auto"``: the fused Triton kernels for CUDA tensors when Triton is importable and compiles for the GPU, the torch
    reference otherwise; with ``TRITON_INTERPRET=1`` (a debugging mode that runs the kernels on the CPU, slowly)
    ``"auto"`` takes the torch path on CUDA tensors instead of interpreting. ``"triton"`` on CPU tensors needs that
    interpreter (tests); on CUDA it always runs the kernels (interpreted if the interpreter was asked for).
    """
    check_choice(backend, VALID_BACKENDS, "backend")
    device = torch.device(device)
    has_triton = _has_triton()
    if backend == "auto":
        return "triton" if device.type == "cuda" and has_triton and not _interpreter_active() else "torch"
    if backend == "triton" and not (has_triton and (device.type == "cuda" or _interpreter_active())):
        raise ConfigError(
            "backend='triton' needs CUDA tensors and Triton installed (or, for testing on CPU, TRITON_INTERPRET=1 "
            "set before smi_timm.kernels is imported); use backend='torch' or 'auto' otherwise"
        )
    return backend


_WARNED_UNFUSED = set()


def _refuse_unfused(standardize: str, negatives: str) -> None:
    raise ConfigError(f"backend='triton' fuses only standardize='row', negatives='mean'; standardize={standardize!r}, "
                     f"negatives={negatives!r} runs on the torch reference: use backend='torch' (or 'auto', which "
                     f"falls back to it)")


def effective_backend(backend: str, device, standardize: str = "row", negatives: str = "mean") -> str:
    """The backend that runs this reading on ``device``: :func:`resolve_backend`, except that a reading the fused
    kernels do not compute (:func:`is_fused`) runs on torch: ``backend="auto"`` falls back with a one-time
    warning, ``backend="triton"`` raises."""
    resolved = resolve_backend(backend, device)
    if resolved != "triton" or is_fused(standardize, negatives):
        return resolved
    if backend == "triton":
        _refuse_unfused(standardize, negatives)
    what = f"standardize={standardize!r}, negatives={negatives!r}"
    if what not in _WARNED_UNFUSED:
        _WARNED_UNFUSED.add(what)
        warnings.warn(f"SMI loss: the fused Triton kernels do not compute {what}; using the torch reference "
                      f"(backend='torch' silences this warning)", stacklevel=3)
    return "torch"


def smi_loss(za: torch.Tensor, zb: torch.Tensor, neg_weight: float = DEFAULT_NEG_WEIGHT, eps: float = DEFAULT_EPS,
             transform: str = "mi", gather: bool = False, backend: str = "auto",
             chunk_size: Optional[int] = None, allow_tf32: bool = False, standardize: str = "row",
             negatives: str = "mean") -> torch.Tensor:
    """Functional SMI loss; see :class:`SMILoss` and the module docstring for the formula. Returns a float32 scalar."""
    check_choice(transform, VALID_TRANSFORMS, "transform")
    check_choice(backend, VALID_BACKENDS, "backend")
    check_choice(standardize, VALID_STANDARDIZE, "standardize")
    check_choice(negatives, VALID_NEGATIVES, "negatives")
    check_embeddings(za, zb, "smi_loss")
    if eps <= 0 and transform == "mi":
        raise ConfigError(f"eps must be > 0 for transform='mi' (φ is unbounded at |ρ| = 1 otherwise), got {eps}")
    if gather and is_distributed():  # local rows against the gathered columns: 1/W of the full matrix per rank
        if effective_backend(backend, za.device, standardize, negatives) == "triton":
            rank, _ = rank_and_world()
            local = _load_kernels().smi_loss_triton(za, gather_with_grad(zb), neg_weight=neg_weight, eps=eps,
                                                    transform=transform, allow_tf32=allow_tf32,
                                                    row0=rank * za.shape[0])
            return global_value(local)
        return smi_loss_local_rows(za, zb, neg_weight=neg_weight, eps=eps, transform=transform,
                                   chunk_size=chunk_size, standardize=standardize, negatives=negatives)
    if effective_backend(backend, za.device, standardize, negatives) == "triton":
        kernels = _load_kernels()
        return kernels.smi_loss_triton(za, zb, neg_weight=neg_weight, eps=eps, transform=transform,
                                       allow_tf32=allow_tf32)
    return smi_loss_reference(za, zb, neg_weight=neg_weight, eps=eps, transform=transform, chunk_size=chunk_size,
                              standardize=standardize, negatives=negatives)


class SMILoss(nn.Module):
    """Semantic Mutual Information loss (our reading of arXiv 2606.08332).

    ``L = −(1/N)·Σ_i φ(ρ_ii) + neg_weight·(1/(N(N−1)))·Σ_{i≠j} φ(ρ_ij)`` with ``ρ = â·b̂ᵀ/D`` the N×N matrix of
    Pearson correlations between the row-standardised embeddings of the two views and
    ``φ(ρ) = ½·log(1+ε) − ½·log(1+ε−min(ρ², 1))`` (``transform="mi"``) or ``½·ρ²`` (``transform="square"``).

    Args:
        neg_weight: weight of the mean off-diagonal dependency (the independence term). Default 64, the best of
            {1, 4, 16, 64, 256} in the CIFAR-10 sweep of docs/RESULTS.md (ResNet-18, 1024-d projector, batch 128).
        eps: smoothing ε of the Gaussian MI map; bounds φ by ½·log(1+1/ε). Default 1e-3, from the same sweep.
        transform: ``"mi"`` (default) or ``"square"`` (ablation).
        standardize: ``"row"`` (default: each row over its D features) or ``"feature_row"`` (first each feature
            over the batch, then each row; an alternative reading, torch backend).
        negatives: ``"mean"`` (default: mean off-diagonal φ) or ``"logmeanexp"`` (``log`` of the mean of
            ``exp(φ)``: the Donsker–Varadhan form, an alternative reading, torch backend).
        gather: the loss of the global batch (``N = W·n`` samples over ``W`` ranks), computed by local rows: view b
            is all-gathered with gradients and each rank forms the ``n × N`` block of its own rows (``1/W`` of the
            full matrix's work); same value and DDP-averaged gradients as one process on the concatenated batch.
        backend: ``"auto"`` (Triton on CUDA, torch otherwise; see :func:`resolve_backend`), ``"torch"`` or
            ``"triton"``.
        chunk_size: rows of ρ per chunk for the torch backend (``None``: automatic, one chunk up to N = 4096).
        allow_tf32: Triton backend, fp32 embeddings: let its matrix products use TF32 tensor cores. Off by default
            (fp32 is computed exactly, whatever torch's matmul precision setting); the torch backend follows
            torch's own TF32 settings.

    Shapes: ``za``, ``zb``: ``(N, D)`` floating tensors, N ≥ 2, D ≥ 2. Output: float32 scalar.
    """

    #: settings that change how the loss is computed, not its value (not recorded as part of its definition)
    implementation_args = ("backend", "chunk_size", "allow_tf32")

    def __init__(self, neg_weight: float = DEFAULT_NEG_WEIGHT, eps: float = DEFAULT_EPS, transform: str = "mi",
                 gather: bool = False, backend: str = "auto", chunk_size: Optional[int] = None,
                 allow_tf32: bool = False, standardize: str = "row", negatives: str = "mean"):
        super().__init__()
        self.neg_weight = float(neg_weight)
        self.eps = float(eps)
        self.transform = check_choice(transform, VALID_TRANSFORMS, "transform")
        self.standardize = check_choice(standardize, VALID_STANDARDIZE, "standardize")
        self.negatives = check_choice(negatives, VALID_NEGATIVES, "negatives")
        self.gather = bool(gather)
        self.backend = check_choice(backend, VALID_BACKENDS, "backend")
        self.chunk_size = chunk_size
        self.allow_tf32 = bool(allow_tf32)
        if self.transform == "mi" and self.eps <= 0:
            raise ConfigError(f"eps must be > 0 for transform='mi', got {eps}")
        if self.backend == "triton" and not is_fused(self.standardize, self.negatives):
            _refuse_unfused(self.standardize, self.negatives)

    def forward(self, za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
        return smi_loss(za, zb, neg_weight=self.neg_weight, eps=self.eps, transform=self.transform,
                        gather=self.gather, backend=self.backend, chunk_size=self.chunk_size,
                        allow_tf32=self.allow_tf32, standardize=self.standardize, negatives=self.negatives)

    def precompile(self, n: int, d: int, dtype: torch.dtype, device) -> float:
        """Compile, ahead of the first step, the kernels this loss will launch for a (n, d) batch of ``dtype`` on
        ``device`` (``n``: the batch the loss sees, i.e. the global one with ``gather=True``); returns the seconds
        it took, 0.0 when the torch backend will run. See :func:`smi_timm.kernels.precompile`."""
        if effective_backend(self.backend, device, self.standardize, self.negatives) != "triton":
            return 0.0
        return _load_kernels().precompile(n, d, dtype, device, neg_weight=self.neg_weight, eps=self.eps,
                                          transform=self.transform, allow_tf32=self.allow_tf32)

    def extra_repr(self) -> str:
        tf32 = ", allow_tf32=True" if self.allow_tf32 else ""
        reading = "".join(f", {k}={getattr(self, k)!r}" for k, default in (("standardize", "row"),
                                                                          ("negatives", "mean"))
                          if getattr(self, k) != default)
        return (f"neg_weight={self.neg_weight}, eps={self.eps}, transform={self.transform!r}{reading}, "
                f"gather={self.gather}, backend={self.backend!r}{tf32}")
