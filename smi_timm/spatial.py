"""Spatial localisation of a backbone's last feature map: per-location maps, concentration scalars, a PNG grid.

For each backbone and each image, the last feature map ``F`` (``C x h x w``: a ResNet's last stage, or a ViT's patch
tokens laid out on the patch grid, prefix tokens — class / register tokens — dropped) gives two maps:

* **activation norm** ``||F[:, i, j]||_2`` — where the network puts its activation mass (for a ViT, of the tokens
  before the final LayerNorm, which would make every norm nearly equal);
* **cosine to the pooled feature** ``cos(F[:, i, j], g)``, with ``g`` the backbone's pooled output (what kNN and
  linear probes see: global average pooling for a ResNet, the class token or the pooled tokens for a ViT) — which
  locations the image-level representation is made of. Negative cosines count as 0 in the scalars below.

Each map, normalised to a distribution ``p`` over its ``L = h * w`` locations, is summarised by two scalars,
averaged over the images:

* ``top_mass``: the share of the mass in the top ``top_frac`` (default 20 %) of locations, ``ceil(top_frac * L)`` of
  them; a uniform map gives ``ceil(top_frac * L) / L`` (``uniform_top_mass``), a single peak 1;
* ``entropy``: the normalised spatial entropy ``H(p) / log L``; 1 for a uniform map, 0 for a single peak.

Higher ``top_mass`` and lower ``entropy`` = more concentrated ("more spatially localised"). Maps smaller than 4 x 4
are refused (e.g. a standard-stem ResNet at 32 px has a 1 x 1 map): the error names the size that would work.

:func:`run_spatial` compares several backbones on the same images and writes ``spatial.json`` and ``spatial.png``
(rows: images; columns: the image, then the two maps of each backbone overlaid on it). ``smi-analyze --spatial``
is its command line.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .curves import save_figure
from .data import IMAGENET_MEAN, IMAGENET_STD
from .errors import ConfigError
from .eval.features import eval_loader, is_data_spec
from .layout import write_json_atomic
from .resolve import BackboneSource

__all__ = ["MIN_MAP_SIZE", "feature_map", "spatial_maps", "concentration", "relative_mass", "run_spatial",
           "plot_spatial"]

MIN_MAP_SIZE = 4


def _grid_size(backbone: nn.Module, tokens: int) -> Tuple[int, int]:
    embed = getattr(backbone, "patch_embed", None)
    grid = getattr(embed, "grid_size", None)
    if grid is not None and int(grid[0]) * int(grid[1]) == tokens:
        return int(grid[0]), int(grid[1])
    side = int(round(math.sqrt(tokens)))
    if side * side != tokens:
        raise ConfigError(f"cannot lay {tokens} patch tokens out on a grid (not square, and the model's patch_embed "
                         f"has no matching grid_size)")
    return side, side


def _to_grid(backbone: nn.Module, feats: torch.Tensor, width: int) -> Tuple[torch.Tensor, int]:
    """``(B, C, h, w)`` map of a ``forward_features`` output and the number of prefix tokens dropped."""
    if feats.ndim == 3:
        prefix = int(getattr(backbone, "num_prefix_tokens", 0) or 0)
        patches = feats[:, prefix:]
        h, w = _grid_size(backbone, patches.shape[1])
        return patches.transpose(1, 2).reshape(feats.shape[0], patches.shape[2], h, w), prefix
    if feats.ndim == 4:
        nhwc = width and feats.shape[-1] == width and feats.shape[1] != width
        return (feats.permute(0, 3, 1, 2) if nhwc else feats), 0
    raise ConfigError(f"forward_features returned shape {tuple(feats.shape)}; expected (B, C, h, w) or (B, N, C)")


def feature_map(backbone: nn.Module, images: torch.Tensor) -> Dict[str, Any]:
    """The last feature map of a timm backbone (``num_classes=0``): ``{"map": (B, C, h, w), "pre_norm": (B, C, h, w),
    "pooled": (B, C), "prefix": int}``.

    ``map`` is ``forward_features``: NCHW for convnets (NHWC outputs are transposed), ``(B, N, C)`` tokens for ViTs,
    whose first ``num_prefix_tokens`` are dropped and the rest laid out on the patch grid. ``pre_norm`` is the same
    map before a ViT's final ``norm`` layer (a LayerNorm makes every token's norm nearly equal, so activation norms
    are read before it), else ``map``. ``pooled`` is ``forward_head(..., pre_logits=True)``, or the mean of the map
    when that has another width.
    """
    if not hasattr(backbone, "forward_features"):
        raise ConfigError(f"{type(backbone).__name__} has no forward_features: spatial maps need a timm backbone")
    captured: Dict[str, torch.Tensor] = {}
    norm = getattr(backbone, "norm", None)
    hook = None
    if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
        hook = norm.register_forward_hook(lambda mod, inputs, output: captured.__setitem__("pre", inputs[0]))
    try:
        feats = backbone.forward_features(images)
    finally:
        if hook is not None:
            hook.remove()
    try:
        pooled = backbone.forward_head(feats, pre_logits=True)
    except (AttributeError, TypeError):
        pooled = None
    width = int(getattr(backbone, "num_features", 0) or 0)
    fmap, prefix = _to_grid(backbone, feats, width)
    pre = captured.get("pre")
    pre_norm = _to_grid(backbone, pre, width)[0] if feats.ndim == 3 and pre is not None and pre.shape == feats.shape \
        else fmap
    if pooled is None or pooled.ndim != 2 or pooled.shape[1] != fmap.shape[1]:
        pooled = fmap.mean(dim=(2, 3))
    return {"map": fmap.float(), "pre_norm": pre_norm.float(), "pooled": pooled.float(), "prefix": prefix}


def spatial_maps(fmap: torch.Tensor, pooled: torch.Tensor,
                 pre_norm: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """``{"norm": (B, h, w), "cosine": (B, h, w)}``: the activation norm of each location (of ``pre_norm`` when
    given) and its cosine similarity to ``pooled``."""
    norm = (fmap if pre_norm is None else pre_norm).norm(dim=1)
    cos = F.cosine_similarity(fmap, pooled[:, :, None, None].expand_as(fmap), dim=1, eps=1e-8)
    return {"norm": norm, "cosine": cos}


def concentration(maps: torch.Tensor, top_frac: float = 0.2) -> Dict[str, torch.Tensor]:
    """Per-map ``top_mass`` and ``entropy`` (see the module doc) of ``maps`` ``(B, h, w)``; negative values count as
    0, and an all-zero map counts as uniform."""
    if not 0 < top_frac <= 1:
        raise ConfigError(f"top_frac must be in (0, 1], got {top_frac}")
    flat = maps.flatten(1).double().clamp_min(0)
    n = flat.shape[1]
    total = flat.sum(dim=1, keepdim=True)
    p = torch.where(total > 0, flat / total.clamp_min(1e-30), torch.full_like(flat, 1.0 / n))
    k = math.ceil(top_frac * n)
    top = p.topk(k, dim=1).values.sum(dim=1)
    ent = -(p * p.clamp_min(1e-30).log()).sum(dim=1) / math.log(n) if n > 1 else torch.ones(p.shape[0])
    return {"top_mass": top.float(), "entropy": ent.float()}


def _check_size(label: str, h: int, w: int, image_size: int) -> None:
    if min(h, w) < MIN_MAP_SIZE:
        need = int(math.ceil(image_size * MIN_MAP_SIZE / max(min(h, w), 1)))
        raise ConfigError(f"{label}: the last feature map is {h}x{w} at {image_size} px, smaller than "
                         f"{MIN_MAP_SIZE}x{MIN_MAP_SIZE}, so it has no spatial structure to measure; use "
                         f"--image-size {need} or more (or a backbone with a finer last map, e.g. the CIFAR stem)")


def _input_size(resolved) -> int:
    """The source's recorded input size; else the size a ViT was built for (``img_size``); else the default."""
    built = getattr(getattr(resolved.backbone, "patch_embed", None), "img_size", None)
    if not resolved.image_size and built:
        return int(built[-1] if isinstance(built, (tuple, list)) else built)
    return resolved.default_image_size()


