"""``smi-analyze``: representation diagnostics (spectrum, effective rank, alignment and uniformity, cross-view
correlation, redundancy, dependency matrix, training curves) or, with ``--spatial``, spatial localisation.

The measurements are :mod:`smi_timm.analysis` and :mod:`smi_timm.spatial`; this module parses flags and prints.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..analysis import analyze
from ..spatial import run_spatial
from .args import add_backbone_args, add_extraction_args, apply_threads
from .common import fail, run_cli

__all__ = ["main", "build_parser"]

PROG = "smi-analyze"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Representation diagnostics (spectrum, effective rank, "
                                "alignment/uniformity, cross-view correlation, redundancy, dependency matrix, "
                                "training curves).")
    add_backbone_args(p, several=True, required=False)
    p.add_argument("--spatial", action="store_true",
                   help="spatial localisation instead: activation-norm and cosine-to-pooled maps of the last "
                        "feature map over the images (spatial.png) and their concentration (spatial.json); see "
                        "smi_timm.spatial")
    p.add_argument("--label", action="append", help="--spatial: a name per --weights for the plot and table")
    p.add_argument("--num-images", type=int, default=6, help="--spatial: images shown in the PNG grid (default 6)")
    p.add_argument("--top-frac", type=float, default=0.2,
                   help="--spatial: share of locations whose mass is reported (default 0.2: the top 20%%)")
    p.add_argument("--projector", help="projector widths for --weights random, e.g. 2048-2048-2048 (default none)")
    p.add_argument("--data", action="append", help="eval split: WebDataset shard pattern(s), an ImageFolder dir, or "
                                                   "sample:test (the bundled CIFAR-10 sample)")
    p.add_argument("--run", help="run directory whose metrics.jsonl gives training curves")
    p.add_argument("--curves-only", action="store_true", help="only plot the training curves of --run")
    p.add_argument("--out-dir", default="analysis", help="output folder (default ./analysis)")
    p.add_argument("--num-samples", type=int, default=1024, help="images used (default 1024)")
    p.add_argument("--heatmap-size", type=int, default=64, help="samples in the dependency heat map (default 64)")
    p.add_argument("--augment", default="cifar", help="SSL augmentation preset for the two views (cifar|byol)")
    p.add_argument("--views", choices=("auto", "ssl", "crop-flip"), default="auto",
                   help="two-view source: the SSL loader or crop+flip (auto: SSL loader for shards, crop+flip for an "
                        "ImageFolder dir)")
    p.add_argument("--dpi", type=int, default=80, help="PNG resolution (default 80)")
    add_extraction_args(p)
    return p


def _print_metrics(result, out_dir: str) -> None:
    for name, m in (result.get("metrics") or {}).items():
        print(f"{name}: D={m['dim']} effective rank {m['effective_rank']:.1f}, RankMe {m['rankme']:.1f}, "
              f"alignment {m['alignment']:.3f} (centred {m['alignment_centered']:.3f}), cross-view correlation "
              f"{m['cross_view_corr']:.3f}, uniformity {m['uniformity']:.3f}, redundancy {m['redundancy']:.3f}")
    if result.get("curves"):
        print(f"curves: {result['curves']}")
    print(f"wrote {out_dir}/: {', '.join(result.get('files') or ['analysis.json', 'curves.png'])}")


def _diagnostics(args, data) -> int:
    if args.weights and len(args.weights) > 1:
        return fail(PROG, "several --weights are compared only with --spatial")
    result = analyze(args.weights[0] if args.weights else None, data, args.out_dir, model=args.model,
                     cifar_stem=args.cifar_stem, projector=args.projector, image_size=args.image_size, run=args.run,
                     num_samples=args.num_samples, batch_size=args.batch_size, heatmap_size=args.heatmap_size,
                     augment=args.augment, views=args.views, workers=args.workers, device=args.device,
                     seed=args.seed, amp=args.amp, timm_kwargs=args.timm_kwargs, dpi=args.dpi,
                     progress=not args.no_progress, curves_only=args.curves_only)
    _print_metrics(result, args.out_dir)
    return 0


def _spatial(args, data) -> int:
    if not args.weights or data is None:
        return fail(PROG, "--spatial needs --weights (one or more) and --data")
    res = run_spatial(args.weights, data, args.out_dir, labels=args.label, image_size=args.image_size,
                      num_images=args.num_images, num_samples=args.num_samples, model=args.model,
                      cifar_stem=args.cifar_stem, timm_kwargs=args.timm_kwargs, top_frac=args.top_frac,
                      batch_size=min(args.batch_size, 64), workers=args.workers, device=args.device,
                      seed=args.seed, dpi=args.dpi)
    top = f"top-{res['top_frac']:.0%} mass"
    print(f"{res['num_images']} images at {res['image_size']} px; {top} (uniform: "
          f"{res['backbones'][0]['uniform_top_mass']:.3f}) and normalised entropy (uniform: 1)")
    print(f"| backbone | map | norm: {top} | norm: entropy | cosine: {top} | cosine: entropy |")
    print("|---|---|---:|---:|---:|---:|")
    for b in res["backbones"]:
        n, c = b["norm"], b["cosine"]
        print(f"| {b['label']} | {b['map_size'][0]}x{b['map_size'][1]} | {n['top_mass']:.3f} | {n['entropy']:.3f} | "
              f"{c['top_mass']:.3f} | {c['entropy']:.3f} |")
    print(f"wrote {args.out_dir}/: spatial.png, spatial.json")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    apply_threads(args)
    data = None if not args.data else (args.data[0] if len(args.data) == 1 else args.data)
    return run_cli(PROG, lambda: _spatial(args, data) if args.spatial else _diagnostics(args, data))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
