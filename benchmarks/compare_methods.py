"""SMI vs SMI-square vs Barlow Twins vs VICReg at equal budget on CIFAR-10 — the comparison harness.

Everything but the loss is identical between methods: backbone, projector, augmentations, batch size, optimiser and
schedule, number of steps and data-order seeds. Each method gets its own learning rate from a sweep of the same size,
chosen on a validation split carved out of the *training* images; the test split is used only for the final report.

Phases (each run's result is a JSON file in the output folder; finished runs are skipped, so an interrupted harness
continues where it stopped):

- ``lr``:    every method × every learning rate of the preset, seed 0, short budget (``sweep_steps``); selection
             by kNN top-1 with bank = ``train-000000`` and queries = ``train-000004`` (validation split).
- ``smi``:   SMI ``neg_weight`` × ``eps`` grid at the same short budget and the selected SMI learning rate;
             selection on the same validation split.
- ``smi-lr``: SMI at the selected neg_weight / eps and the grid neighbours of its selected learning rate (the lr
             phase ran at neg_weight 1, eps 1e-3, and the two interact); SMI's final settings are the best
             validation run of ``smi`` and ``smi-lr``.
- ``investigate``: the selected SMI and Barlow Twins settings with projectors 512-512 and 2048-2048 (does the
             width explain a gap?); reported, never used for selection.
- ``final``: every method at its selected learning rate (SMI also at its selected neg_weight / eps), ``seeds``
             seeds, full budget, online kNN monitor every ``eval_every`` steps (bank ``train-000000``, queries: the
             test split; reported, never used for selection); then kNN (k=200 and k=20, T=0.1) and a 100-epoch
             linear probe with the 50,000 training images as bank / probe training set, on the 10,000 test images.
- ``report``: ``table.md`` (accuracy mean ± std, sweeps, run times) and ``knn_curves.png``.

Usage::

    python benchmarks/compare_methods.py --preset cpu --phase all          # everything on this machine
    python benchmarks/compare_methods.py --preset gpu --phase all          # ResNet-18 CIFAR stem, 200 epochs
    python benchmarks/compare_methods.py --preset smoke --phase all        # a minute: checks the harness

The final phase can run elsewhere (e.g. on a GPU machine) from the sweeps run here: ``--sweep-from DIR`` reads the
selection records from ``DIR/runs`` and ``--methods`` / ``--seeds`` split the runs across processes
(``benchmarks/gpu_check.sh`` does this with 8 concurrent processes).

Data: ``--data-dir`` holds CIFAR-10 as WebDataset shards ``train-{000000..000004}.tar.gz`` and
``test-000000.tar.gz`` (default: ``../shared/data/cifar10`` relative to the repository).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]

# SMI's lr phase runs at neg_weight 1, eps 1e-3 (the library defaults before the sweep chose new ones), pinned here
# so that the harness reproduces its own choices from scratch whatever the current defaults are; the smi phase's
# extra settings override them.
METHODS: Dict[str, Dict[str, Any]] = {
    "smi": dict(loss="smi", transform="mi", neg_weight=1.0, eps=1e-3),
    "smi-square": dict(loss="smi", transform="square", neg_weight=1.0, eps=1e-3),
    "barlow": dict(loss="barlow", lambd=0.0051),
    "vicreg": dict(loss="vicreg", sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0),
}

PRESETS: Dict[str, Dict[str, Any]] = {
    # ResNet-18 with timm's standard stem at 32 px: ~15x cheaper than the CIFAR stem on a CPU (see RESULTS.md)
    "cpu": dict(train=dict(model="resnet18", cifar_stem=False, image_size=32, projector="1024-1024",
                           augment="cifar", batch_size=128, workers=1, optimizer="lars", lr_biases=None,
                           weight_decay=1e-4, warmup_steps=100, epoch_samples=50000, log_every=20),
                # 3.0 added after every method chose 1.0, the top of the first grid (docs/RESULTS.md)
                lrs=[0.1, 0.3, 1.0, 3.0], sweep_steps=300, final_steps=4000, eval_every=500, seeds=[0, 1],
                neg_weights=[1, 4, 16, 64, 256], epss=[1e-1, 1e-2, 1e-3], probe_epochs=100),
    # the GPU-scale configuration: ResNet-18 with the CIFAR stem, 200 epochs of 50k images at batch 256
    "gpu": dict(train=dict(model="resnet18", cifar_stem=True, image_size=32, projector="2048-2048-2048",
                           augment="cifar", batch_size=256, workers=8, optimizer="lars", lr_biases=None,
                           weight_decay=1e-4, warmup_steps=1950, epoch_samples=50000, log_every=50,
                           mixed_precision="bf16"),
                lrs=[0.1, 0.3, 1.0], sweep_steps=7800, final_steps=39000, eval_every=3900, seeds=[0, 1],
                neg_weights=[1, 4, 16, 64, 256], epss=[1e-1, 1e-2, 1e-3], probe_epochs=100),
    # checks the harness end to end in about a minute on the bundled sample (numbers mean nothing)
    "smoke": dict(train=dict(model="resnet10t", cifar_stem=False, image_size=32, projector="64-64",
                             augment="cifar", batch_size=32, workers=0, optimizer="lars", lr_biases=None,
                             weight_decay=1e-4, warmup_steps=1, log_every=1),
                  lrs=[0.3], sweep_steps=2, final_steps=3, eval_every=2, seeds=[0, 1], neg_weights=[1, 4],
                  epss=[1e-2], probe_epochs=2, bundled=True),
}


def _splits(args, preset) -> Dict[str, List[str]]:
    if preset.get("bundled"):
        from smi_timm.data import sample_shards

        train = sample_shards("train")
        test = sample_shards("test")
        return dict(train=train, val_bank=train[:1], val_query=train[-1:], test_bank=train, test_query=test)
    d = Path(args.data_dir)
    train = [str(d / f"train-{i:06d}.tar.gz") for i in range(5)]
    missing = [p for p in train + [str(d / "test-000000.tar.gz")] if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"CIFAR-10 shards not found: {missing[:2]} ...; pass --data-dir")
    return dict(train=train, val_bank=train[:1], val_query=train[4:], test_bank=train,
                test_query=[str(d / "test-000000.tar.gz")])


def _run_id(method: str, lr: float, seed: int, steps: int, extra: Dict[str, Any]) -> str:
    tail = "".join(f"_{k}{v:g}" if isinstance(v, (int, float)) else f"_{k}{v}" for k, v in sorted(extra.items()))
    return f"{method}_lr{lr:g}_s{seed}_n{steps}{tail}"


def _settings(preset, method, extra) -> Dict[str, Any]:
    """Training settings of one run: the preset's, then the method's, then the run's extra ones (later keys win)."""
    return {**preset["train"], **METHODS[method], **extra}


