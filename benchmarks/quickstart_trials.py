"""The trials that chose the quick start's SMI settings: short runs of the quick-start configuration, each scored
by kNN (k=200 and k=20, T=0.1) on the bundled test split against the same backbone randomly initialised.

    python benchmarks/quickstart_trials.py                 # the six settings below, 300 steps each
    python benchmarks/quickstart_trials.py --steps 100     # shorter

Each trial runs with one torch thread so that two can share a 2-core machine (``--jobs 2``). Prints a markdown
table and writes JSON (``--out``). The scores use the bundled *test* split, so they select a setting for the quick
start only; library defaults come from the validation-split sweep of ``benchmarks/compare_methods.py``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import environment

TRIALS = [
    {"neg_weight": 1.0, "eps": 1e-3, "lr": 0.3},
    {"neg_weight": 16.0, "eps": 1e-2, "lr": 0.3},
    {"neg_weight": 64.0, "eps": 1e-2, "lr": 0.3},
    {"neg_weight": 16.0, "eps": 1e-2, "lr": 1.0},
    {"neg_weight": 64.0, "eps": 1e-2, "lr": 1.0},
    {"neg_weight": 16.0, "eps": 1e-2, "lr": 3.0},
]

ONE = """
import json, sys, torch
torch.set_num_threads(1)
from smi_timm.cli.quickstart import QUICKSTART, knn_pretrained_vs_random
from smi_timm.train import TrainConfig, train
over, steps, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
s = dict(QUICKSTART, output_dir=out, progress=False, max_steps=steps, save_every=10 ** 9, export=False)
s.update(over)
res = train(TrainConfig.from_dict(s))
knn = knn_pretrained_vs_random(res.model.backbone, s["model"], s["cifar_stem"], s["image_size"], workers=0)
print(json.dumps({"settings": over, "knn": knn, "images_per_s": res.images_per_s}))
"""


def _trial(args_tuple):
    over, steps, tmp = args_tuple
    out = Path(tmp) / "_".join(f"{k}{v:g}" for k, v in over.items())
    proc = subprocess.run([sys.executable, "-c", ONE, json.dumps(over), str(steps), str(out)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--jobs", type=int, default=2, help="trials run at once (one torch thread each)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "quickstart_trials.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_trial, [(t, args.steps, tmp) for t in TRIALS]))
    lines = ["| neg_weight | eps | LARS lr | kNN k=200 top-1 | kNN k=20 top-1 | random init k=200 / k=20 |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s, p_, q = r["settings"], r["knn"]["pretrained"], r["knn"]["random_init"]
        lines.append(f"| {s['neg_weight']:g} | {s['eps']:g} | {s['lr']:g} | {p_['k200_top1']:.1f} | "
                     f"{p_['k20_top1']:.1f} | {q['k200_top1']:.1f} / {q['k20_top1']:.1f} |")
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    record = {"steps": args.steps, "environment": environment(), "results": results}
    Path(args.out).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
