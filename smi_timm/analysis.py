"""Representation diagnostics of a backbone (+ projector), as PNG plots and one JSON (``smi-analyze``).

For ``--weights`` (``random`` with ``--model``, an export folder, a run directory or checkpoint) on ``--data`` (an
eval split: WebDataset shards or an ImageFolder dir) it computes, on ``--num-samples`` images:

* **spectrum** — eigenvalues of the covariance of the features (and of the projector embeddings), normalised to
  sum 1, with two effective ranks: ``effective_rank`` = exp(entropy of the normalised covariance eigenvalues)
  (Roy & Vetterli, 2007) and ``rankme`` = exp(entropy of the normalised singular values of the embedding matrix)
  (RankMe, Garrido et al., 2023);
* **alignment** E||f(x) - f(x')||^2 of two views and **uniformity** log E exp(-2 ||f(x) - f(y)||^2) over pairs of
  images, both on L2-normalised outputs (Wang & Isola, 2020); **alignment_centered**, the same alignment after
  subtracting the batch mean of the features (a common mode shared by every image makes two views look aligned
  without telling images apart), and **cross_view_corr**, the mean over features of the Pearson correlation of one
  feature between the two views across the batch (the diagonal of Barlow Twins' cross-correlation matrix). The two
  views come from the SSL loader
  ``smi_timm.data.make_ssl_loader(..., augment=--augment)`` for shards, and from a random resized crop (scale 0.5-1)
  + horizontal flip of each image for an ImageFolder dir (or ``--views crop-flip``); ``views`` in the JSON says which;
* **redundancy** — mean absolute off-diagonal entry of the feature correlation matrix;
* **dependency** — the N x N matrix phi(rho) of :func:`smi_timm.losses.smi.dependency_matrix` between the two views of
  one batch (a heat map: a bright diagonal = matched pairs, dark elsewhere);
* **training curves** (loss, lr, knn_top1 against step) from ``RUN_DIR/metrics.jsonl`` when a run is given
  (``--run``, or ``--weights RUN_DIR``; read and plotted by :mod:`smi_timm.curves`). ``--curves-only`` skips
  everything else.

The pieces: :func:`run_curves` (curves), :func:`two_views` (views), :func:`representation_metrics` (metrics),
:func:`plot_diagnostics` (plots); :func:`analyze` runs them.

Outputs in ``--out-dir``: ``analysis.json``, ``summary.png`` (all panels), ``spectrum.png``, ``correlation.png``,
``dependency.png`` and ``curves.png`` (with a run).

``--spatial`` measures spatial localisation instead (:mod:`smi_timm.spatial`): for one or more ``--weights``
(``--label`` names them) on the same images of ``--data`` at ``--image-size``, the activation-norm map and the
cosine-to-pooled map of the last feature map (ResNet stages or ViT patch tokens), overlaid on the first
``--num-images`` images in ``spatial.png``, and their concentration over ``--num-samples`` images (share of mass in
the top ``--top-frac`` of locations, normalised spatial entropy) in ``spatial.json``::

    smi-analyze --spatial --weights runs/smi/export --label SMI --weights runs/barlow/export --label "Barlow Twins" \
        --weights random --model resnet18 --label "random init" \
        --data ../shared/data/flowers12/test-000000.tar --image-size 128 --out-dir spatial
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .curves import plot_curves, read_metrics, save_figure, summarize_curves
from .data import make_ssl_loader
from .errors import ConfigError, NotFoundError
from .eval import features
from .eval.features import extract_features, is_data_spec
from .layout import METRICS, write_json_atomic
from .losses.smi import dependency_matrix
from .models.ssl import parse_projector
from .resolve import BackboneSource, resolve_backbone

__all__ = ["analyze", "measure", "Measurement", "effective_rank", "rankme", "alignment", "uniformity",
           "alignment_centered", "cross_view_corr", "redundancy", "covariance_spectrum", "representation_metrics",
           "two_view_pair", "two_views",
           "plot_diagnostics", "run_curves"]


# ---------------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------------

def _entropy_rank(values: torch.Tensor, eps: float = 1e-12) -> float:
    values = values.double().clamp_min(0)
    p = values / values.sum().clamp_min(eps)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def covariance_spectrum(z: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (descending) of the covariance of ``z`` (N, D), normalised to sum 1."""
    z = z.double()
    z = z - z.mean(dim=0, keepdim=True)
    eig = torch.linalg.svdvals(z).pow(2) / max(z.shape[0] - 1, 1)
    return (eig / eig.sum().clamp_min(1e-30)).float()


