"""SMI vs SMI-square vs Barlow Twins vs VICReg vs SimCLR at equal budget on CIFAR-10 — the comparison harness.

Everything but the loss is identical between methods: backbone, projector, augmentations, batch size, optimiser and
schedule, number of steps and data-order seeds. Each method gets its own learning rate from a sweep of the same size,
chosen on a validation split carved out of the *training* images; the test split is used only for the final report.

Every sweep run is scored on the validation split (bank ``train-000000``, queries ``train-000004``) by kNN top-1
(k=200, T=0.1) **and** by a linear probe (the paper's headline metric), and its features' RankMe, effective rank,
alignment and uniformity are recorded (:func:`smi_timm.analysis.measure`, ``metric_samples`` query images, two
views from the pretraining augmentation). ``--select linear`` (default) or ``--select knn`` says which score chooses
the settings; the report shows the choices of both.

Phases (each run's result is a JSON file in ``OUT/runs``; finished runs are skipped, so an interrupted harness
continues where it stopped):

- ``lr``:    every method × every learning rate of the preset, seed 0, short budget (``sweep_steps``); SMI and
             SMI-square at ``neg_weight`` 1, ``eps`` 1e-3, SimCLR at temperature 0.2 (pinned, so a rerun repeats
             the same procedure).
- ``smi``:   SMI ``neg_weight`` × ``eps`` grid at SMI's selected learning rate.
- ``smi-lr``: SMI at the selected ``neg_weight`` / ``eps`` (of each criterion) and the grid neighbours of its
             learning rate (the lr phase ran at ``neg_weight`` 1, and the two interact); SMI's final settings are the
             best validation run of ``smi`` and ``smi-lr``.
- ``simclr``: SimCLR's temperature grid (``temperatures``) at its selected learning rate; its final settings are the
             best validation run of the lr phase's run at that rate and of this grid.
- ``investigate``: the selected SMI and Barlow Twins settings with projectors 512-512 and 2048-2048; reported, never
             used for selection.
- ``final``: every method at its selected settings (SMI-square: its own learning rate and SMI's ``neg_weight``),
             ``final_seeds`` seeds, full budget, online kNN monitor every ``eval_every`` steps (bank
             ``train-000000``, queries: the test split; reported, never used for selection); then kNN (k=200 and
             k=20, T=0.1), a linear probe with the 50,000 training images against the 10,000 test images, and the
             representation metrics on the test images. ``--fixed-settings`` skips the sweep records: each method at
             the preset's first learning rate, SMI at the library's ``neg_weight`` / ``eps``.
- ``trial``: the studies' fixed configurations (``TRIAL_CONFIGS``, stated in docs/RESULTS.md before the runs: SMI at
             the library defaults and at ``neg_weight`` 16, the alternative readings ``standardize=feature_row`` and
             ``negatives=logmeanexp``, SMI-square, SimCLR at its validation choice, Barlow Twins), final budget, test
             split, ``trial_seeds`` seeds; ``--configs`` picks some. Not part of ``all``.
- ``batch``: trial configurations (default SMI, Barlow Twins, SimCLR; ``--configs``) at each of ``batch_sizes`` at
             equal epochs (steps and warmup scaled with the batch; the learning rate is per 256 images, so it
             scales linearly). Not part of ``all``.
- ``transfer``: every final run's exported backbone, and the random-init floor, frozen, on a small fine-grained set
             (``--transfer-dir``, default ``../shared/data/flowers12``): kNN (k=20 and k=5, T=0.1) and the linear
             probe at the pretraining resolution and at 64 px (:func:`smi_timm.eval.transfer.run_transfer`).
- ``spatial``: last-feature-map concentration (:mod:`smi_timm.spatial`) of the seed-0 final backbones and the floor
             on the first transfer test images, at ``spatial_size`` px; PNG grid and JSON in ``OUT/spatial``.
- ``report``: ``table.md`` (accuracy mean ± std per final budget, transfer, spatial concentration, sweeps under
             both criteria, run times, the hardware of each run) and ``knn_curves.png``; written by ``--phase
             report`` and at the end of ``--phase all``.

Usage::

    python benchmarks/compare_methods.py --preset cpu --phase all          # everything on this machine
    python benchmarks/compare_methods.py --preset gpu --phase all          # ResNet-18 CIFAR stem, 200 epochs
    python benchmarks/compare_methods.py --preset smoke --phase all        # a minute: checks the harness

Long phases split across processes: ``--shard I/N`` runs every N-th configuration of the phase starting at I (run
the N processes of one phase, wait for all, then the next phase); ``--methods`` / ``--seeds`` split by method and
seed. The final phase can run elsewhere (e.g. on a GPU machine) from the sweeps run here: ``--sweep-from DIR`` reads
the selection records from ``DIR/runs`` (whatever that machine's learning-rate grid and sweep budget were).

Data: ``--data-dir`` holds CIFAR-10 as WebDataset shards ``train-{000000..000004}.tar.gz`` and
``test-000000.tar.gz`` (default: ``../shared/data/cifar10`` relative to the repository).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from _common import hardware

REPO = Path(__file__).resolve().parents[1]

# SMI's lr phase runs at neg_weight 1, eps 1e-3 (the library defaults before the sweep chose new ones), pinned here
# so that the harness reproduces its own choices from scratch whatever the current defaults are; the smi phase's
# extra settings override them.
METHODS: Dict[str, Dict[str, Any]] = {
    "smi": dict(loss="smi", transform="mi", neg_weight=1.0, eps=1e-3),
    "smi-square": dict(loss="smi", transform="square", neg_weight=1.0, eps=1e-3),
    "barlow": dict(loss="barlow"),  # the published settings: the loss's own defaults (smi_timm.losses.LOSSES)
    "vicreg": dict(loss="vicreg"),
    # the lr phase at temperature 0.2 (the middle of the simclr phase's grid), pinned like SMI's settings above
    "simclr": dict(loss="simclr", temperature=0.2),
}

#: validation score of each selection criterion (``--select``)
CRITERIA: Dict[str, str] = {"linear": "val_linear_top1", "knn": "val_knn_top1"}

PRESETS: Dict[str, Dict[str, Any]] = {
    # ResNet-18 with timm's standard stem at 32 px: ~15x cheaper than the CIFAR stem on a CPU (see RESULTS.md)
    "cpu": dict(train=dict(model="resnet18", cifar_stem=False, image_size=32, projector="1024-1024",
                           augment="cifar", batch_size=128, workers=1, optimizer="lars", lr_biases=None,
                           weight_decay=1e-4, warmup_steps=100, epoch_samples=50000, log_every=20),
                # 3.0 added after every method chose 1.0, the top of the first grid (docs/RESULTS.md)
                lrs=[0.1, 0.3, 1.0, 3.0], sweep_steps=300, final_steps=4000, eval_every=500, seeds=[0, 1],
                final_seeds={"smi": [0, 1], "barlow": [0, 1], "vicreg": [0], "smi-square": [0]},
                neg_weights=[1, 4, 16, 64, 256], epss=[1e-1, 1e-2, 1e-3], probe_epochs=100, metric_samples=2048,
                transfer_sizes=[None, 64], spatial_size=128, temperatures=[0.1, 0.2, 0.5], trial_seeds=[0, 1],
                batch_sizes=[32, 512], batch_seeds=[0]),
    # the GPU-scale configuration: ResNet-18 with the CIFAR stem, 200 epochs of 50k images at batch 256
    "gpu": dict(train=dict(model="resnet18", cifar_stem=True, image_size=32, projector="2048-2048-2048",
                           augment="cifar", batch_size=256, workers=8, optimizer="lars", lr_biases=None,
                           weight_decay=1e-4, warmup_steps=1950, epoch_samples=50000, log_every=50,
                           mixed_precision="bf16"),
                lrs=[0.1, 0.3, 1.0], sweep_steps=7800, final_steps=39000, eval_every=3900, seeds=[0, 1],
                neg_weights=[1, 4, 16, 64, 256], epss=[1e-1, 1e-2, 1e-3], probe_epochs=100, metric_samples=4096,
                transfer_sizes=[None, 64], spatial_size=64, temperatures=[0.1, 0.2, 0.5], trial_seeds=[0, 1],
                batch_sizes=[64, 1024], batch_seeds=[0]),
    # checks the harness end to end in about a minute on the bundled sample (numbers mean nothing)
    "smoke": dict(train=dict(model="resnet10t", cifar_stem=False, image_size=32, projector="64-64",
                             augment="cifar", batch_size=32, workers=0, optimizer="lars", lr_biases=None,
                             weight_decay=1e-4, warmup_steps=1, log_every=1),
                  lrs=[0.3], sweep_steps=2, final_steps=3, eval_every=2, seeds=[0], neg_weights=[1, 4],
                  epss=[1e-2], probe_epochs=2, metric_samples=64, transfer_sizes=[None, 64], spatial_size=128,
                  transfer_max_batches=1, spatial_samples=16, bundled=True, temperatures=[0.2, 0.5],
                  trial_seeds=[0], batch_sizes=[16], batch_seeds=[0]),
}

TRANSFER_KS = (20, 5)  # kNN neighbours of the transfer phase (T = 0.1): the set has 60 training images per class


def data_splits(args, preset) -> Dict[str, List[str]]:
    if preset.get("bundled"):
        from smi_timm.data import sample_shards

        train = sample_shards("train")
        test = sample_shards("test")
        # one shard each for the evaluations: the smoke preset checks the path, not the numbers
        return dict(train=train, val_bank=train[:1], val_query=train[-1:], test_bank=train[:1], test_query=test[:1])
    d = Path(args.data_dir)
    train = [str(d / f"train-{i:06d}.tar.gz") for i in range(5)]
    missing = [p for p in train + [str(d / "test-000000.tar.gz")] if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"CIFAR-10 shards not found: {missing[:2]} ...; pass --data-dir")
    return dict(train=train, val_bank=train[:1], val_query=train[4:], test_bank=train,
                test_query=[str(d / "test-000000.tar.gz")])


def run_name(method: str, lr: float, seed: int, steps: int, extra: Dict[str, Any]) -> str:
    tail = "".join(f"_{k}{v:g}" if isinstance(v, (int, float)) else f"_{k}{v}" for k, v in sorted(extra.items()))
    return f"{method}_lr{lr:g}_s{seed}_n{steps}{tail}"


def run_settings(preset, method, extra) -> Dict[str, Any]:
    """Training settings of one run: the preset's, then the method's, then the run's extra ones (later keys win);
    ``--loss-backend`` applies to the SMI runs."""
    backend = {"loss_backend": preset["smi_backend"]} if preset.get("smi_backend") and \
        METHODS[method]["loss"] == "smi" else {}
    return {**preset["train"], **METHODS[method], **backend, **extra}


def export_dir(out, run_id: str) -> Path:
    """The exported backbone of a harness run (``OUT/train/RUN_ID/export``, kept after the run)."""
    from smi_timm.layout import EXPORT_DIR

    return Path(out) / "train" / run_id / EXPORT_DIR


# ---------------------------------------------------------------------------------------------------------------------
# one run: pretrain, then evaluate
# ---------------------------------------------------------------------------------------------------------------------

def evaluate_export(export: str, preset, bank, query, *, augment: str, out: str) -> Dict[str, Any]:
    """kNN (k=200 and 20, T=0.1), the linear probe and the representation metrics (on ``metric_samples`` query
    images) of an exported backbone, as record fields: ``knn200_top1``, ``knn20_top1``, ``linear_top1``, ...,
    ``metrics`` (``{"features": {...}, "embeddings": {...}}``)."""
    from smi_timm.analysis import measure
    from smi_timm.eval import EvalSettings, evaluate

    workers = preset["train"]["workers"]  # the evaluation loaders get the training loader's workers
    settings = EvalSettings(workers=workers, progress=False, cache_dir=str(Path(out) / "features"), k=200,
                            extra_k=(20,), probe_epochs=preset["probe_epochs"])
    both = evaluate(export, bank, query, settings)  # one extraction for kNN and the probe
    knn, lin = both["knn"], both["linear"]
    m = measure(export, query, num_samples=preset["metric_samples"], augment=augment, views="ssl", workers=workers)
    keep = ("dim", "rankme", "effective_rank", "alignment", "alignment_centered", "cross_view_corr", "uniformity",
            "redundancy")
    res = knn["results"]
    return dict(knn200_top1=res["k=200"]["top1"], knn200_top5=res["k=200"]["top5"], knn20_top1=res["k=20"]["top1"],
                knn20_top5=res["k=20"]["top5"], linear_top1=lin["top1"], linear_top5=lin["top5"],
                metrics={rep: {k: v[k] for k in keep} for rep, v in m.metrics.items()},
                metric_samples=int(m.features.shape[0]), metric_views=m.views)


# record field names of the validation evaluation (the test evaluation keeps evaluate_export's names)
VAL_FIELDS = dict(knn200_top1="val_knn_top1", knn200_top5="val_knn_top5", knn20_top1="val_knn20_top1",
                  knn20_top5="val_knn20_top5", linear_top1="val_linear_top1", linear_top5="val_linear_top5",
                  metrics="val_metrics")


def train_and_eval(args, preset, splits, method, lr, seed, steps, extra, eval_mode) -> Dict[str, Any]:
    """Pretrain one configuration, then evaluate it; returns the result record (also written as JSON).

    ``eval_mode`` ``val``: on the validation split (bank ``train-000000``, queries ``train-000004``), fields
    ``val_*``; ``test``: the training images against the test split, fields ``knn200_top1``, ``knn20_top1``,
    ``linear_top1``, ``test_metrics``. The exported backbone stays in ``OUT/train/RUN_ID/export``."""
    from smi_timm.curves import read_metrics, summarize_curves
    from smi_timm.train import TrainConfig, train

    run_id = run_name(method, lr, seed, steps, extra)
    out_json = Path(args.out) / "runs" / f"{run_id}_{eval_mode}.json"
    if out_json.is_file():
        return json.loads(out_json.read_text())
    run_dir = Path(args.out) / "train" / run_id
    settings = run_settings(preset, method, extra)
    monitor = {}
    if eval_mode == "test":
        # the monitor's interval in images, whatever the batch (the batch phase changes it)
        every = max(1, round(preset["eval_every"] * preset["train"]["batch_size"] / settings["batch_size"]))
        monitor = dict(eval_train=splits["val_bank"], eval_test=splits["test_query"], eval_every=every,
                       eval_image_size=settings["image_size"])
    cfg = TrainConfig.from_dict(dict(settings, **monitor, data=splits["train"], lr=lr, seed=seed, max_steps=steps,
                                     save_every=max(steps // 2, 1), keep_last=1, output_dir=str(run_dir),
                                     progress=args.progress, resume="auto"))
    t0 = time.perf_counter()
    res = train(cfg)
    train_s = time.perf_counter() - t0
    if res.status != "finished" or res.export_dir is None:
        raise SystemExit(f"[{run_id}] training stopped at step {res.step} of {steps} ({res.status}); run the same "
                         f"command again to resume it")
    t1 = time.perf_counter()
    bank, query = (splits["val_bank"], splits["val_query"]) if eval_mode == "val" else (
        splits["test_bank"], splits["test_query"])
    record = evaluate_export(str(res.export_dir), preset, bank, query, augment=settings["augment"], out=args.out)
    renames = VAL_FIELDS if eval_mode == "val" else {"metrics": "test_metrics"}
    record = {renames.get(k, k): v for k, v in record.items()}
    rows, _ = read_metrics(res.metrics_path)
    record.update(method=method, lr=lr, seed=seed, steps=steps, extra=extra, eval=eval_mode, run_id=run_id,
                  train_seconds=round(train_s, 1), eval_seconds=round(time.perf_counter() - t1, 1),
                  images_per_s=round(res.images_per_s, 1), final_loss=summarize_curves(rows)["final_loss"],
                  monitor=[{"step": r["step"], "knn_top1": r["knn_top1"]} for r in rows if "knn_top1" in r],
                  config=settings, date=str(date.today()), hardware=hardware(_device()),
                  selection=getattr(args, "selection", None) if eval_mode == "test" else None)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(record, indent=2))
    print(f"[{run_id} {eval_mode}] " + ", ".join(f"{k}={v:.2f}" for k, v in record.items()
                                                 if k.endswith("top1")), flush=True)
    return record


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------------------------------

def load_records(out: Path, eval_mode: str) -> List[Dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "runs").glob(f"*_{eval_mode}.json"))]


def score(record, criterion: str = "linear") -> Optional[float]:
    """The validation score of ``record`` under ``criterion`` (``linear`` or ``knn``); None when not measured."""
    return record.get(CRITERIA[criterion])


def _best(cands, criterion: str, what: str) -> Dict[str, Any]:
    scored = [r for r in cands if score(r, criterion) is not None]
    if not scored:
        raise SystemExit(f"the {what} records have no {CRITERIA[criterion]} (written before the harness measured "
                         f"it): rerun the sweep phases, or choose with --select "
                         f"{'knn' if criterion == 'linear' else 'linear'}")
    return max(scored, key=lambda r: score(r, criterion))


def best_lr(records, method, steps, criterion: str = "linear") -> float:
    cands = [r for r in records if r["method"] == method and not r["extra"] and r["steps"] == steps]
    if not cands:
        raise SystemExit(f"no learning-rate sweep results for {method}; run --phase lr first")
    return _best(cands, criterion, f"{method} learning-rate sweep")["lr"]


def is_smi_sweep(record) -> bool:
    """An SMI run of the neg_weight x eps sweep or of the lr re-check (not an ``investigate`` variant)."""
    return record["method"] == "smi" and bool(record["extra"]) and set(record["extra"]) <= {"neg_weight", "eps"}


def best_smi(records, lr, steps, criterion: str = "linear") -> Dict[str, float]:
    """The best ``neg_weight`` / ``eps`` of the SMI sweep at learning rate ``lr`` ({} when the sweep has not run)."""
    cands = [r for r in records if is_smi_sweep(r) and r["lr"] == lr and r["steps"] == steps]
    if not cands:
        return {}
    return _best(cands, criterion, "SMI neg_weight x eps sweep")["extra"]


def smi_choice(records, steps, criterion: str = "linear") -> Tuple[float, Dict[str, float]]:
    """SMI's final (lr, extra): the best validation run of the ``neg_weight`` x ``eps`` sweep and of the
    learning-rate re-check at the chosen pair; the lr phase's choice (no extra settings) if neither has run."""
    cands = [r for r in records if is_smi_sweep(r) and r["steps"] == steps]
    if not cands:
        return best_lr(records, "smi", steps, criterion), {}
    best = _best(cands, criterion, "SMI sweep")
    return best["lr"], best["extra"]