def _train_and_eval(args, preset, splits, method, lr, seed, steps, extra, eval_mode) -> Dict[str, Any]:
    """Pretrain one configuration, then evaluate it; returns the result record (also written as JSON)."""
    from smi_timm.eval import run_knn, run_linear
    from smi_timm.train import TrainConfig, train

    run_id = _run_id(method, lr, seed, steps, extra)
    out_json = Path(args.out) / "runs" / f"{run_id}_{eval_mode}.json"
    if out_json.is_file():
        return json.loads(out_json.read_text())
    run_dir = Path(args.out) / "train" / run_id
    settings = _settings(preset, method, extra)
    monitor = {}
    if eval_mode == "test":
        monitor = dict(eval_train=splits["val_bank"], eval_test=splits["test_query"], eval_every=preset["eval_every"],
                       eval_image_size=settings["image_size"])
    cfg = TrainConfig(**settings, **monitor, data=splits["train"], lr=lr, seed=seed, max_steps=steps,
                      save_every=max(steps // 2, 1), keep_last=1, output_dir=str(run_dir), progress=args.progress,
                      resume="auto")
    t0 = time.perf_counter()
    res = train(cfg)
    train_s = time.perf_counter() - t0
    export = str(res.export_dir)
    common = dict(workers=1, progress=False, quiet=True, cache_dir=str(Path(args.out) / "features"))
    t1 = time.perf_counter()
    if eval_mode == "val":
        knn = run_knn(export, splits["val_bank"], splits["val_query"], **common)
        record = dict(val_knn_top1=knn["top1"], val_knn_top5=knn["top5"])
    else:
        knn = run_knn(export, splits["test_bank"], splits["test_query"], **common)
        lin = run_linear(export, splits["test_bank"], splits["test_query"], epochs=preset["probe_epochs"], **common)
        record = dict(knn200_top1=knn["results"]["k=200"]["top1"], knn200_top5=knn["results"]["k=200"]["top5"],
                      knn20_top1=knn["results"]["k=20"]["top1"], knn20_top5=knn["results"]["k=20"]["top5"],
                      linear_top1=lin["top1"], linear_top5=lin["top5"])
    rows = [json.loads(line) for line in res.metrics_path.read_text().splitlines() if line.strip()]
    record.update(method=method, lr=lr, seed=seed, steps=steps, extra=extra, eval=eval_mode, run_id=run_id,
                  train_seconds=round(train_s, 1), eval_seconds=round(time.perf_counter() - t1, 1),
                  images_per_s=round(res.images_per_s, 1), final_loss=rows[-1].get("loss") if rows else None,
                  monitor=[{"step": r["step"], "knn_top1": r["knn_top1"]} for r in rows if "knn_top1" in r],
                  config=settings, date=str(date.today()), hardware=_hardware())
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(record, indent=2))
    print(f"[{run_id} {eval_mode}] " + ", ".join(f"{k}={v}" for k, v in record.items()
                                                 if k.endswith("top1")), flush=True)
    return record


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} + {os.cpu_count()} CPUs"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _load(out: Path, eval_mode: str) -> List[Dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob(f"*_{eval_mode}.json"))]