def _load_images(data: Any, n: int, image_size: int, crop_pct: Optional[float], batch_size: int,
                 workers: int) -> torch.Tensor:
    """The first ``n`` images of ``data`` in [0, 1] (the eval loader's resize and centre crop, no normalisation)."""

    loader = eval_loader(data, batch_size=batch_size, image_size=image_size, workers=workers, mean=(0.0, 0.0, 0.0),
                         std=(1.0, 1.0, 1.0), crop_pct=crop_pct)
    out, got = [], 0
    for images, _ in loader:
        out.append(images)
        got += images.shape[0]
        if got >= n:
            break
    if not out:
        raise ConfigError("the data yielded no images: check the path / pattern")
    return torch.cat(out)[:n]


def _backbone_maps(resolved, label: str, images: torch.Tensor, batch_size: int, device: torch.device,
                   top_frac: float) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:

    mean = torch.tensor(resolved.mean or IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(resolved.std or IMAGENET_STD).view(1, 3, 1, 1)
    net = resolved.backbone.to(device).eval()
    maps: Dict[str, List[torch.Tensor]] = {"norm": [], "cosine": []}
    prefix, size = 0, (0, 0)
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            x = ((images[start:start + batch_size] - mean) / std).to(device)
            try:
                fm = feature_map(net, x)
            except AssertionError as err:  # timm's own input-size checks (e.g. a ViT built for another size)
                raise ConfigError(f"{label}: the backbone refused {tuple(x.shape[-2:])} px inputs ({err}); pass the "
                                 f"--image-size it was built for") from None
            prefix, size = fm["prefix"], tuple(fm["map"].shape[-2:])
            _check_size(label, size[0], size[1], images.shape[-1])
            for name, m in spatial_maps(fm["map"], fm["pooled"], fm["pre_norm"]).items():
                maps[name].append(m.cpu())
    cat = {name: torch.cat(v) for name, v in maps.items()}
    n_loc = size[0] * size[1]
    summary = dict(label=label, weights=resolved.weights, model=resolved.model, cifar_stem=resolved.cifar_stem,
                   weights_sha256=resolved.weights_sha256, map_size=list(size), prefix_tokens_dropped=prefix,
                   uniform_top_mass=math.ceil(top_frac * n_loc) / n_loc)
    for name, m in cat.items():
        c = concentration(m, top_frac)
        summary[name] = {"top_mass": float(c["top_mass"].mean()), "top_mass_std": float(c["top_mass"].std()),
                         "entropy": float(c["entropy"].mean()), "entropy_std": float(c["entropy"].std())}
    return summary, cat


def run_spatial(sources: Sequence[str], data: Any, out_dir: Any, *, labels: Optional[Sequence[str]] = None,
                image_size: Optional[int] = None, num_images: int = 6, num_samples: int = 256,
                model: Optional[str] = None, cifar_stem: bool = False, timm_kwargs: Optional[Dict[str, Any]] = None,
                top_frac: float = 0.2, batch_size: int = 64, workers: int = 2, device: Optional[str] = None,
                seed: int = 0, dpi: int = 80) -> Dict[str, Any]:
    """Compare the last-feature-map concentration of ``sources`` (any weights :func:`~smi_timm.resolve.
    resolve_backbone` accepts; ``model`` / ``cifar_stem`` / ``timm_kwargs`` apply to ``random``, ``timm:`` and bare
    ``.safetensors`` sources) on the first ``num_samples`` images of ``data`` at ``image_size`` px (default: the
    first backbone's input size: the recorded one, the ``img_size`` a ViT was built for, or the model's default); the
    first ``num_images`` go into the PNG grid.

    Writes ``OUT_DIR/spatial.json`` (the returned dict: per backbone ``map_size``, ``norm`` and ``cosine``
    concentration, mean and std over images) and ``OUT_DIR/spatial.png``.
    """

    if not sources:
        raise ConfigError("spatial analysis needs at least one --weights")
    labels = list(labels or [])
    if labels and len(labels) != len(sources):
        raise ConfigError(f"{len(labels)} labels for {len(sources)} backbones: give one --label per --weights")
    labels = labels or [str(s) for s in sources]
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = [BackboneSource.of(src, model=model, cifar_stem=cifar_stem, timm_kwargs=timm_kwargs, seed=seed).resolve()
                for src in sources]
    size = int(image_size or _input_size(resolved[0]))
    images = _load_images(data, max(num_samples, num_images), size, resolved[0].crop_pct, batch_size, workers)
    summaries, all_maps = [], []
    for res, label in zip(resolved, labels):
        summary, maps = _backbone_maps(res, label, images, batch_size, dev, top_frac)
        summaries.append(summary)
        all_maps.append(maps)
    plot_spatial(out / "spatial.png", images[:num_images], all_maps, summaries, dpi=dpi)

    result = dict(image_size=size, num_images=int(images.shape[0]), num_plotted=int(min(num_images, len(images))),
                  top_frac=top_frac, data=data if is_data_spec(data) else "batches", backbones=summaries,
                  png="spatial.png", seconds=round(time.perf_counter() - t0, 1))
    write_json_atomic(out / "spatial.json", result, sort_keys=False)
    return result


def relative_mass(maps: torch.Tensor) -> torch.Tensor:
    """Each location's share of its map's mass times the number of locations (1 everywhere for a uniform map),
    negative values as 0: what the concentration scalars summarise and what the PNG shows."""
    flat = maps.flatten(1).clamp_min(0)
    n = flat.shape[1]
    total = flat.sum(dim=1, keepdim=True)
    rel = torch.where(total > 0, flat * n / total.clamp_min(1e-30), torch.ones_like(flat))
    return rel.view_as(maps)


def plot_spatial(path: Path, images: torch.Tensor, maps: Sequence[Dict[str, torch.Tensor]],
                 summaries: Sequence[Dict[str, Any]], dpi: int = 80, vmax: float = 2.0) -> None:
    """The PNG grid: one row per image; the image, then for each backbone its norm and cosine maps as
    :func:`relative_mass` (bilinearly upsampled; one colour scale for every panel: white = the uniform share, red =
    more mass, blue = less, saturating at ``vmax`` times the uniform share) over the image."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure


    n, cols = images.shape[0], 1 + 2 * len(maps)
    fig = Figure(figsize=(1.7 * cols, 1.8 * n + 0.9), dpi=dpi)
    axes = fig.subplots(n, cols, squeeze=False)
    size = images.shape[-2:]
    scale = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    shown = None
    for r in range(n):
        img = images[r].permute(1, 2, 0).clamp(0, 1).numpy()
        axes[r][0].imshow(img)
        for b, (m, s) in enumerate(zip(maps, summaries)):
            for j, name in enumerate(("norm", "cosine")):
                ax = axes[r][1 + 2 * b + j]
                rel = relative_mass(m[name][r][None])
                up = F.interpolate(rel[None], size=size, mode="bilinear", align_corners=False)[0, 0]
                ax.imshow(img)
                shown = ax.imshow(up.numpy(), cmap="coolwarm", norm=scale, alpha=0.6)
                if r == 0:
                    ax.set_title(f"{s['label']}\n{name}: top {s[name]['top_mass']:.2f}, H {s[name]['entropy']:.2f}",
                                 fontsize=7)
    axes[0][0].set_title("image", fontsize=7)
    for ax in fig.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(rect=(0, 1.0 / (1.8 * n + 0.9), 1, 1))
    if shown is not None:
        cax = fig.add_axes((0.3, 0.55 / (1.8 * n + 0.9), 0.4, 0.1 / (1.8 * n + 0.9)))
        bar = fig.colorbar(shown, cax=cax, orientation="horizontal")
        bar.set_label("mass per location / uniform share (mean over images: top = top-20% mass, H = entropy)",
                      fontsize=7)
        bar.ax.tick_params(labelsize=6)
    save_figure(fig, path, dpi)