def selection_steps(records, preset) -> int:
    """The sweep budget whose records choose the settings: the preset's when such records exist, else the one
    budget of the lr-phase records (e.g. a GPU final phase choosing from CPU sweeps with ``--sweep-from``)."""
    budgets = sorted({r["steps"] for r in records if not r["extra"]})
    if preset["sweep_steps"] in budgets or not budgets:
        return preset["sweep_steps"]
    if len(budgets) == 1:
        return budgets[0]
    raise SystemExit(f"sweep records at several budgets {budgets} and none is the preset's ({preset['sweep_steps']}); "
                     f"pass --sweep-steps")


def final_settings(records, steps, methods: Sequence[str], criterion: str = "linear"
                   ) -> Dict[str, Tuple[float, Dict[str, Any]]]:
    """``{method: (lr, extra)}`` of the final runs: each method's best learning rate; SMI's sweep choice; SMI-square
    its own learning rate and SMI's chosen ``neg_weight`` (the ablation changes only the map; eps plays no role)."""
    if {"smi", "smi-square"} & set(methods) and not any(is_smi_sweep(r) and r["steps"] == steps for r in records):
        raise SystemExit(f"no SMI neg_weight x eps sweep at {steps} steps in the records: SMI (and SMI-square, which "
                         f"takes SMI's neg_weight) would run at the lr phase's pinned neg_weight 1; run --phase smi "
                         f"smi-lr first, or pass --fixed-settings (the library's defaults)")
    smi_lr, smi_extra = smi_choice(records, steps, criterion) if any(
        r["method"] == "smi" for r in records) else (None, {})
    out = {}
    for method in methods:
        if method == "simclr":
            out[method] = simclr_choice(records, steps, criterion)
        elif method == "smi":
            out[method] = (smi_lr if smi_lr is not None else best_lr(records, method, steps, criterion), smi_extra)
        elif method == "smi-square" and "neg_weight" in smi_extra:
            out[method] = (best_lr(records, method, steps, criterion), {"neg_weight": smi_extra["neg_weight"]})
        else:
            out[method] = (best_lr(records, method, steps, criterion), {})
    return out