def _best_lr(records, method, steps) -> float:
    cands = [r for r in records if r["method"] == method and not r["extra"] and r["steps"] == steps]
    if not cands:
        raise SystemExit(f"no learning-rate sweep results for {method}; run --phase lr first")
    return max(cands, key=lambda r: r["val_knn_top1"])["lr"]


def _is_smi_sweep(record) -> bool:
    """An SMI run of the neg_weight x eps sweep or of the lr re-check (not an ``investigate`` variant)."""
    return record["method"] == "smi" and bool(record["extra"]) and set(record["extra"]) <= {"neg_weight", "eps"}


def _best_smi(records, lr, steps) -> Dict[str, float]:
    """The best ``neg_weight`` / ``eps`` of the SMI sweep at learning rate ``lr`` ({} when the sweep has not run)."""
    cands = [r for r in records if _is_smi_sweep(r) and r["lr"] == lr and r["steps"] == steps]
    if not cands:
        return {}
    return max(cands, key=lambda r: r["val_knn_top1"])["extra"]


def _smi_choice(records, steps) -> Tuple[float, Dict[str, float]]:
    """SMI's final (lr, extra): the best validation run of the ``neg_weight`` x ``eps`` sweep and of the
    learning-rate re-check at the chosen pair; the lr phase's choice (no extra settings) if neither has run."""
    cands = [r for r in records if _is_smi_sweep(r) and r["steps"] == steps]
    if not cands:
        return _best_lr(records, "smi", steps), {}
    best = max(cands, key=lambda r: r["val_knn_top1"])
    return best["lr"], best["extra"]


def phase_lr(args, preset, splits):
    for method in args.methods:
        for lr in preset["lrs"]:
            _train_and_eval(args, preset, splits, method, lr, 0, preset["sweep_steps"], {}, "val")


def phase_smi(args, preset, splits):
    lr = _best_lr(_val_records(args), "smi", preset["sweep_steps"])
    for nw in preset["neg_weights"]:
        for eps in preset["epss"]:
            _train_and_eval(args, preset, splits, "smi", lr, 0, preset["sweep_steps"],
                            dict(neg_weight=float(nw), eps=float(eps)), "val")


def _val_records(args) -> List[Dict[str, Any]]:
    """The sweep records that choose the final settings: from ``--sweep-from`` when given, else from ``--out``."""
    return _load(Path(getattr(args, "sweep_from", None) or args.out), "val")


def phase_smi_lr(args, preset, splits):
    """Re-check SMI's learning rate at the chosen neg_weight / eps: the grid neighbours of the lr phase's choice,
    which was made at neg_weight 1, eps 1e-3 (the two interact)."""
    val, steps = _val_records(args), preset["sweep_steps"]
    lr0 = _best_lr(val, "smi", steps)
    extra = _best_smi(val, lr0, steps)
    if not extra:
        raise SystemExit("no SMI neg_weight x eps sweep results; run --phase smi first")
    i = preset["lrs"].index(lr0)
    for lr in preset["lrs"][max(i - 1, 0):i + 2]:
        if lr != lr0:
            _train_and_eval(args, preset, splits, "smi", lr, 0, steps, extra, "val")