def effective_rank(z: torch.Tensor) -> float:
    """exp(entropy) of the normalised covariance eigenvalues of ``z`` (N, D); between 1 and min(N-1, D)."""
    return _entropy_rank(covariance_spectrum(z))


def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., 2023): exp(entropy) of ``sigma / ||sigma||_1 + eps`` for the singular values of ``z``."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum().clamp_min(1e-30) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def alignment(za: torch.Tensor, zb: torch.Tensor, alpha: float = 2.0) -> float:
    """E ||f(x) - f(x')||^alpha over positive pairs, on L2-normalised outputs (Wang & Isola, 2020). 0 = identical."""
    a, b = F.normalize(za.float(), dim=1), F.normalize(zb.float(), dim=1)
    return float((a - b).norm(dim=1).pow(alpha).mean())


def alignment_centered(za: torch.Tensor, zb: torch.Tensor, alpha: float = 2.0) -> float:
    """:func:`alignment` after subtracting the batch mean of the features (one mean over both views' 2N rows)
    before L2 normalisation: a common mode shared by every image no longer counts as alignment."""
    mean = torch.cat([za, zb]).double().mean(dim=0, keepdim=True)
    return alignment(za.double() - mean, zb.double() - mean, alpha)


def cross_view_corr(za: torch.Tensor, zb: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean over features j of the Pearson correlation of ``za[:, j]`` and ``zb[:, j]`` over the batch: the diagonal
    of Barlow Twins' cross-correlation matrix. 1 = every feature takes the same value on both views of each image.
    Features constant over the batch in either view (dead units) have no correlation and are left out; NaN when
    every feature is constant."""
    a, b = za.double(), zb.double()
    a, b = a - a.mean(dim=0), b - b.mean(dim=0)
    sa, sb = a.norm(dim=0), b.norm(dim=0)
    live = (sa > eps) & (sb > eps)
    if not bool(live.any()):
        return float("nan")
    corr = (a * b).sum(dim=0)[live] / (sa[live] * sb[live])
    return float(corr.mean())


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    """log E exp(-t ||f(x) - f(y)||^2) over distinct pairs, on L2-normalised outputs. Lower = more uniform."""
    u = F.normalize(z.double(), dim=1)
    sq = torch.pdist(u, p=2).pow(2)
    return float(torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel()))


def _corr(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    z = z - z.mean(dim=0, keepdim=True)
    z = z / z.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return (z.T @ z).float()


def redundancy(z: torch.Tensor) -> float:
    """Mean |corr_ij| over i != j of the feature correlation matrix of ``z`` (N, D). 0 = decorrelated features."""
    c = _corr(z)
    d = c.shape[0]
    if d < 2:
        return 0.0
    return float((c.abs().sum() - c.diagonal().abs().sum()) / (d * (d - 1)))


def representation_metrics(z: torch.Tensor, za: torch.Tensor, zb: torch.Tensor,
                           heatmap_size: int = 64) -> Tuple[Dict[str, Any], Dict[str, Any], torch.Tensor]:
    """``(metrics, spectrum, dependency matrix)`` of one representation: ``z`` (N, D) of clean images, ``za``/``zb``
    of the two views of the same images (alignment, uniformity and the dependency matrix of the first
    ``heatmap_size`` pairs)."""

    eig = covariance_spectrum(z)
    spectrum = {"dim": int(z.shape[1]), "effective_rank": _entropy_rank(eig), "rankme": rankme(z),
                "eigenvalues": [float(f"{v:.6g}") for v in eig.tolist()]}
    h = min(heatmap_size, za.shape[0])
    dep = dependency_matrix(za[:h], zb[:h])
    eye = torch.eye(h, dtype=torch.bool)
    metrics = {
        "dim": int(z.shape[1]),
        "effective_rank": spectrum["effective_rank"],
        "rankme": spectrum["rankme"],
        "alignment": alignment(za, zb),
        "alignment_centered": alignment_centered(za, zb),
        "cross_view_corr": cross_view_corr(za, zb),
        "uniformity": uniformity(za),
        "redundancy": redundancy(z),
        "dependency_diag_mean": float(dep[eye].mean()),
        "dependency_offdiag_mean": float(dep[~eye].mean()) if h > 1 else None,
    }
    return metrics, spectrum, dep


# ---------------------------------------------------------------------------------------------------------------------
# two views
# ---------------------------------------------------------------------------------------------------------------------

ViewBatches = List[Tuple[torch.Tensor, torch.Tensor]]


def two_view_pair(images: torch.Tensor, generator: Optional[torch.Generator] = None,
                  scale: Tuple[float, float] = (0.5, 1.0)) -> Tuple[torch.Tensor, torch.Tensor]:
    """Crop-and-flip views of a normalised batch (B, C, H, W): per image and view torchvision's random resized crop
    (area ``scale``, aspect 3/4-4/3, bilinear back to H x W) and a horizontal flip with p = 0.5, drawn from
    ``generator`` (the global RNG is left as it was)."""
    from torchvision.transforms import v2

    h, w = images.shape[-2:]
    augment = v2.Compose([v2.RandomResizedCrop((h, w), scale=scale, antialias=True), v2.RandomHorizontalFlip()])
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG
        torch.manual_seed(seed)
        return (torch.stack([augment(img) for img in images]), torch.stack([augment(img) for img in images]))


def _first_samples(pairs: Iterable[Tuple[torch.Tensor, torch.Tensor]], num_samples: int) -> ViewBatches:
    out, n = [], 0
    for va, vb in pairs:
        out.append((va, vb))
        n += va.shape[0]
        if n >= num_samples:
            break
    return out


def two_views(data: Any, info: Dict[str, Any], *, views: str = "auto", augment: str = "cifar",
              num_samples: int = 1024, batch_size: int = 256, workers: int = 2,
              seed: int = 0) -> Tuple[ViewBatches, str]:
    """Batches of two views of the first ``num_samples`` images of ``data``, and how they were made.

    ``views``: ``"ssl"`` = the pretraining loader (:func:`smi_timm.data.make_ssl_loader` with ``augment``; shards
    only), ``"crop-flip"`` = :func:`two_view_pair` of the eval loader's images, ``"auto"`` = ``ssl`` for shards and
    ``crop-flip`` for an ImageFolder dir or an iterable of batches.
    """

    if views == "auto":
        shards = features.is_data_spec(data) and not os.path.isdir(features.data_list(data)[0])
        views = "ssl" if shards else "crop-flip"
    size = info["image_size"]
    if views == "ssl":

        loader = make_ssl_loader(features.loader_urls(data), batch_size=batch_size, image_size=size, augment=augment,
                                 num_workers=workers, seed=seed,
                                 epoch_samples=max(num_samples, batch_size))  # we stop after num_samples anyway
        return _first_samples(loader, num_samples), f"ssl loader (augment={augment})"
    if views != "crop-flip":
        raise ConfigError(f"views={views!r}: choose 'auto', 'ssl' or 'crop-flip'")
    gen = torch.Generator().manual_seed(seed)
    loader = features.eval_loader(data, batch_size=batch_size, image_size=size, workers=workers, mean=info["mean"],
                                  std=info["std"], crop_pct=info["crop_pct"])
    pairs = (two_view_pair(images, gen) for images, _ in loader)
    return _first_samples(pairs, num_samples), "random resized crop (scale 0.5-1) + horizontal flip"


# ---------------------------------------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------------------------------------

class _Both(nn.Module):
    """Backbone + projector returning ``cat([features, embeddings])`` so one pass gives both."""

    def __init__(self, backbone: nn.Module, projector: Optional[nn.Module]):
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        if self.projector is None:
            return f
        return torch.cat([f, self.projector(f)], dim=1)


def _embed_views(net: nn.Module, batches: ViewBatches, num_samples: int, device: torch.device,
                 amp: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both views of each batch in one forward pass (view a rows first, then view b)."""

    za, zb = [], []
    for va, vb in batches:
        z, _ = extract_features(net, [(torch.cat([va, vb]), torch.zeros(va.shape[0] * 2))], device=device,
                                amp_dtype=amp, progress=False)
        za.append(z[:va.shape[0]])
        zb.append(z[va.shape[0]:])
    return torch.cat(za)[:num_samples], torch.cat(zb)[:num_samples]


# ---------------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------------

def _plot_spectrum(fig, ax, spectra: Dict[str, Dict[str, Any]]) -> None:
    for name, s in spectra.items():
        vals = torch.tensor(s["eigenvalues"]).clamp_min(1e-12)
        ax.semilogy(range(1, len(vals) + 1), vals.tolist(),
                    label=f"{name} (D={s['dim']}, eff. rank {s['effective_rank']:.1f})")
    ax.set_xlabel("component")
    ax.set_ylabel("normalised eigenvalue")
    ax.set_title("covariance spectrum")
    ax.legend(fontsize=7)


def _plot_corr(fig, ax, corr: torch.Tensor, red: float) -> None:
    d = corr.shape[0]
    off = corr[~torch.eye(d, dtype=torch.bool)].abs()
    ax.hist(off.numpy(), bins=50, color="tab:gray")
    ax.axvline(red, color="tab:red", label=f"mean |r| = {red:.3f}")
    ax.set_xlabel("|correlation| between features (i != j)")
    ax.set_ylabel("pairs")
    ax.set_title("feature redundancy")
    ax.legend(fontsize=7)


def _plot_dep(fig, ax, dep: torch.Tensor, title: str) -> None:
    im = ax.imshow(dep.numpy(), cmap="magma", interpolation="nearest")
    ax.set_xlabel("view b sample")
    ax.set_ylabel("view a sample")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def plot_diagnostics(out_dir: Path, spectra: Dict[str, Dict[str, Any]], features: torch.Tensor, redundancy_: float,
                     dep: torch.Tensor, dep_name: str, title: str, dpi: int = 80) -> None:
    """``summary.png`` (spectrum, feature-correlation histogram, dependency heat map) and one PNG per panel."""
    from matplotlib.figure import Figure


    corr = _corr(features)
    panels = {"spectrum.png": lambda f, ax: _plot_spectrum(f, ax, spectra),
              "correlation.png": lambda f, ax: _plot_corr(f, ax, corr, redundancy_),
              "dependency.png": lambda f, ax: _plot_dep(f, ax, dep, f"dependency phi(rho), {dep_name}")}
    fig = Figure(figsize=(13, 3.6), dpi=dpi)
    axes = fig.subplots(1, 3)
    for ax, draw in zip(axes, panels.values()):
        draw(fig, ax)
    axes[2].set_title(f"dependency phi(rho), {dep_name}, {dep.shape[0]} pairs")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_dir / "summary.png", dpi)
    for name, draw in panels.items():
        fig = Figure(figsize=(5, 4), dpi=dpi)
        draw(fig, fig.subplots())
        fig.tight_layout()
        save_figure(fig, out_dir / name, dpi)


