"""``smi-analyze``: representation diagnostics of a backbone (+ projector), as PNG plots and one JSON.

For ``--weights`` (``random`` with ``--model``, an export folder, a run directory or checkpoint) on ``--data`` (an
eval split: WebDataset shards or an ImageFolder dir) it computes, on ``--num-samples`` images:

* **spectrum** — eigenvalues of the covariance of the features (and of the projector embeddings), normalised to
  sum 1, with two effective ranks: ``effective_rank`` = exp(entropy of the normalised covariance eigenvalues)
  (Roy & Vetterli, 2007) and ``rankme`` = exp(entropy of the normalised singular values of the embedding matrix)
  (RankMe, Garrido et al., 2023);
* **alignment** E||f(x) - f(x')||^2 of two views and **uniformity** log E exp(-2 ||f(x) - f(y)||^2) over pairs of
  images, both on L2-normalised outputs (Wang & Isola, 2020). The two views come from the SSL loader
  ``smi_timm.data.make_ssl_loader(..., augment=--augment)`` when the data module provides it, and otherwise from a
  random resized crop (scale 0.5-1) + horizontal flip of each image; ``views`` in the JSON says which;
* **redundancy** — mean absolute off-diagonal entry of the feature correlation matrix;
* **dependency** — the N x N matrix phi(rho) of :func:`smi_timm.losses.smi.dependency_matrix` between the two views of
  one batch (a heat map: a bright diagonal = matched pairs, dark elsewhere);
* **training curves** (loss, lr, knn_top1 against step) from ``RUN_DIR/metrics.jsonl`` when a run is given
  (``--run``, or ``--weights RUN_DIR``). ``--curves-only`` skips everything else.

Outputs in ``--out-dir``: ``analysis.json``, ``summary.png`` (all panels), ``spectrum.png``, ``correlation.png``,
``dependency.png`` and ``curves.png`` (with a run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["main", "analyze", "effective_rank", "rankme", "alignment", "uniformity", "redundancy",
           "covariance_spectrum", "read_metrics", "two_view_pair"]


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


# ---------------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------------

def two_view_pair(images: torch.Tensor, generator: Optional[torch.Generator] = None,
                  scale: Tuple[float, float] = (0.5, 1.0)) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fallback views of a normalised batch (B, C, H, W): per image and view a random resized crop (area ``scale``,
    aspect 3/4-4/3, bilinear back to H x W) and a horizontal flip with p = 0.5."""
    b, _, h, w = images.shape

    def view() -> torch.Tensor:
        out = torch.empty_like(images)
        for i in range(b):
            area = float(torch.empty(1).uniform_(*scale, generator=generator)) * h * w
            ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)))
            ch = max(1, min(h, int(round(math.sqrt(area / ratio)))))
            cw = max(1, min(w, int(round(math.sqrt(area * ratio)))))
            top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
            crop = images[i:i + 1, :, top:top + ch, left:left + cw]
            crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
            if float(torch.rand(1, generator=generator)) < 0.5:
                crop = crop.flip(-1)
            out[i:i + 1] = crop
        return out

    return view(), view()