def simclr_choice(records, steps, criterion: str = "linear") -> Tuple[float, Dict[str, Any]]:
    """SimCLR's (lr, {"temperature": T}): its best learning rate (lr phase, at the pinned temperature), then the best
    temperature at that rate (the lr-phase run and the ``simclr`` phase's runs)."""
    lr = best_lr(records, "simclr", steps, criterion)
    pinned = METHODS["simclr"]["temperature"]
    cands = [dict(r, extra={"temperature": r["extra"].get("temperature", pinned)}) for r in records
             if r["method"] == "simclr" and r["lr"] == lr and r["steps"] == steps
             and set(r["extra"]) <= {"temperature"}]
    return lr, dict(_best(cands, criterion, "SimCLR temperature sweep")["extra"])


def fixed_settings(preset, methods: Sequence[str]) -> Dict[str, Tuple[float, Dict[str, Any]]]:
    """``--fixed-settings``: no sweep records; every method at the preset's first learning rate, SMI at the library's
    ``neg_weight`` / ``eps`` and SMI-square at its ``neg_weight``."""
    from smi_timm.losses import LOSSES

    smi, simclr = LOSSES["smi"].defaults(), LOSSES["simclr"].defaults()
    extras = {"smi": {"neg_weight": float(smi["neg_weight"]), "eps": float(smi["eps"])},
              "smi-square": {"neg_weight": float(smi["neg_weight"])},
              "simclr": {"temperature": float(simclr["temperature"])}}
    return {m: (float(preset["lrs"][0]), dict(extras.get(m, {}))) for m in methods}


# ---------------------------------------------------------------------------------------------------------------------
# phases
# ---------------------------------------------------------------------------------------------------------------------

Job = Tuple[str, float, int, int, Dict[str, Any], str]  # method, lr, seed, steps, extra, eval mode