# ---------------------------------------------------------------------------------------------------------------------
# main entry
# ---------------------------------------------------------------------------------------------------------------------

def run_curves(run: os.PathLike, out_dir: Path, dpi: int = 80) -> Dict[str, Any]:
    """Summary of ``RUN/metrics.jsonl`` (with the number of unreadable lines skipped); plots ``curves.png``."""

    metrics = Path(run) / METRICS
    if not metrics.is_file():
        raise NotFoundError(f"{metrics} does not exist; --run must be a run directory written by smi-pretrain")
    rows, bad = read_metrics(metrics)
    plot_curves(rows, out_dir / "curves.png", dpi=dpi)
    return dict(summarize_curves(rows), skipped_lines=bad)


@dataclass
class Measurement:
    """What :func:`measure` computed for one backbone (+ projector) on one data set."""

    info: Dict[str, Any]                  #: :meth:`ResolvedBackbone.describe` of the backbone
    metrics: Dict[str, Dict[str, Any]]    #: ``features`` (and ``embeddings`` with a projector) -> metrics
    spectra: Dict[str, Dict[str, Any]]
    dependency: Dict[str, torch.Tensor]   #: the dependency heat map of each representation
    features: torch.Tensor                #: clean backbone features ``(num_samples, D)``
    views: str                            #: how the two views were made
    projector: Optional[str]              #: projector widths (``"1024-1024"``) or None
    projector_weights: Optional[str]      #: ``"loaded"`` / ``"random"`` / None

    def summary(self) -> Dict[str, Any]:
        """The JSON-ready part: the metrics of each representation, with what they were measured on."""
        return dict(model=self.info["model"], cifar_stem=self.info["cifar_stem"], weights=self.info["weights"],
                    weights_sha256=self.info["weights_sha256"], projector=self.projector,
                    projector_weights=self.projector_weights, image_size=self.info["image_size"],
                    num_samples=int(self.features.shape[0]), views=self.views, metrics=self.metrics)