# Variants of the chosen settings run by the ``investigate`` phase (sweep budget, validation split): does the
# projector width explain the gap between SMI and Barlow Twins?
INVESTIGATE = [("smi", dict(projector="512-512")), ("smi", dict(projector="2048-2048")),
               ("barlow", dict(projector="512-512")), ("barlow", dict(projector="2048-2048"))]


def phase_investigate(args, preset, splits):
    val, steps = _val_records(args), preset["sweep_steps"]
    for method, variant in INVESTIGATE:
        if method not in args.methods:
            continue
        lr, extra = _smi_choice(val, steps) if method == "smi" else (_best_lr(val, method, steps), {})
        _train_and_eval(args, preset, splits, method, lr, 0, steps, dict(extra, **variant), "val")


def phase_final(args, preset, splits):
    val, steps = _val_records(args), preset["sweep_steps"]
    smi_lr, smi_extra = _smi_choice(val, steps) if any(r["method"] == "smi" for r in val) else (None, {})
    for method in args.methods:
        lr, extra = _best_lr(val, method, steps), {}
        if method == "smi":
            lr, extra = smi_lr, smi_extra
        elif method == "smi-square" and "neg_weight" in smi_extra:
            # the ablation changes only the map: SMI's chosen neg_weight (eps plays no role in "square"), its own lr
            extra = {"neg_weight": smi_extra["neg_weight"]}
        for seed in preset["seeds"]:
            _train_and_eval(args, preset, splits, method, lr, seed, preset["final_steps"], extra, "test")