def _split_views(batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """(view_a, view_b) from the batches an SSL loader may yield: (a, b), ((a, b), labels) or a dict."""
    if isinstance(batch, dict):
        for ka, kb in (("view_a", "view_b"), ("a", "b"), ("x1", "x2")):
            if ka in batch and kb in batch:
                return batch[ka], batch[kb]
        raise TypeError(f"cannot find two views in a batch with keys {sorted(batch)}")
    if isinstance(batch, (tuple, list)):
        if len(batch) >= 2 and all(isinstance(x, torch.Tensor) and x.ndim == 4 for x in batch[:2]):
            return batch[0], batch[1]
        if len(batch) >= 1 and isinstance(batch[0], (tuple, list)):
            return _split_views(batch[0])
    raise TypeError(f"cannot find two views in a batch of type {type(batch).__name__}")


def _ssl_loader(spec: Any, batch_size: int, image_size: int, augment: str, workers: int, num_samples: int = 0,
                seed: int = 0):
    """The data module's two-view loader, or None when it does not provide one."""
    try:
        from .data import make_ssl_loader  # type: ignore[attr-defined]
    except ImportError:
        return None
    import inspect

    params = inspect.signature(make_ssl_loader).parameters
    kwargs: Dict[str, Any] = {"augment": augment}
    if "num_workers" in params:
        kwargs["num_workers"] = workers
    if "seed" in params:
        kwargs["seed"] = seed
    if "epoch_samples" in params:  # shards without a JSON index need it; we stop after num_samples anyway
        kwargs["epoch_samples"] = max(num_samples, batch_size)
    return make_ssl_loader(spec, batch_size=batch_size, image_size=image_size, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# models
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


def load_for_analysis(weights: str, model: Optional[str] = None, cifar_stem: bool = False,
                      projector: Optional[str] = None, image_size: Optional[int] = None, seed: int = 0,
                      timm_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Optional[nn.Module], Dict]:
    """``(backbone, projector or None, info)``: the backbone as in ``smi-eval``; the projector from an export's
    ``projector.safetensors``, a run checkpoint's ``projector.*`` tensors, or (``random``) a fresh ``projector``."""
    from .eval.cli import load_backbone
    from .export import CONFIG_NAME, PROJECTOR_NAME, _resolve_export_source
    from .models.hub import load_safetensors
    from .models.ssl import build_projector, parse_projector

    backbone, info = load_backbone(weights, model=model, cifar_stem=cifar_stem, image_size=image_size, seed=seed,
                                   timm_kwargs=timm_kwargs)
    dim = int(backbone.num_features)
    proj: Optional[nn.Module] = None
    spec: Optional[str] = None
    state: Optional[Dict[str, torch.Tensor]] = None
    path = Path(weights)
    if weights == "random" or weights.startswith("timm:"):
        spec = projector
    elif path.is_dir() and (path / CONFIG_NAME).is_file():
        with open(path / CONFIG_NAME, "r", encoding="utf-8") as f:
            spec = ((json.load(f).get("smi") or {}).get("projector"))
        if (path / PROJECTOR_NAME).is_file():
            state = load_safetensors(path / PROJECTOR_NAME)
        else:
            spec = None
    elif path.exists():
        try:
            file, run_config = _resolve_export_source(path)
        except FileNotFoundError:
            file, run_config = None, {}
        if file is not None:
            spec = run_config.get("projector")
            full = load_safetensors(file)
            state = {k[len("projector."):]: v for k, v in full.items() if k.startswith("projector.")}
            if not state:
                spec = None
    dims = parse_projector(spec) if spec else []
    if dims:
        torch.manual_seed(seed + 1)
        proj = build_projector(dim, dims)
        if state is not None:
            proj.load_state_dict(state)
        proj.eval()
    info["projector"] = "-".join(map(str, dims)) if dims else None
    info["projector_weights"] = "loaded" if (dims and state is not None) else ("random" if dims else None)
    return backbone, proj, info


# ---------------------------------------------------------------------------------------------------------------------
# training curves
# ---------------------------------------------------------------------------------------------------------------------

def read_metrics(path: os.PathLike) -> Tuple[List[Dict[str, Any]], int]:
    """Rows of a ``metrics.jsonl`` (JSON objects with a ``step``) and the number of unreadable lines skipped."""
    rows, bad = [], 0
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def _series(rows: Iterable[Dict[str, Any]], key: str) -> Tuple[List[float], List[float]]:
    pts = sorted((float(r["step"]), float(r[key])) for r in rows
                 if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key])))
    return [p[0] for p in pts], [p[1] for p in pts]


# ---------------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_spectrum(ax, spectra: Dict[str, Dict[str, Any]]) -> None:
    for name, s in spectra.items():
        vals = torch.tensor(s["eigenvalues"]).clamp_min(1e-12)
        ax.semilogy(range(1, len(vals) + 1), vals.tolist(),
                    label=f"{name} (D={s['dim']}, eff. rank {s['effective_rank']:.1f})")
    ax.set_xlabel("component")
    ax.set_ylabel("normalised eigenvalue")
    ax.set_title("covariance spectrum")
    ax.legend(fontsize=7)