def parse_shard(text: Optional[str]) -> Tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with 0 <= I < N; None -> ``(0, 1)``."""
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard {text!r}: expected I/N, e.g. 0/2") from None
    if not 0 <= i < n:
        raise SystemExit(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def run_jobs(args, preset, splits, jobs: Sequence[Job]) -> None:
    """Run this process's share (``--shard I/N``: jobs I, I+N, ...) of a phase's configurations, in order."""
    i, n = parse_shard(getattr(args, "shard", None))
    seen = []
    for job in jobs:
        if job not in seen:
            seen.append(job)
    for k, job in enumerate(seen):
        if k % n == i:
            train_and_eval(args, preset, splits, *job)


def _select(args) -> str:
    return getattr(args, "select", None) or "linear"


def val_records(args) -> List[Dict[str, Any]]:
    """The sweep records that choose the final settings: from ``--sweep-from`` when given, else from ``--out``."""
    return load_records(Path(getattr(args, "sweep_from", None) or args.out), "val")


def require_lr_phase(records, method, lrs, steps) -> None:
    """Stop unless the lr phase of ``method`` is complete (another shard may still be running)."""
    have = {r["lr"] for r in records if r["method"] == method and not r["extra"] and r["steps"] == steps}
    missing = [lr for lr in lrs if lr not in have]
    if missing:
        raise SystemExit(f"the lr phase of {method} is incomplete (no record at lr {missing}); run --phase lr to the "
                         f"end (every shard) first")


def phase_lr(args, preset, splits):
    run_jobs(args, preset, splits, [(m, lr, 0, preset["sweep_steps"], {}, "val")
                                    for m in args.methods for lr in preset["lrs"]])


def phase_smi(args, preset, splits):
    val, steps = val_records(args), preset["sweep_steps"]
    require_lr_phase(val, "smi", preset["lrs"], steps)
    lr = best_lr(val, "smi", steps, _select(args))
    run_jobs(args, preset, splits, [("smi", lr, 0, steps, dict(neg_weight=float(nw), eps=float(eps)), "val")
                                    for nw in preset["neg_weights"] for eps in preset["epss"]])


def grid_lr(records, steps) -> Optional[float]:
    """The learning rate the SMI ``neg_weight`` x ``eps`` grid ran at (the one with the most grid runs)."""
    runs = [r["lr"] for r in records if is_smi_sweep(r) and r["steps"] == steps]
    return max(sorted(set(runs)), key=runs.count) if runs else None


def phase_smi_lr(args, preset, splits):
    """Re-check SMI's learning rate at the chosen neg_weight / eps: the grid neighbours of the learning rate the grid
    ran at (the lr phase's choice, made at neg_weight 1, eps 1e-3: the two interact). Done at the pair of each
    criterion (the selected one first), so that both criteria's choices rest on the same procedure."""
    val, steps, lrs = val_records(args), preset["sweep_steps"], list(preset["lrs"])
    lr0 = grid_lr(val, steps)
    if lr0 is None:
        raise SystemExit("no SMI neg_weight x eps sweep results; run --phase smi first")
    i = lrs.index(lr0) if lr0 in lrs else None
    near = [lr for lr in (lrs[max(i - 1, 0):i + 2] if i is not None else []) if lr != lr0]
    jobs = []
    for criterion in dict.fromkeys([_select(args), *CRITERIA]):
        extra = best_smi(val, lr0, steps, criterion)
        jobs += [("smi", lr, 0, steps, extra, "val") for lr in near]
    run_jobs(args, preset, splits, jobs)


def phase_simclr(args, preset, splits):
    """SimCLR's temperature grid at its selected learning rate (the lr phase ran at the pinned temperature 0.2)."""
    val, steps = val_records(args), preset["sweep_steps"]
    require_lr_phase(val, "simclr", preset["lrs"], steps)
    lr = best_lr(val, "simclr", steps, _select(args))
    pinned = METHODS["simclr"]["temperature"]
    run_jobs(args, preset, splits, [("simclr", lr, 0, steps, {"temperature": float(t)}, "val")
                                    for t in preset["temperatures"] if float(t) != pinned])


# Variants of the chosen settings run by the ``investigate`` phase (sweep budget, validation split): does the
# projector width explain the gap between SMI and Barlow Twins?
INVESTIGATE = [("smi", dict(projector="512-512")), ("smi", dict(projector="2048-2048")),
               ("barlow", dict(projector="512-512")), ("barlow", dict(projector="2048-2048"))]


def phase_investigate(args, preset, splits):
    val, steps = val_records(args), preset["sweep_steps"]
    chosen = final_settings(val, steps, [m for m, _ in INVESTIGATE if m in args.methods], _select(args))
    run_jobs(args, preset, splits, [(m, chosen[m][0], 0, steps, dict(chosen[m][1], **variant), "val")
                                    for m, variant in INVESTIGATE if m in args.methods])


def seeds_of(preset, method) -> List[int]:
    """The final phase's seeds of ``method``: ``final_seeds[method]`` when the preset has it, else ``seeds``."""
    return list((preset.get("final_seeds") or {}).get(method, preset["seeds"]))


def phase_final(args, preset, splits):
    if getattr(args, "fixed_settings", False):
        chosen = fixed_settings(preset, args.methods)
        args.selection = "fixed (--fixed-settings)"
    else:
        val = val_records(args)
        steps = selection_steps(val, preset)
        chosen = final_settings(val, steps, args.methods, _select(args))
        args.selection = f"validation {_select(args)}, {steps}-step sweeps" + (
            f" of {args.sweep_from}" if getattr(args, "sweep_from", None) else "")
    seeds = sorted({s for m in args.methods for s in seeds_of(preset, m)})
    # seed-major: all methods' seed 0 first, so that a complete one-seed table exists early
    run_jobs(args, preset, splits, [(m, chosen[m][0], s, preset["final_steps"], chosen[m][1], "test")
                                    for s in seeds for m in args.methods if s in seeds_of(preset, m)])


# ---------------------------------------------------------------------------------------------------------------------
# studies at fixed settings: SMI's reading on trial, and the batch size
# ---------------------------------------------------------------------------------------------------------------------

#: The configurations of the ``trial`` phase, fixed before its runs (docs/RESULTS.md, "SMI's reading on trial"):
#: name -> (method, lr, extra settings); ``None`` for SimCLR: its validation choice (lr phase, then ``simclr``).
TRIAL_CONFIGS: Dict[str, Tuple[str, Optional[float], Optional[Dict[str, Any]]]] = {
    "smi": ("smi", 1.0, {"neg_weight": 64.0, "eps": 1e-3}),                      # the library defaults
    "smi-w16": ("smi", 1.0, {"neg_weight": 16.0, "eps": 1e-3}),
    "feature_row": ("smi", 1.0, {"neg_weight": 64.0, "eps": 1e-3, "standardize": "feature_row"}),
    "feature_row-w16": ("smi", 1.0, {"neg_weight": 16.0, "eps": 1e-3, "standardize": "feature_row"}),
    "logmeanexp-w16": ("smi", 1.0, {"neg_weight": 16.0, "eps": 1e-3, "negatives": "logmeanexp"}),
    "smi-square": ("smi-square", 1.0, {"neg_weight": 64.0}),
    "simclr": ("simclr", None, None),
    "barlow": ("barlow", 1.0, {}),
    "vicreg": ("vicreg", 3.0, {}),
}
#: the configurations the batch phase runs by default (``--configs`` adds SMI's best variant)
BATCH_CONFIGS = ["smi", "barlow", "simclr"]


def config_settings(args, preset, names: Sequence[str]) -> Dict[str, Tuple[str, float, Dict[str, Any]]]:
    """``{name: (method, lr, extra)}`` of trial configurations; SimCLR's from its validation records."""
    out = {}
    for name in names:
        method, lr, extra = TRIAL_CONFIGS[name]
        if lr is None:
            val = val_records(args)
            lr, extra = final_settings(val, selection_steps(val, preset), [method], _select(args))[method]
        out[name] = (method, lr, dict(extra))
    return out


def phase_trial(args, preset, splits):
    """Every trial configuration (``--configs``, default all but VICReg) at the final budget on the test split,
    ``trial_seeds`` seeds, seed-major (every configuration's seed 0 first)."""
    names = getattr(args, "configs", None) or [n for n in TRIAL_CONFIGS if n != "vicreg"]
    chosen = config_settings(args, preset, names)
    run_jobs(args, preset, splits, [(m, lr, s, preset["final_steps"], extra, "test")
                                    for s in preset["trial_seeds"] for m, lr, extra in chosen.values()])


def batch_extra(preset, batch: int) -> Tuple[int, Dict[str, Any]]:
    """(steps, extra settings) of a batch-phase run: the final budget's epochs at ``batch`` images per step, the
    warmup as long in images; the learning rate is per 256 images, so it scales linearly with the batch."""
    base = preset["train"]["batch_size"]
    steps = max(1, round(preset["final_steps"] * base / batch))
    return steps, {"batch_size": int(batch), "warmup_steps": max(1, round(preset["train"]["warmup_steps"] * base /
                                                                           batch))}


def batch_study_run(record) -> bool:
    """Whether a run record is one of the batch-size study's (its settings name another ``batch_size``): its step
    count is not the final budget's, so the final runs' curves and spatial maps leave it out."""
    return "batch_size" in record["extra"]


def phase_batch(args, preset, splits):
    """The small-batch claim: trial configurations (``--configs``, default smi, barlow, simclr) at each of the
    preset's ``batch_sizes`` at equal epochs, ``batch_seeds`` seeds; the batch-``batch_size`` rows are the trial's."""
    names = getattr(args, "configs", None) or BATCH_CONFIGS
    chosen = config_settings(args, preset, names)
    jobs = []
    for s in preset["batch_seeds"]:
        for b in preset["batch_sizes"]:
            steps, bx = batch_extra(preset, b)
            jobs += [(m, lr, s, steps, dict(extra, **bx), "test") for m, lr, extra in chosen.values()]
    run_jobs(args, preset, splits, jobs)


# ---------------------------------------------------------------------------------------------------------------------
# transfer and spatial localisation of the final backbones
# ---------------------------------------------------------------------------------------------------------------------

def transfer_splits(args) -> Tuple[List[str], List[str]]:
    """The labelled training and test shards of ``--transfer-dir`` (``train-*.tar*`` / ``test-*.tar*``)."""
    d = Path(args.transfer_dir)
    train, test = (sorted(str(p) for p in d.glob(f"{split}-*.tar*")) for split in ("train", "test"))
    if not train or not test:
        raise SystemExit(f"no train-*.tar / test-*.tar shards in {d}; pass --transfer-dir (a labelled set, e.g. "
                         f"../shared/data/flowers12)")
    return train, test


def floor_name(preset) -> str:
    t = preset["train"]
    return f"random-init_{t['model']}{'-cifar' if t['cifar_stem'] else ''}"


def final_exports(args, preset) -> List[Tuple[Dict[str, Any], Path]]:
    """``(test record, export folder)`` of every final run of ``--out`` whose exported backbone is still there."""
    found = []
    for r in load_records(Path(args.out), "test"):
        if r["method"] in args.methods:
            export = export_dir(args.out, r["run_id"])
            if export.is_dir():
                found.append((r, export))
            else:
                print(f"[transfer] skipped {r['run_id']}: its export {export} is gone", flush=True)
    return found


def phase_transfer(args, preset):
    """Every final run's exported backbone, and the random-init floor, frozen, on the transfer set: kNN (k=20 and
    k=5, T=0.1) and the linear probe at the pretraining resolution and at 64 px. One record per backbone
    (``OUT/runs/*_transfer.json``)."""
    from smi_timm.eval import EvalSettings
    from smi_timm.eval.transfer import run_transfer
    from smi_timm.resolve import BackboneSource

    train, test = transfer_splits(args)
    t = preset["train"]
    sizes = [s or t["image_size"] for s in preset["transfer_sizes"]]
    jobs = [(r["run_id"], str(e), dict(method=r["method"], lr=r["lr"], seed=r["seed"], steps=r["steps"],
                                       extra=r["extra"])) for r, e in final_exports(args, preset)]
    jobs.append((floor_name(preset), "random", dict(method="random-init", lr=None, seed=0, steps=0, extra={})))
    i, n = parse_shard(getattr(args, "shard", None))
    for k, (name, weights, fields) in enumerate(jobs):
        path = Path(args.out) / "runs" / f"{name}_transfer.json"
        if k % n != i or path.is_file():
            continue
        settings = EvalSettings(k=TRANSFER_KS[0], extra_k=TRANSFER_KS[1:], T=0.1, probe_epochs=preset["probe_epochs"],
                                workers=t["workers"], progress=False, cache_dir=str(Path(args.out) / "features"),
                                max_batches=preset.get("transfer_max_batches"))
        source = BackboneSource.of(weights, model=t["model"], cifar_stem=t["cifar_stem"])
        res = run_transfer(source, train, test, settings, image_sizes=sizes)
        record = dict(fields, run_id=name, eval="transfer", transfer=res, date=str(date.today()),
                      hardware=hardware(_device()))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
        print(f"[{name} transfer] " + "; ".join(
            f"{ev['image_size']} px: kNN k=20 {ev['knn']['k=20']['top1']:.2f}, linear {ev['linear']['top1']:.2f}"
            for ev in res["evals"]), flush=True)


def phase_spatial(args, preset):
    """Spatial concentration of the last feature map of each method's seed-0 final backbone (largest budget, the
    batch-size study's runs left out) and of the random-init floor, on the transfer test images at ``spatial_size``
    px: ``OUT/spatial/spatial.json`` and ``spatial.png`` (:func:`smi_timm.spatial.run_spatial`). Each backbone row
    names its ``run_id``; the rows of an earlier ``spatial.json`` whose backbone has been removed since are kept
    (``"kept": true``; the plot shows the backbones measured now)."""
    from smi_timm.layout import write_json_atomic
    from smi_timm.spatial import run_spatial

    _, test = transfer_splits(args)
    finals = [(r, e) for r, e in final_exports(args, preset) if r["seed"] == 0 and not batch_study_run(r)]
    if not finals:
        raise SystemExit("no final-run export in --out; run --phase final first")
    budget = max(r["steps"] for r, _ in finals)
    sources, labels, run_ids = [], [], []
    runs = [r for r in load_records(Path(args.out), "test")
            if r["seed"] == 0 and r["steps"] == budget and not batch_study_run(r)]
    for method in args.methods:
        # a method run at several settings (a trial, each criterion's choice), exported or not: the settings name them
        named = sum(r["method"] == method for r in runs) > 1
        for r, e in finals:
            if r["method"] == method and r["steps"] == budget:
                sources.append(str(e))
                labels.append(f"{method} ({settings_text(r['lr'], r['extra'])})" if named else method)
                run_ids.append(r["run_id"])
    t = preset["train"]
    sources.append("random")
    labels.append("random init")
    out = Path(args.out) / "spatial"
    earlier = json.loads((out / "spatial.json").read_text())["backbones"] if (out / "spatial.json").is_file() else []
    res = run_spatial(sources, test, out, labels=labels, image_size=preset["spatial_size"],
                      num_samples=preset.get("spatial_samples", 256), model=t["model"], cifar_stem=t["cifar_stem"],
                      workers=t["workers"])
    for b, rid in zip(res["backbones"], run_ids + [None]):
        b["run_id"] = rid
        print(f"[spatial] {b['label']}: map {b['map_size']}, norm top-20% mass {b['norm']['top_mass']:.3f}, "
              f"entropy {b['norm']['entropy']:.3f}", flush=True)
    kept = [dict(b, run_id=rid, kept=True) for b, rid in ((b, spatial_run_id(b)) for b in earlier)
            if rid not in run_ids + [None] and not export_dir(args.out, rid).is_dir()]
    if kept:
        print(f"[spatial] kept {len(kept)} earlier row(s) whose backbone is gone: "
              f"{', '.join(b['label'] for b in kept)}", flush=True)
    res["backbones"] = res["backbones"][:-1] + kept + res["backbones"][-1:]
    write_json_atomic(out / "spatial.json", res, sort_keys=False)  # the rows now name their run


def spatial_run_id(row: Dict[str, Any]) -> Optional[str]:
    """The harness run a row of ``spatial.json`` measured (``None``: the random-init floor); rows written before
    they named it are identified by their export folder, ``OUT/train/RUN_ID/export``."""
    if "run_id" in row:
        return row["run_id"]
    return None if row["weights"].startswith("random") else Path(row["weights"]).parent.name


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------

def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _metric(record, key, field, rep="features"):
    return ((record.get(key) or {}).get(rep) or {}).get(field)


def _fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def _extra_text(extra) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in sorted(extra.items())) \
        or "–"


