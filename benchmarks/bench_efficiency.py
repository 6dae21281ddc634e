"""Efficiency of SMI vs Barlow Twins (and VICReg): loss-only and full training-step time and peak memory.

For each projector width (2048-2048-2048 and 8192-8192-8192 by default) and batch size 256, measures in one run:

- loss only: forward + backward of the loss on random (N, D) embeddings;
- full step: forward of both views through the model (default resnet18 with the CIFAR stem at 32 px), loss,
  backward and a LARS step, i.e. what one training step costs, reported as two-view images/s;
- peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the baseline; on CPU the peak resident set size of
  a fresh subprocess per measurement above its own baseline after set-up (``ru_maxrss``), which includes allocator
  caching but is comparable between losses.

Prints a markdown table (with SMI / Barlow ratios) and writes JSON::

    python benchmarks/bench_efficiency.py                       # full grid on this machine
    python benchmarks/bench_efficiency.py --quick               # small smoke run
    python benchmarks/bench_efficiency.py --model resnet18 --no-cifar-stem --image-size 32
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from _common import environment, peak_mib, sync, time_ms, today

LOSSES = ("smi", "barlow", "vicreg")


def _peak_rss_mib() -> float:
    """Peak resident set size of this process (the CPU's only peak-memory counter; ``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(kind: str, loss_name: str, dim: int, batch: int, model_name: str, cifar_stem: bool, image_size: int,
            repeats: int, device: str, amp: str = "no") -> dict:
    """One measurement in this process: median time (ms; ``triton.testing.do_bench`` on CUDA) over ``repeats`` after
    warm-up, and peak memory (MiB).

    ``amp="bf16"`` runs the model forward under ``torch.autocast`` (CUDA), as ``--mixed-precision bf16`` training does.
    """
    from smi_timm.losses import create_loss
    from smi_timm.models import create_ssl_model
    from smi_timm.train.optim import build_optimizer

    dev = torch.device(device)
    torch.manual_seed(0)
    loss_fn = create_loss(loss_name)
    if kind == "loss":
        za = torch.randn(batch, dim, device=dev, requires_grad=True)
        zb = torch.randn(batch, dim, device=dev, requires_grad=True)

        def run():
            loss = loss_fn(za, zb)
            loss.backward()
    else:
        model = create_ssl_model(model_name, f"{dim}-{dim}-{dim}", cifar_stem=cifar_stem).to(dev)
        opt = build_optimizer(model, "lars", lr=0.2, weight_decay=1e-4, global_batch=batch)
        x = torch.randn(2 * batch, 3, image_size, image_size, device=dev)

        def run():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                _, emb = model(x)
            loss = loss_fn(*emb.chunk(2))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    sync(dev)
    if dev.type == "cuda":
        # one warm-up call (cuDNN algorithm choice, Triton compilation, the optimizer state), then the extra memory
        # of one steady-state call; do_bench's own cache-flush buffer is not part of what a training step needs
        peak = peak_mib(run, dev)
    else:  # the peak RSS of this fresh process above its baseline after set-up
        base = _peak_rss_mib()
        run()
        peak = _peak_rss_mib() - base
    ms = time_ms(run, dev, repeats, warmup=1)
    out = {"kind": kind, "loss": loss_name, "dim": dim, "batch": batch, "amp": amp, "ms": round(ms, 2),
           "peak_extra_mib": round(peak, 1)}
    if kind == "step":
        out["images_per_s"] = round(batch / (ms / 1e3), 2)
    return out


def _in_subprocess(args_list) -> dict:
    """Run one measurement in a fresh interpreter so that its peak RSS is its own."""
    proc = subprocess.run([sys.executable, __file__, "--_one", json.dumps(args_list)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {args_list} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[2048, 8192], help="projector widths")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["no", "bf16"], default="no",
                   help="bf16: model forward of the training step under autocast (CUDA)")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 32, width 256, 1 repeat")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/efficiency_<device>.json)")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one is not None:
        print(json.dumps(measure(*json.loads(args._one))))
        return 0
    if args.quick:
        args.dims, args.batch, args.repeats = [256], 32, 1
    rows = []
    for dim in args.dims:
        for kind in ("loss", "step"):
            for loss in args.losses:
                spec = [kind, loss, dim, args.batch, args.model, args.cifar_stem, args.image_size, args.repeats,
                        args.device, args.amp]
                res = _in_subprocess(spec) if args.device == "cpu" else measure(*spec)
                rows.append(res)
                print(json.dumps(res), flush=True)
    by = {(r["kind"], r["loss"], r["dim"]): r for r in rows}
    stem = "CIFAR stem" if args.cifar_stem else "standard stem"
    lines = ["| measurement | projector | " + " | ".join(f"{name} ms" for name in args.losses) +
             " | " + " | ".join(f"{name} peak MiB" for name in args.losses) +
             (" | Barlow / SMI time | Barlow / SMI memory |" if {"smi", "barlow"} <= set(args.losses) else " |"),
             "|---|---:|" + "---:|" * (2 * len(args.losses)) + ("---:|---:|" if {"smi", "barlow"} <= set(args.losses)
                                                                 else "")]
    for dim in args.dims:
        for kind in ("loss", "step"):
            label = "loss fwd+bwd" if kind == "loss" else f"train step ({args.model}, {stem}, {args.image_size} px)"
            cells = [f"{by[(kind, name, dim)]['ms']:.1f}" for name in args.losses]
            cells += [f"{by[(kind, name, dim)]['peak_extra_mib']:.0f}" for name in args.losses]
            line = f"| {label} | {dim}-{dim}-{dim} | " + " | ".join(cells) + " |"
            if {"smi", "barlow"} <= set(args.losses):
                s, b = by[(kind, "smi", dim)], by[(kind, "barlow", dim)]
                mem = (f"{b['peak_extra_mib'] / s['peak_extra_mib']:.2f}" if s["peak_extra_mib"] > 0 else "n/a")
                line += f" {b['ms'] / s['ms']:.2f} | {mem} |"
            lines.append(line)
    steps = [r for r in rows if r["kind"] == "step"]
    lines.append("")
    lines.append("Two-view images/s of the full step: " + "; ".join(
        f"{r['loss']} {r['dim']}: {r['images_per_s']:.1f}" for r in steps))
    table = "\n".join(lines)
    print()
    env = environment(args.device)
    print(f"{env['date']}, {env['hardware']}, device {args.device}, torch {env['torch']}, batch {args.batch}, "
          f"amp {args.amp}, threads {env['torch_threads']}")
    print(table)
    out = Path(args.out or Path(__file__).parent / "results" / f"efficiency_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": today(), "device": args.device, "environment": env,
                               "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "args": {k: v for k, v in vars(args).items() if k not in ("_one", "out")},
                               "rows": rows, "table": table}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