def measure(weights: Union[str, BackboneSource], data: Any, *, model: Optional[str] = None, cifar_stem: bool = False,
            projector: Optional[str] = None, image_size: Optional[int] = None,
            timm_kwargs: Optional[Dict[str, Any]] = None, num_samples: int = 1024, batch_size: int = 256,
            heatmap_size: int = 64, augment: str = "cifar", views: str = "auto", workers: int = 2,
            device: Optional[str] = None, seed: int = 0, amp: str = "no", progress: bool = False) -> Measurement:
    """Representation metrics (spectrum, effective rank, RankMe, alignment, uniformity, redundancy, dependency) of
    ``weights`` (any source :func:`smi_timm.resolve.resolve_backbone` accepts, or a
    :class:`~smi_timm.resolve.BackboneSource`, whose architecture then applies) on the first ``num_samples`` images of
    ``data``, without plots: what :func:`analyze` reports and what the comparison harness records for every run.

    The projector is the source's (export / run) or, for ``random`` / ``timm:NAME``, a fresh one of ``projector``
    widths; ``views`` / ``augment``: see :func:`two_views`.
    """
    if isinstance(weights, BackboneSource):
        resolved = weights.resolve()
    else:
        resolved = resolve_backbone(weights, model=model, cifar_stem=cifar_stem, timm_kwargs=timm_kwargs, seed=seed)
    spec = projector if resolved.kind in ("random", "timm") else resolved.projector_spec  # fresh / the source's
    proj, proj_weights = resolved.build_projector(spec, seed=seed + 1)
    info = resolved.describe(image_size)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = _Both(resolved.backbone, proj).to(dev).eval()
    dim = resolved.num_features
    loader = features.eval_loader(data, batch_size=batch_size, image_size=info["image_size"], workers=workers,
                                  mean=info["mean"], std=info["std"], crop_pct=info["crop_pct"])
    both, _ = features.extract_features(net, loader, device=dev, amp_dtype=amp, max_batches=math.ceil(
        num_samples / batch_size), progress=progress, desc="clean features")
    view_batches, used = two_views(data, info, views=views, augment=augment, num_samples=num_samples,
                                   batch_size=batch_size, workers=workers, seed=seed)
    za, zb = _embed_views(net, view_batches, num_samples, dev, amp)
    reps = {"features": slice(0, dim), **({"embeddings": slice(dim, None)} if proj is not None else {})}
    metrics, spectra, deps = {}, {}, {}
    for name, cols in reps.items():
        metrics[name], spectra[name], deps[name] = representation_metrics(
            both[:num_samples, cols], za[:, cols], zb[:, cols], heatmap_size)
    return Measurement(info, metrics, spectra, deps, both[:num_samples, :dim], used,
                       "-".join(map(str, parse_projector(spec))) if proj is not None else None, proj_weights)