def settings_text(lr: Optional[float], extra: Dict[str, Any]) -> str:
    """``lr 1, eps 0.01, neg_weight 64``: one run's settings as every table and label writes them (``–`` for the
    random-init floor)."""
    return "–" if lr is None else f"lr {lr:g}" + (f", {_extra_text(extra)}" if extra else "")


def settings_groups(args, records) -> List[List[Dict[str, Any]]]:
    """``records`` grouped by (method, lr, extra settings), in the order of ``--methods`` (then random init), then
    by learning rate: the runs one mean ± std is taken over (their seeds)."""
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["lr"] or 0.0, json.dumps(r["extra"], sort_keys=True)), []).append(r)
    order = {m: i for i, m in enumerate([*args.methods, "random-init"])}
    keys = sorted((k for k in groups if k[0] in order), key=lambda k: (order[k[0]], k[1], k[2]))
    return [sorted(groups[k], key=lambda r: r["seed"]) for k in keys]


def _accuracy_tables(args, test) -> List[str]:
    lines = []
    for steps in sorted({r["steps"] for r in test}, reverse=True):
        rs_all = [r for r in test if r["steps"] == steps]
        cfg = rs_all[0].get("config") or {}
        epochs = steps * cfg["batch_size"] / cfg["epoch_samples"] if cfg.get("epoch_samples") else None
        lines += [f"## Accuracy on the CIFAR-10 test split, {steps} steps"
                  + (f" ({epochs:.1f} epochs)" if epochs else "") + " (mean ± std over seeds)", "",
                  "Runs ran on: " + "; ".join(sorted({r.get("hardware", "not recorded") for r in rs_all})) + ". "
                  "Settings chosen by: " + "; ".join(sorted({r.get("selection") or "validation kNN (records before "
                                                             "the linear criterion)" for r in rs_all})) + ".", "",
                  "| method | lr | extra | seeds | kNN k=200 top-1 | kNN k=20 top-1 | linear top-1 | RankMe | "
                  "alignment | uniformity | train min / run |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for rs in settings_groups(args, rs_all):
            if rs:
                m = {f: mean_std([_metric(r, "test_metrics", f) for r in rs])
                     for f in ("rankme", "alignment", "uniformity")}
                method = rs[0]["method"]
                lines.append(f"| {method} | {rs[0]['lr']:g} | {_extra_text(rs[0]['extra'])} | {len(rs)} | "
                             f"{mean_std([r['knn200_top1'] for r in rs])} | {mean_std([r['knn20_top1'] for r in rs])} "
                             f"| {mean_std([r['linear_top1'] for r in rs])} | {m['rankme']} | {m['alignment']} | "
                             f"{m['uniformity']} | {statistics.mean(r['train_seconds'] for r in rs) / 60:.1f} |")
        lines.append("")
    return lines


def _transfer_table(args, transfer) -> List[str]:
    if not transfer:
        return []
    first = transfer[0]["transfer"]
    sizes = [ev["image_size"] for ev in first["evals"]]
    cols = [(i, kind) for i in range(len(sizes)) for kind in [*(f"k={k}" for k in first["ks"]), "linear"]]
    lines = [f"## Transfer: frozen backbones on {first['test_label']} (mean ± std over seeds)", "",
             f"Training images {first['evals'][0]['num_train']}, test images {first['evals'][0]['num_test']}, "
             f"{first['evals'][0]['num_classes']} classes; kNN T={first['T']:g}; linear probe "
             f"{first['probe']['epochs']} epochs. Runs ran on: "
             + "; ".join(sorted({r.get("hardware", "not recorded") for r in transfer})) + ".", "",
             "| method | settings | steps | seeds | " + " | ".join(
                 f"{'kNN ' + kind if kind != 'linear' else 'linear'} @{sizes[i]}" for i, kind in cols) + " |",
             "|---|---|---:|---:|" + "---:|" * len(cols)]
    for steps in sorted({r["steps"] for r in transfer if r["steps"]}, reverse=True) + [0]:
        for rs in settings_groups(args, [r for r in transfer if r["steps"] == steps]):
            cells = []
            for i, kind in cols:
                vals = [(r["transfer"]["evals"][i]["linear"] if kind == "linear"
                         else r["transfer"]["evals"][i]["knn"][kind])["top1"] for r in rs]
                cells.append(mean_std(vals))
            lines.append(f"| {rs[0]['method']} | {settings_text(rs[0]['lr'], rs[0]['extra'])} | {steps or '–'} | "
                         f"{len(rs)} | " + " | ".join(cells) + " |")
    return lines


def _lr_table(args, val, steps) -> List[str]:
    lrs = sorted({r["lr"] for r in val if not r["extra"] and r["steps"] == steps})
    if not lrs:
        return []
    lines = [f"## Learning-rate sweep, {steps} steps (validation top-1: kNN / linear probe; bank train-000000, "
             f"queries train-000004)", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen (kNN) | chosen (linear) |",
             "|---|" + "---:|" * (len(lrs) + 2)]
    for method in args.methods:
        cells = []
        for lr in lrs:
            r = [x for x in val if x["method"] == method and x["lr"] == lr and not x["extra"] and x["steps"] == steps]
            cells.append(f"{_fmt(score(r[0], 'knn'))} / {_fmt(score(r[0], 'linear'))}" if r else "–")
        chosen = [_safe(lambda c=c, m=method: f"{best_lr(val, m, steps, c):g}") for c in ("knn", "linear")]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {chosen[0]} | {chosen[1]} |")
    return lines


def _safe(fn) -> str:
    try:
        return fn()
    except SystemExit:
        return "–"


def _smi_tables(preset, val, steps) -> List[str]:
    grid = [x for x in val if is_smi_sweep(x) and x["steps"] == steps]
    if not grid:
        return []
    # the grid ran at the learning rate(s) with the most runs; the other runs are the learning-rate re-check
    counts = {lr: sum(1 for x in grid if x["lr"] == lr) for lr in {x["lr"] for x in grid}}
    grid_lrs = sorted(lr for lr, c in counts.items() if c == max(counts.values()) or c >= 3)
    lines = []
    for lr in grid_lrs:
        nws = sorted({x["extra"]["neg_weight"] for x in grid if x["lr"] == lr})
        epss = sorted({x["extra"].get("eps") for x in grid if x["lr"] == lr}, reverse=True)
        lines += [f"## SMI neg_weight × eps sweep at lr {lr:g} (validation top-1: kNN / linear probe)", "",
                  "| neg_weight | " + " | ".join(f"eps {e:g}" for e in epss) + " |", "|---:|" + "---:|" * len(epss)]
        for nw in nws:
            cells = []
            for eps in epss:
                r = [x for x in grid if x["lr"] == lr and x["extra"] == {"neg_weight": nw, "eps": eps}]
                cells.append(f"{_fmt(score(r[0], 'knn'))} / {_fmt(score(r[0], 'linear'))}" if r else "–")
            lines.append(f"| {nw:g} | " + " | ".join(cells) + " |")
        lines.append("")
    recheck = sorted((x for x in grid if x["lr"] not in grid_lrs),
                     key=lambda x: (x["lr"], sorted(x["extra"].items())))
    if recheck:
        lines += ["SMI learning-rate re-check at the chosen pair (validation kNN / linear): " + "; ".join(
            f"{settings_text(x['lr'], x['extra'])}: {_fmt(score(x, 'knn'))} / {_fmt(score(x, 'linear'))}"
            for x in recheck) + ".", ""]
    return lines


def _choice_table(args, val, steps) -> List[str]:
    lines = ["## Chosen settings under each criterion", "",
             "| criterion | " + " | ".join(args.methods) + " |", "|---|" + "---|" * len(args.methods)]
    for criterion in ("knn", "linear"):
        cells = []
        for m in args.methods:
            try:
                lr, extra = final_settings(val, steps, [m], criterion)[m]
                cells.append(settings_text(lr, extra))
            except SystemExit:
                cells.append("–")
        lines.append(f"| validation {criterion} | " + " | ".join(cells) + " |")
    return lines


def _sweep_metrics_table(val, steps) -> List[str]:
    rs = [r for r in val if r["steps"] == steps and r.get("val_metrics")]
    if not rs:
        return []
    lines = ["## Every sweep run: validation scores and representation metrics (backbone features)", "",
             f"Metrics on {rs[0].get('metric_samples', '?')} validation images ({rs[0].get('metric_views', '')}); "
             f"alignment lower = more invariant, uniformity lower = more uniform.", "",
             "| method | lr | extra | val kNN | val linear | RankMe | eff. rank | alignment | uniformity | "
             "redundancy |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rs, key=lambda r: (r["method"], r["lr"], sorted(r["extra"].items()))):
        g = {f: _metric(r, "val_metrics", f) for f in ("rankme", "effective_rank", "alignment", "uniformity",
                                                         "redundancy")}
        lines.append(f"| {r['method']} | {r['lr']:g} | {_extra_text(r['extra'])} | {_fmt(score(r, 'knn'))} | "
                     f"{_fmt(score(r, 'linear'))} | {_fmt(g['rankme'], '.1f')} | {_fmt(g['effective_rank'], '.1f')} | "
                     f"{_fmt(g['alignment'], '.3f')} | {_fmt(g['uniformity'], '.3f')} | "
                     f"{_fmt(g['redundancy'], '.3f')} |")
    return lines


def _investigation_table(val) -> List[str]:
    variants = [x for x in val if "projector" in x["extra"]]
    if not variants:
        return []
    lines = ["## Investigation: projector width at the chosen settings (validation top-1: kNN / linear)", "",
             "| method | lr | settings | projector | val kNN | val linear |", "|---|---:|---|---|---:|---:|"]
    for x in sorted(variants, key=lambda x: (x["method"], x["extra"]["projector"])):
        rest = {k: v for k, v in x["extra"].items() if k != "projector"}
        lines.append(f"| {x['method']} | {x['lr']:g} | {_extra_text(rest)} | {x['extra']['projector']} | "
                     f"{_fmt(score(x, 'knn'))} | {_fmt(score(x, 'linear'))} |")
    return lines


def _spatial_table(out: Path) -> List[str]:
    path = out / "spatial" / "spatial.json"
    if not path.is_file():
        return []
    res = json.loads(path.read_text())
    lines = [f"## Spatial concentration of the last feature map ({res['num_images']} transfer test images at "
             f"{res['image_size']} px; [PNG](spatial/spatial.png))", "",
             f"top-{res['top_frac']:.0%} mass: share of the map's mass in the top {res['top_frac']:.0%} of locations "
             f"(uniform map: {res['backbones'][0]['uniform_top_mass']:.2f}); entropy: normalised spatial entropy "
             f"(1 = uniform). Mean ± std over images.", "",
             "| backbone | map | norm: top mass | norm: entropy | cosine: top mass | cosine: entropy |",
             "|---|---|---:|---:|---:|---:|"]
    for b in res["backbones"]:
        n, c = b["norm"], b["cosine"]
        lines.append(f"| {b['label']} | {b['map_size'][0]}×{b['map_size'][1]} | {n['top_mass']:.3f} ± "
                     f"{n['top_mass_std']:.3f} | {n['entropy']:.3f} ± {n['entropy_std']:.3f} | {c['top_mass']:.3f} ± "
                     f"{c['top_mass_std']:.3f} | {c['entropy']:.3f} ± {c['entropy_std']:.3f} |")
    return lines


# -- the trial and the batch-size study ------------------------------------------------------------------------------

def _matches(record, method, lr, extra) -> bool:
    return record["method"] == method and record["lr"] == lr and record["extra"] == extra


def _trial_settings(args, preset) -> Dict[str, Tuple[str, float, Dict[str, Any]]]:
    """The trial configurations' (method, lr, extra), SimCLR at its validation choice (left out before its sweep)."""
    names = list(TRIAL_CONFIGS)
    try:
        return config_settings(args, preset, names)
    except SystemExit:  # no SimCLR sweep yet
        return config_settings(args, preset, [n for n in names if n != "simclr"])


def trial_groups(args, preset, records) -> Dict[str, List[Dict[str, Any]]]:
    """``{trial configuration: its test records at the final budget and the preset's batch}`` (configurations
    without records are left out)."""
    out = {}
    for name, (method, lr, extra) in _trial_settings(args, preset).items():
        rs = [r for r in records if r["steps"] == preset["final_steps"] and _matches(r, method, lr, extra)]
        if rs:
            out[name] = sorted(rs, key=lambda r: r["seed"])
    return out


def _flowers_linear(transfer, run_ids) -> List[float]:
    """Per run: the flowers12 linear probe averaged over the transfer sizes (the rule's transfer number)."""
    by_id = {r["run_id"]: r for r in transfer}
    vals = []
    for rid in run_ids:
        t = by_id.get(rid)
        if t is not None:
            evals = t["transfer"]["evals"]
            vals.append(statistics.mean(ev["linear"]["top1"] for ev in evals))
    return vals


def _pooled_std(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    if len(a) < 2 or len(b) < 2:
        return None
    return math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2)


def default_rule(default: List[Dict[str, Any]], variant: List[Dict[str, Any]], transfer) -> Dict[str, Any]:
    """The rule stated in docs/RESULTS.md before the trial: a variant becomes the default only if, over 2 seeds, its
    mean beats the default's by more than twice the pooled seed standard deviation on kNN (k=200) **and** the linear
    probe, and its flowers12 linear probe (mean over the sizes) is not below the default's by more than twice the
    pooled standard deviation of that number."""
    out: Dict[str, Any] = {"seeds": (len(default), len(variant))}
    verdicts = []
    for key in ("knn200_top1", "linear_top1"):
        a, b = [r[key] for r in default], [r[key] for r in variant]
        sd = _pooled_std(a, b)
        gain = statistics.mean(b) - statistics.mean(a) if a and b else None
        out[key] = dict(gain=gain, pooled_std=sd, passes=None if sd is None else gain > 2 * sd)
        verdicts.append(out[key]["passes"])
    fa = _flowers_linear(transfer, [r["run_id"] for r in default])
    fb = _flowers_linear(transfer, [r["run_id"] for r in variant])
    sd = _pooled_std(fa, fb)
    gain = statistics.mean(fb) - statistics.mean(fa) if fa and fb else None
    out["flowers12_linear"] = dict(gain=gain, pooled_std=sd, passes=None if sd is None else gain >= -2 * sd)
    verdicts.append(out["flowers12_linear"]["passes"])
    # all three must pass: one measured failure decides, a missing number (one seed, no flowers12) leaves it open
    out["becomes_default"] = False if False in verdicts else (None if None in verdicts else True)
    return out


def _trial_table(args, preset, test, transfer, out: Path) -> List[str]:
    groups = trial_groups(args, preset, test)
    if not groups:
        return []
    spatial = {}
    path = out / "spatial" / "spatial.json"
    if path.is_file():
        spatial = {spatial_run_id(b): b["norm"]["top_mass"] for b in json.loads(path.read_text())["backbones"]}
    lines = [f"## SMI's reading on trial: {preset['final_steps']} steps, test split (mean ± std over seeds)", "",
             "Metrics on the test images' backbone features: RankMe; alignment (L2-normalised) and its centred form; "
             "cross-view correlation (mean over features of the Pearson correlation of the two views); flowers12: "
             "linear probe mean over the transfer sizes; spatial: top-20 % mass of the seed-0 backbone.", "",
             "| configuration | settings | seeds | kNN k=200 | linear | RankMe | alignment | alignment (centred) | "
             "cross-view corr. | flowers12 linear | spatial |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rs in groups.items():
        m = {f: mean_std([_metric(r, "test_metrics", f) for r in rs])
             for f in ("rankme", "alignment", "alignment_centered", "cross_view_corr")}
        flowers = mean_std(_flowers_linear(transfer, [r["run_id"] for r in rs]))
        sp = next((spatial[r["run_id"]] for r in rs if r["seed"] == 0 and r["run_id"] in spatial), None)
        lines.append(f"| {name} | {settings_text(rs[0]['lr'], rs[0]['extra'])} | {len(rs)} | "
                     f"{mean_std([r['knn200_top1'] for r in rs])} | {mean_std([r['linear_top1'] for r in rs])} | "
                     f"{m['rankme']} | {m['alignment']} | {m['alignment_centered']} | {m['cross_view_corr']} | "
                     f"{flowers} | {_fmt(sp, '.3f')} |")
    if "smi" in groups:
        lines += ["", "The rule for the default (docs/RESULTS.md): gain of the mean over today's default, against "
                      "twice the pooled seed standard deviation.", "",
                  "| configuration | kNN gain (2σ) | linear gain (2σ) | flowers12 gain (−2σ allowed) | becomes the "
                  "default |", "|---|---:|---:|---:|---|"]
        for name, rs in groups.items():
            if name == "smi" or rs[0]["method"] not in ("smi", "smi-square"):
                continue
            rule = default_rule(groups["smi"], rs, transfer)
            verdict = {None: "not decided (needs 2 seeds with flowers12 each)", True: "yes",
                       False: "no (fails a measured condition)"}[rule["becomes_default"]]
            lines.append(f"| {name} | {_rule_cell(rule['knn200_top1'])} | {_rule_cell(rule['linear_top1'])} | "
                         f"{_rule_cell(rule['flowers12_linear'])} | {verdict} |")
    return lines


def _rule_cell(v: Dict[str, Any]) -> str:
    if v["gain"] is None:
        return "–"
    return f"{v['gain']:+.2f} ({_fmt(None if v['pooled_std'] is None else 2 * v['pooled_std'])})"


def batch_records(args, preset, test) -> Dict[str, Dict[int, Dict[str, Any]]]:
    """``{configuration: {batch size: seed-0 test record}}`` at equal epochs (the preset's batch: the trial's)."""
    base = preset["train"]["batch_size"]
    out: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for name, (method, lr, extra) in _trial_settings(args, preset).items():
        for b in [*preset.get("batch_sizes", []), base]:
            steps, bx = batch_extra(preset, b) if b != base else (preset["final_steps"], {})
            rs = [r for r in test if r["seed"] == 0 and r["steps"] == steps and _matches(r, method, lr,
                                                                                        dict(extra, **bx))]
            if rs:
                out.setdefault(name, {})[b] = rs[0]
    return {k: v for k, v in out.items() if len(v) > 1}


def _batch_table(args, preset, test, out: Path) -> List[str]:
    recs = batch_records(args, preset, test)
    if not recs:
        return []
    sizes = sorted({b for v in recs.values() for b in v})
    epochs = preset["final_steps"] * preset["train"]["batch_size"] / preset["train"]["epoch_samples"]
    lines = [f"## Linear probe (kNN k=200) against the batch size, {epochs:.1f} epochs, seed 0 "
             f"([plot](batch_size.png))", "",
             "| configuration | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for name, by_b in recs.items():
        cells = [f"{by_b[b]['linear_top1']:.2f} ({by_b[b]['knn200_top1']:.2f})" if b in by_b else "–" for b in sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    from matplotlib.figure import Figure

    from smi_timm.curves import save_figure

    fig = Figure(figsize=(5.2, 3.4))
    ax = fig.subplots()
    for name, by_b in recs.items():
        bs = sorted(by_b)
        ax.plot(bs, [by_b[b]["linear_top1"] for b in bs], marker="o", label=name)
    ax.set(xscale="log", xlabel="batch size (log)", ylabel="linear probe top-1 (%)",
           title=f"CIFAR-10, {epochs:.1f} epochs, equal epochs per batch size")
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xticks([], minor=True)  # the log axis' minor ticks would be labelled 2×10², 3×10², ...
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "batch_size.png")
    return lines


def curve_labels(records) -> Dict[str, Any]:
    """``{label: online monitor}``, one curve per run: ``method (seed S)``, with the settings in the label when the
    method ran at more than one (e.g. each criterion's choice), so no run hides another."""
    settings: Dict[str, set] = {}
    for r in records:
        settings.setdefault(r["method"], set()).add((r["lr"], json.dumps(r["extra"], sort_keys=True)))
    return {(r["method"] if len(settings[r["method"]]) == 1 else
             f"{r['method']} {settings_text(r['lr'], r['extra'])}") + f" (seed {r['seed']})": r["monitor"]
            for r in records}


def phase_report(args, preset):
    """``table.md`` from the run records, and ``knn_curves.png`` from the online monitor of the final runs at the
    largest budget at the preset's batch size."""
    from smi_timm.curves import plot_curves

    out = Path(args.out)
    val, test, transfer = val_records(args), load_records(out, "test"), load_records(out, "transfer")
    steps = selection_steps(val, preset) if val else preset["sweep_steps"]
    lines = [f"# CIFAR-10 comparison ({args.preset} preset)", "",
             f"Generated by `python benchmarks/compare_methods.py --preset {args.preset} --phase report` "
             f"(phases so far: those with rows below) on {hardware(_device())}; configuration: "
             f"`{json.dumps(preset['train'])}`.", ""]
    for section in (_trial_table(args, preset, test, transfer, out), _batch_table(args, preset, test, out),
                    _accuracy_tables(args, test), _transfer_table(args, transfer), _spatial_table(out),
                    _choice_table(args, val, steps) if val else [], _lr_table(args, val, steps),
                    _smi_tables(preset, val, steps), _sweep_metrics_table(val, steps), _investigation_table(val)):
        if section:
            lines += section + ([""] if section[-1] else [])
    (out / "table.md").write_text("\n".join(lines).rstrip() + "\n")
    print("\n".join(lines))
    budget = max((r["steps"] for r in test if not batch_study_run(r)), default=None)
    monitors = curve_labels([r for method in args.methods for r in test
                             if r["method"] == method and r["monitor"] and r["steps"] == budget])
    if monitors:
        plot_curves(monitors, out / "knn_curves.png", keys=("knn_top1",),
                    title=f"online kNN monitor (CIFAR-10 test), {budget} steps")
    print(f"wrote {out / 'table.md'}")


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------

PHASES = ["lr", "smi", "smi-lr", "simclr", "investigate", "final", "trial", "batch", "transfer", "spatial", "report",
          "all"]
#: studies at fixed settings, run only when named (not part of ``all``)
STUDY_PHASES = ("trial", "batch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--phase", choices=PHASES, nargs="+", default=["all"],
                   help="phase(s) to run, in the order of the list above (e.g. --phase transfer spatial report); "
                        "all: every phase but the studies trial and batch")
    p.add_argument("--configs", nargs="+", choices=list(TRIAL_CONFIGS),
                   help="trial / batch phases: the configurations to run (default: all but vicreg / "
                        + ", ".join(BATCH_CONFIGS) + ")")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="override the preset's batch sizes (batch phase)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--select", choices=sorted(CRITERIA), default="linear",
                   help="validation score that chooses the settings: linear probe (default, the paper's metric) or "
                        "kNN top-1 (k=200); the report shows the choices of both")
    p.add_argument("--shard", help="I/N: run only configurations I, I+N, ... of the phase (N processes in parallel, "
                                   "one phase at a time)")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--transfer-dir", default=str(REPO.parent / "shared" / "data" / "flowers12"),
                   help="labelled train-*.tar / test-*.tar shards of the transfer and spatial phases "
                        "(default ../shared/data/flowers12)")
    p.add_argument("--out", default=None, help="output folder (default results/<date>-<preset>)")
    p.add_argument("--final-steps", type=int, help="override the preset's final budget")
    p.add_argument("--sweep-steps", type=int, help="override the preset's sweep budget")
    p.add_argument("--seeds", type=int, nargs="+", help="final, trial and batch phases: the seeds of every method "
                                                        "(default: the preset's)")
    p.add_argument("--eval-every", type=int, help="override the preset's online-monitor interval (final phase)")
    p.add_argument("--lrs", type=float, nargs="+", help="override the preset's learning-rate grid")
    p.add_argument("--neg-weights", type=float, nargs="+", help="override the SMI neg_weight values of the sweep")
    p.add_argument("--epss", type=float, nargs="+", help="override the SMI eps values of the sweep")
    p.add_argument("--workers", type=int,
                   help="override the preset's data-loader workers (speed only; shards are split across workers, "
                        "so the order in which images arrive changes)")
    p.add_argument("--sweep-from", default=None,
                   help="folder whose runs/*_val.json records choose the final settings (default: --out), e.g. to "
                        "run the final phase on another machine from the sweeps run here")
    p.add_argument("--fixed-settings", action="store_true",
                   help="final phase without sweep records: every method at the preset's first learning rate, SMI "
                        "at the library's neg_weight / eps (a check of the harness, not a tuned comparison)")
    p.add_argument("--loss-backend", choices=["auto", "torch", "triton"], default=None,
                   help="SMI loss backend (default: the library's auto: Triton kernels on CUDA)")
    p.add_argument("--threads", type=int, help="torch threads of this process (default: torch's choice; 1 when "
                                               "two harness processes share two cores)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty())
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    parse_shard(args.shard)
    preset = json.loads(json.dumps(PRESETS[args.preset]))
    for key in ("final_steps", "sweep_steps", "seeds", "eval_every", "lrs", "neg_weights", "epss", "batch_sizes"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.seeds is not None:
        preset.update(final_seeds={}, trial_seeds=args.seeds, batch_seeds=args.seeds)
    if args.workers is not None:
        preset["train"]["workers"] = args.workers
    if args.loss_backend is not None:
        preset["smi_backend"] = args.loss_backend
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.out = args.out or str(REPO / "results" / f"{date.today()}-{args.preset}")
    # the folders whose paths go into the records, relative to the working directory: a record must not name the
    # machine it was made on
    args.out, args.transfer_dir = os.path.relpath(args.out), os.path.relpath(args.transfer_dir)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    wanted = set(args.phase) | ({p for p in PHASES[:-1] if p not in STUDY_PHASES} if "all" in args.phase else set())
    training = {"lr": phase_lr, "smi": phase_smi, "smi-lr": phase_smi_lr, "simclr": phase_simclr,
                "investigate": phase_investigate, "final": phase_final, "trial": phase_trial, "batch": phase_batch}
    if wanted & set(training):
        splits = data_splits(args, preset)
        for name, fn in training.items():
            if name in wanted and (name not in ("smi", "smi-lr", "simclr") or name.split("-")[0] in args.methods):
                fn(args, preset, splits)
    for name, fn in (("transfer", phase_transfer), ("spatial", phase_spatial), ("report", phase_report)):
        if name in wanted:
            fn(args, preset)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
