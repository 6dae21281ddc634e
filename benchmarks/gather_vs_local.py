"""SMI with the loss on the global batch (``--gather``) vs on each process's local batch, two processes.

With P processes of B images each, the local loss sees B positives and B(B−1) negative pairs per process; the
gathered loss sees the whole P·B × P·B dependency matrix (all-gather with gradients). This script trains the
comparison harness's ``cpu`` configuration with SMI at the settings its sweeps chose (``--sweep-from``), as 2
processes × 64 images (global batch 128, as in the harness), once each way, and scores each backbone with kNN
(k=200, T=0.1) on the harness's validation split (bank ``train-000000``, queries ``train-000004``). Batch norm
statistics are per process (64 images per view), unlike the harness's single process (128)::

    python benchmarks/gather_vs_local.py --sweep-from results/cifar10-cpu --out results/cifar10-cpu/gather

On a CPU-only machine the two processes use gloo (``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu``); with
GPUs they use one GPU each. Results: ``OUT/gather_<mode>_lrb<lr-biases>.json`` and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from smi_timm.eval import EvalSettings, run_knn

import compare_methods as harness  # benchmarks/ is on sys.path when this file runs as a script
from _common import hardware


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep-from", required=True, help="harness output folder whose runs/*_val.json chose SMI")
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", default=str(harness.REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--steps", type=int, default=None, help="default: the cpu preset's sweep budget")
    p.add_argument("--modes", nargs="+", default=["local", "gather"], choices=["local", "gather"])
    p.add_argument("--lr-biases", default="none",
                   help="LARS learning rate of biases and norms ('none': the weights' rate, as in the harness)")
    args = p.parse_args(argv)

    preset = harness.PRESETS["cpu"]
    steps = args.steps or preset["sweep_steps"]
    val = harness.load_records(Path(args.sweep_from), "val")
    lr, extra = harness.smi_choice(val, preset["sweep_steps"], "knn")  # by validation kNN, as the library defaults
    splits = harness.data_splits(argparse.Namespace(data_dir=args.data_dir), preset)
    t = preset["train"]
    nproc, per_rank = 2, t["batch_size"] // 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in args.modes:
        tag = f"{mode}_lrb{args.lr_biases.lower()}"
        record_path = out / f"gather_{tag}.json"
        if record_path.is_file():
            rows.append(json.loads(record_path.read_text()))
            continue
        run_dir = out / "train" / tag
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "smi_timm.cli.pretrain",
               "--model", t["model"], "--no-cifar-stem", "--image-size", str(t["image_size"]),
               "--projector", t["projector"], "--augment", t["augment"], "--batch-size", str(per_rank),
               "--workers", str(t["workers"]), "--optimizer", t["optimizer"], "--lr", str(lr),
               "--lr-biases", args.lr_biases,
               "--weight-decay", str(t["weight_decay"]), "--warmup-steps", str(t["warmup_steps"]),
               "--max-steps", str(steps), "--epoch-samples", str(t["epoch_samples"]), "--loss", "smi",
               "--neg-weight", str(extra.get("neg_weight", 1.0)), "--eps", str(extra.get("eps", 1e-3)),
               "--gather" if mode == "gather" else "--no-gather", "--seed", "0", "--log-every", "20",
               "--no-progress", "--save-every", str(steps), "--keep-last", "1", "--output-dir", str(run_dir),
               "--data", *splits["train"]]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "1"
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        train_s = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{mode} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        knn = run_knn(str(run_dir / "export"), splits["val_bank"], splits["val_query"],
                      EvalSettings(workers=1, progress=False))
        record = dict(mode=mode, processes=nproc, batch_per_process=per_rank, lr=lr, extra=extra, steps=steps,
                      lr_biases=None if args.lr_biases.lower() == "none" else float(args.lr_biases),
                      val_knn_top1=knn["top1"], val_knn_top5=knn["top5"], train_seconds=round(train_s, 1),
                      date=str(date.today()), hardware=hardware())
        record_path.write_text(json.dumps(record, indent=2))
        rows.append(record)
        print(f"[gather {mode}] val_knn_top1={knn['top1']}", flush=True)
    print(f"\nSMI, lr {lr:g}, {extra}, {steps} steps, {nproc} processes x {per_rank} images "
          "(validation kNN top-1: bank train-000000, queries train-000004)\n")
    print("| loss on | dependency matrix per loss | val kNN top-1 | train min |\n|---|---|---:|---:|")
    for r in rows:
        size = r["batch_per_process"] * (r["processes"] if r["mode"] == "gather" else 1)
        print(f"| {'global batch (--gather)' if r['mode'] == 'gather' else 'local batch'} | {size} × {size} | "
              f"{r['val_knn_top1']:.2f} | {r['train_seconds'] / 60:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