def _diagnostics(weights: str, data: Any, out: Path, *, dpi: int, **kwargs) -> Dict[str, Any]:
    """Everything but the curves: :func:`measure`, then the plots."""
    m = measure(weights, data, **kwargs)
    main_rep = "embeddings" if "embeddings" in m.metrics else "features"
    info = m.info
    n = int(m.features.shape[0])
    title = f"{info['model']}{' (CIFAR stem)' if info['cifar_stem'] else ''} | {info['weights']} | {n} images"
    plot_diagnostics(out, m.spectra, m.features, m.metrics["features"]["redundancy"], m.dependency[main_rep],
                     main_rep, title, dpi)
    return dict(m.summary(), heatmap_size=int(m.dependency[main_rep].shape[0]), spectra=m.spectra)


def analyze(weights: Optional[str] = None, data: Any = None, out_dir: str = "analysis", *, model: Optional[str] = None,
            cifar_stem: bool = False, projector: Optional[str] = None, image_size: Optional[int] = None,
            run: Optional[str] = None, num_samples: int = 1024, batch_size: int = 256, heatmap_size: int = 64,
            augment: str = "cifar", views: str = "auto", workers: int = 2, device: Optional[str] = None,
            seed: int = 0, amp: str = "no", timm_kwargs: Optional[Dict[str, Any]] = None, dpi: int = 80,
            progress: bool = True, curves_only: bool = False) -> Dict[str, Any]:
    """Compute the diagnostics and write the plots + ``analysis.json`` into ``out_dir``; returns the JSON dict.

    ``data``: a data spec (shards, ImageFolder dir, ``sample:test``) or an iterable of ``(images, labels)`` batches.
    ``views``: ``"auto"``, ``"ssl"`` or ``"crop-flip"`` (see :func:`two_views`).
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if run is None and weights and (Path(weights) / METRICS).is_file():
        run = weights
    shown = data if data is None or is_data_spec(data) else "batches"
    result: Dict[str, Any] = {"weights": weights, "data": shown, "run": run}
    if run is not None:
        result["curves"] = run_curves(run, out, dpi)
    if curves_only and run is None:
        raise ConfigError("--curves-only needs a run directory (--run or --weights RUN_DIR)")
    if not curves_only:
        if not weights or data is None:
            raise ConfigError("analysis needs --weights and --data (or --curves-only with --run)")
        result.update(_diagnostics(
            weights, data, out, model=model, cifar_stem=cifar_stem, projector=projector, image_size=image_size,
            timm_kwargs=timm_kwargs, num_samples=num_samples, batch_size=batch_size, heatmap_size=heatmap_size,
            augment=augment, views=views, workers=workers, device=device, seed=seed, amp=amp, dpi=dpi,
            progress=progress))
        result.update(seconds=time.perf_counter() - t_start,
                      files=sorted(p.name for p in out.glob("*.png")) + ["analysis.json"])
    write_json_atomic(out / "analysis.json", result, sort_keys=False)
    return result