def _plot_corr(ax, corr: torch.Tensor, red: float) -> None:
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


def _plot_curves(axes, rows: List[Dict[str, Any]]) -> None:
    for ax, key, label in zip(axes, ("loss", "lr", "knn_top1"), ("training loss", "learning rate", "kNN top-1 (%)")):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        else:
            ax.text(0.5, 0.5, f"no '{key}' in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step")
        ax.set_title(label)


# ---------------------------------------------------------------------------------------------------------------------
# main entry
# ---------------------------------------------------------------------------------------------------------------------

def analyze(weights: Optional[str] = None, data: Any = None, out_dir: str = "analysis", *, model: Optional[str] = None,
            cifar_stem: bool = False, projector: Optional[str] = None, image_size: Optional[int] = None,
            run: Optional[str] = None, num_samples: int = 1024, batch_size: int = 256, heatmap_size: int = 64,
            augment: str = "cifar", views: str = "auto", workers: int = 2, device: Optional[str] = None,
            seed: int = 0, amp: str = "no", timm_kwargs: Optional[Dict[str, Any]] = None, dpi: int = 80,
            progress: bool = True, curves_only: bool = False) -> Dict[str, Any]:
    """Compute the diagnostics and write the plots + ``analysis.json`` into ``out_dir``; returns the JSON dict.

    ``views``: ``"auto"`` (SSL loader when available, else crop+flip), ``"ssl"`` or ``"crop-flip"``.
    """
    from .eval.features import extract_features
    from .export import _atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    result: Dict[str, Any] = {"weights": weights, "data": data, "run": run}
    t_start = time.perf_counter()

    if run is None and weights and Path(weights).is_dir() and (Path(weights) / "metrics.jsonl").is_file():
        run = weights
        result["run"] = run
    rows: List[Dict[str, Any]] = []
    if run is not None:
        metrics = Path(run) / "metrics.jsonl"
        if not metrics.is_file():
            raise FileNotFoundError(f"{metrics} does not exist; --run must be a run directory written by smi-pretrain")
        rows, bad = read_metrics(metrics)
        xs, losses = _series(rows, "loss")
        ks, knn = _series(rows, "knn_top1")
        result["curves"] = {"rows": len(rows), "skipped_lines": bad, "last_step": max(xs) if xs else None,
                            "final_loss": losses[-1] if losses else None,
                            "best_knn_top1": max(knn) if knn else None, "final_knn_top1": knn[-1] if knn else None}
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), dpi=dpi)
        _plot_curves(axes, rows)
        fig.tight_layout()
        fig.savefig(out / "curves.png")
        plt.close(fig)

    if curves_only:
        if run is None:
            raise ValueError("--curves-only needs a run directory (--run or --weights RUN_DIR)")
        _atomic_write(out / "analysis.json", (json.dumps(result, indent=2, default=str) + "\n").encode())
        return result
    if not weights or data is None:
        raise ValueError("analysis needs --weights and --data (or --curves-only with --run)")

    backbone, proj, info = load_for_analysis(weights, model=model, cifar_stem=cifar_stem, projector=projector,
                                             image_size=image_size, seed=seed, timm_kwargs=timm_kwargs)
    size = info["image_size"]
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = _Both(backbone, proj).to(dev).eval()
    dim = int(backbone.num_features)
    max_batches = max(1, math.ceil(num_samples / batch_size))

    from .eval.cli import _make_loader

    loader = _make_loader(data, batch_size, size, workers, info)
    both, labels = extract_features(net, loader, device=dev, amp_dtype=amp, max_batches=max_batches,
                                    progress=progress, desc="clean features")
    both, labels = both[:num_samples], labels[:num_samples]
    reps = {"features": both[:, :dim]}
    if proj is not None:
        reps["embeddings"] = both[:, dim:]

    # two views
    gen = torch.Generator().manual_seed(seed)
    view_batches: List[Tuple[torch.Tensor, torch.Tensor]] = []
    used = None
    if views in ("auto", "ssl"):
        ssl = None
        try:
            from .eval.cli import expand_data_spec

            shards = expand_data_spec(data)
            ssl = _ssl_loader(shards if len(shards) > 1 else shards[0], batch_size, size, augment, workers,
                              num_samples, seed)
        except Exception as err:  # a loader that cannot be built here: fall back (recorded)
            if views == "ssl":
                raise
            result["views_fallback_reason"] = str(err)
        if ssl is not None:
            n = 0
            for batch in ssl:
                va, vb = _split_views(batch)
                view_batches.append((va, vb))
                n += va.shape[0]
                if n >= num_samples:
                    break
            used = f"ssl loader (augment={augment})"
        elif views == "ssl":
            raise ValueError("--views ssl needs smi_timm.data.make_ssl_loader, which this installation lacks")
    if used is None:
        loader = _make_loader(data, batch_size, size, workers, info)
        n = 0
        for batch in loader:
            images = batch[0]
            view_batches.append(two_view_pair(images, gen))
            n += images.shape[0]
            if n >= num_samples:
                break
        used = "random resized crop (scale 0.5-1) + horizontal flip"

    # embed both views of a batch in one forward pass (view a rows first, then view b)
    za_list, zb_list = [], []
    for va, vb in view_batches:
        z, _ = extract_features(net, [(torch.cat([va, vb]), torch.zeros(va.shape[0] * 2))], device=dev,
                                amp_dtype=amp, progress=False)
        za_list.append(z[:va.shape[0]])
        zb_list.append(z[va.shape[0]:])
    za_all = torch.cat(za_list)[:num_samples]
    zb_all = torch.cat(zb_list)[:num_samples]

    from .losses.smi import dependency_matrix

    metrics: Dict[str, Any] = {}
    spectra: Dict[str, Dict[str, Any]] = {}
    for name, z in reps.items():
        sl = slice(0, dim) if name == "features" else slice(dim, None)
        a, b = za_all[:, sl], zb_all[:, sl]
        eig = covariance_spectrum(z)
        spectra[name] = {"dim": int(z.shape[1]), "effective_rank": _entropy_rank(eig), "rankme": rankme(z),
                         "eigenvalues": [float(f"{v:.6g}") for v in eig.tolist()]}
        h = min(heatmap_size, a.shape[0])
        dep = dependency_matrix(a[:h], b[:h])
        eye = torch.eye(h, dtype=torch.bool)
        metrics[name] = {
            "dim": int(z.shape[1]),
            "effective_rank": spectra[name]["effective_rank"],
            "rankme": spectra[name]["rankme"],
            "alignment": alignment(a, b),
            "uniformity": uniformity(a),
            "redundancy": redundancy(z),
            "dependency_diag_mean": float(dep[eye].mean()),
            "dependency_offdiag_mean": float(dep[~eye].mean()) if h > 1 else None,
        }
        metrics[name]["_dep"] = dep
    main_rep = "embeddings" if "embeddings" in reps else "features"

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=dpi)
    _plot_spectrum(axes[0], spectra)
    corr = _corr(reps["features"])
    _plot_corr(axes[1], corr, metrics["features"]["redundancy"])
    n_dep = metrics[main_rep]["_dep"].shape[0]
    _plot_dep(fig, axes[2], metrics[main_rep]["_dep"], f"dependency phi(rho), {main_rep}, {n_dep} pairs")
    title = f"{info['model']}{' (CIFAR stem)' if info['cifar_stem'] else ''} | {info['weights']} | {num_samples} images"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "summary.png")
    plt.close(fig)
    for fname, draw in (("spectrum.png", lambda f, ax: _plot_spectrum(ax, spectra)),
                        ("correlation.png", lambda f, ax: _plot_corr(ax, corr, metrics["features"]["redundancy"])),
                        ("dependency.png", lambda f, ax: _plot_dep(f, ax, metrics[main_rep]["_dep"],
                                                                   f"dependency phi(rho), {main_rep}"))):
        fig, ax = plt.subplots(figsize=(5, 4), dpi=dpi)
        draw(fig, ax)
        fig.tight_layout()
        fig.savefig(out / fname)
        plt.close(fig)
    for m in metrics.values():
        m.pop("_dep")

    result.update(
        model=info["model"], cifar_stem=info["cifar_stem"], weights=info["weights"],
        weights_sha256=info["weights_sha256"], projector=info["projector"],
        projector_weights=info["projector_weights"], image_size=size, num_samples=int(reps["features"].shape[0]),
        views=used, heatmap_size=min(heatmap_size, int(za_all.shape[0])), metrics=metrics, spectra=spectra,
        seconds=time.perf_counter() - t_start,
        files=sorted(p.name for p in out.glob("*.png")) + ["analysis.json"],
    )
    _atomic_write(out / "analysis.json", (json.dumps(result, indent=2, default=str) + "\n").encode())
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smi-analyze", description="Representation diagnostics (spectrum, effective "
                                "rank, alignment/uniformity, redundancy, dependency matrix, training curves).")
    p.add_argument("--weights", help="'random' (with --model), an export folder, a run dir or a checkpoint")
    p.add_argument("--model", help="timm architecture for --weights random")
    p.add_argument("--cifar-stem", action="store_true", help="ResNet with the CIFAR stem (--weights random)")
    p.add_argument("--projector", help="projector widths for --weights random, e.g. 2048-2048-2048 (default none)")
    p.add_argument("--data", action="append", help="eval split: WebDataset shard pattern(s), an ImageFolder dir, or "
                                                   "sample:test (the bundled CIFAR-10 sample)")
    p.add_argument("--run", help="run directory whose metrics.jsonl gives training curves")
    p.add_argument("--curves-only", action="store_true", help="only plot the training curves of --run")
    p.add_argument("--out-dir", default="analysis", help="output folder (default ./analysis)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--num-samples", type=int, default=1024, help="images used (default 1024)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--heatmap-size", type=int, default=64, help="samples in the dependency heat map (default 64)")
    p.add_argument("--augment", default="cifar", help="SSL augmentation preset for the two views (cifar|byol)")
    p.add_argument("--views", choices=("auto", "ssl", "crop-flip"), default="auto",
                   help="two-view source: the SSL loader (auto when available) or crop+flip")
    p.add_argument("--timm-kwargs", type=json.loads, default=None, help="extra timm.create_model kwargs (JSON)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--device")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--amp", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dpi", type=int, default=80, help="PNG resolution (default 80)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .models.hub import WeightsHashError
    from .models.registry import WeightsMismatchError

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = None
    if args.data:
        data = args.data[0] if len(args.data) == 1 else args.data
    try:
        result = analyze(args.weights, data, args.out_dir, model=args.model, cifar_stem=args.cifar_stem,
                         projector=args.projector, image_size=args.image_size, run=args.run,
                         num_samples=args.num_samples, batch_size=args.batch_size, heatmap_size=args.heatmap_size,
                         augment=args.augment, views=args.views, workers=args.workers, device=args.device,
                         seed=args.seed, amp=args.amp, timm_kwargs=args.timm_kwargs, dpi=args.dpi,
                         progress=not args.no_progress, curves_only=args.curves_only)
    except (FileNotFoundError, ValueError, WeightsMismatchError, WeightsHashError) as err:
        print(f"smi-analyze: error: {err}", file=sys.stderr)
        return 2
    for name, m in (result.get("metrics") or {}).items():
        print(f"{name}: D={m['dim']} effective rank {m['effective_rank']:.1f}, RankMe {m['rankme']:.1f}, "
              f"alignment {m['alignment']:.3f}, uniformity {m['uniformity']:.3f}, redundancy {m['redundancy']:.3f}")
    if result.get("curves"):
        print(f"curves: {result['curves']}")
    print(f"wrote {args.out_dir}/: {', '.join(result.get('files') or ['analysis.json', 'curves.png'])}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