def _mean_std(values):
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def phase_report(args, preset):
    out = Path(args.out)
    val, test = _val_records(args), _load(out, "test")
    lines = [f"# CIFAR-10 comparison ({args.preset} preset)", "",
             f"Generated by `python benchmarks/compare_methods.py --preset {args.preset} --out {args.out}` "
             f"(phases so far: those with rows below) on {platform.machine()} ({os.cpu_count()} CPUs); "
             f"configuration: `{json.dumps(preset['train'])}`.", "",
             "## Accuracy on the CIFAR-10 test split (mean ± std over seeds)", "",
             "Runs ran on: " + ("; ".join(sorted({r.get("hardware", "not recorded") for r in val + test})) or "–")
             + ".", "",
             "| method | lr | extra | seeds | kNN k=200 top-1 | kNN k=20 top-1 | linear top-1 | train min / run |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for method in args.methods:
        rs = [r for r in test if r["method"] == method]
        if not rs:
            continue
        lines.append(f"| {method} | {rs[0]['lr']:g} | {rs[0]['extra'] or '–'} | {len(rs)} | "
                     f"{_mean_std([r['knn200_top1'] for r in rs])} | {_mean_std([r['knn20_top1'] for r in rs])} | "
                     f"{_mean_std([r['linear_top1'] for r in rs])} | "
                     f"{statistics.mean(r['train_seconds'] for r in rs) / 60:.1f} |")
    lines += ["", "## Learning-rate sweep (validation kNN top-1: bank train-000000, queries train-000004)", "",
              "| method | " + " | ".join(f"lr {lr:g}" for lr in preset["lrs"]) + " | chosen |",
              "|---|" + "---:|" * (len(preset["lrs"]) + 1)]
    for method in args.methods:
        cells = []
        for lr in preset["lrs"]:
            r = [x for x in val if x["method"] == method and x["lr"] == lr and not x["extra"]]
            cells.append(f"{r[0]['val_knn_top1']:.2f}" if r else "–")
        chosen = [x for x in val if x["method"] == method and not x["extra"]]
        best = max(chosen, key=lambda r: r["val_knn_top1"])["lr"] if chosen else None
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {best if best is not None else '–'} |")
    smi_sweep = [x for x in val if _is_smi_sweep(x) and x["steps"] == preset["sweep_steps"]]
    if smi_sweep:
        lr0 = _best_lr(val, "smi", preset["sweep_steps"])
        lines += ["", f"## SMI neg_weight × eps sweep at lr {lr0:g} (validation kNN top-1)", "",
                  "| neg_weight | " + " | ".join(f"eps {e:g}" for e in preset["epss"]) + " |",
                  "|---:|" + "---:|" * len(preset["epss"])]
        for nw in preset["neg_weights"]:
            cells = []
            for eps in preset["epss"]:
                pair = {"neg_weight": float(nw), "eps": float(eps)}
                r = [x for x in smi_sweep if x["lr"] == lr0 and x["extra"] == pair]
                cells.append(f"{r[0]['val_knn_top1']:.2f}" if r else "–")
            lines.append(f"| {nw} | " + " | ".join(cells) + " |")
        recheck = sorted((x for x in smi_sweep if x["lr"] != lr0), key=lambda x: x["lr"])
        if recheck:
            lines += ["", "SMI learning-rate re-check at the chosen pair (validation kNN top-1): " + "; ".join(
                f"lr {x['lr']:g}, {x['extra']}: {x['val_knn_top1']:.2f}" for x in recheck) + "."]
        lr, extra = _smi_choice(val, preset["sweep_steps"])
        lines += ["", f"SMI final settings: lr {lr:g}, {extra}."]
    variants = [x for x in val if "projector" in x["extra"]]
    if variants:
        lines += ["", "## Investigation: projector width at the chosen settings (validation kNN top-1)", "",
                  f"| method | lr | settings | projector | val kNN top-1 |", "|---|---:|---|---|---:|"]
        for x in sorted(variants, key=lambda x: (x["method"], x["extra"]["projector"])):
            rest = {k: v for k, v in x["extra"].items() if k != "projector"}
            lines.append(f"| {x['method']} | {x['lr']:g} | {rest or '–'} | {x['extra']['projector']} | "
                         f"{x['val_knn_top1']:.2f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if test:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for method in args.methods:
            for r in [x for x in test if x["method"] == method]:
                if r["monitor"]:
                    ax.plot([m["step"] for m in r["monitor"]], [m["knn_top1"] for m in r["monitor"]], marker="o",
                            label=f"{method} (seed {r['seed']})")
        ax.set(xlabel="training step", ylabel="kNN top-1 (%)", title="online kNN monitor (CIFAR-10 test)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "knn_curves.png", dpi=110)
        plt.close(fig)
    print(f"wrote {out / 'table.md'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--phase", choices=["lr", "smi", "smi-lr", "investigate", "final", "report", "all"], default="all")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--out", default=None, help="output folder (default results/<date>-<preset>)")
    p.add_argument("--final-steps", type=int, help="override the preset's final budget")
    p.add_argument("--sweep-steps", type=int, help="override the preset's sweep budget")
    p.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    p.add_argument("--eval-every", type=int, help="override the preset's online-monitor interval (final phase)")
    p.add_argument("--lrs", type=float, nargs="+",
                   help="override the preset's learning-rate grid (e.g. to split the smi-lr re-check across processes)")
    p.add_argument("--neg-weights", type=float, nargs="+",
                   help="run only these SMI neg_weight values of the sweep (e.g. to split it across processes)")
    p.add_argument("--epss", type=float, nargs="+", help="run only these SMI eps values of the sweep")
    p.add_argument("--workers", type=int,
                   help="override the preset's data-loader workers (speed only; shards are split across workers, "
                        "so the order in which images arrive changes)")
    p.add_argument("--sweep-from", default=None,
                   help="folder whose runs/*_val.json records choose the final settings (default: --out), e.g. to "
                        "run the final phase on another machine from the sweeps run here")
    p.add_argument("--loss-backend", choices=["auto", "torch", "triton"], default=None,
                   help="SMI loss backend (default: the library's auto: Triton kernels on CUDA)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty())
    args = p.parse_args(argv)
    preset = json.loads(json.dumps(PRESETS[args.preset]))
    for key in ("final_steps", "sweep_steps", "seeds", "eval_every", "lrs", "neg_weights", "epss"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.workers is not None:
        preset["train"]["workers"] = args.workers
    if args.loss_backend is not None:
        preset["train"]["loss_backend"] = args.loss_backend
    args.out = args.out or str(REPO / "results" / f"{date.today()}-{args.preset}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    splits = _splits(args, preset)
    if args.phase in ("lr", "all"):
        phase_lr(args, preset, splits)
    if args.phase in ("smi", "all") and "smi" in args.methods:
        phase_smi(args, preset, splits)
    if args.phase in ("smi-lr", "all") and "smi" in args.methods:
        phase_smi_lr(args, preset, splits)
    if args.phase in ("investigate", "all"):
        phase_investigate(args, preset, splits)
    if args.phase in ("final", "all"):
        phase_final(args, preset, splits)
    phase_report(args, preset)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
