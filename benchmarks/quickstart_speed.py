"""Training speed of the quick start's configuration: this tree against an earlier revision, in one run.

Both versions train the quick start's configuration (``QUICKSTART`` of ``smi_timm.cli.quickstart``, or of
``smi_timm.quickstart`` in revisions before the command lines moved; each its own copy: same model, data, batch
and loader workers) for ``--steps`` steps in fresh subprocesses, alternating, ``--repeats`` times each; the speed is
the steps per second between the first and the last log step (so start-up, compilation and the first batches do not
count).
The earlier revision is extracted with ``git archive`` into a temporary folder and imported from there.

    python benchmarks/quickstart_speed.py --baseline-ref 71f0e37 --steps 80 --repeats 2

Prints the speeds and writes ``benchmarks/results/quickstart_speed_cpu.json`` (``--out`` overrides), with the
hardware it ran on.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Run in the subprocess: train the quick-start configuration, time the log steps.
CHILD = """
import json, sys, tempfile, time
from smi_timm.train import TrainConfig, train
try:
    from smi_timm.cli.quickstart import QUICKSTART, QUICKSTART_LOSS_ARGS
    extra = dict(loss_args=QUICKSTART_LOSS_ARGS.get(QUICKSTART["loss"], {}))
except ImportError:  # revisions before smi_timm.cli
    from smi_timm.quickstart import QUICKSTART
    extra = {}
stamps = []
cfg = dict(QUICKSTART, max_steps=int(sys.argv[1]), log_every=10, save_every=0, progress=False, export=False,
           output_dir=tempfile.mkdtemp(), **extra)
cfg.pop("eval_train", None); cfg.pop("eval_test", None)
train(TrainConfig(**cfg), on_step=lambda step, record: stamps.append((step, time.perf_counter())))
(s0, t0), (s1, t1) = stamps[0], stamps[-1]
print(json.dumps({"steps_per_s": (s1 - s0) / (t1 - t0), "timed_steps": s1 - s0}))
"""


def extract(ref: str, into: Path) -> Path:
    """The package of revision ``ref`` in ``into``, importable as ``smi_timm`` (kernels mapped as when installed)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "smi_timm", "kernels"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "smi_timm" / "kernels").symlink_to(into / "kernels", target_is_directory=True)
    return into


def one_run(tree: Path, steps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(steps)], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"quick-start run from {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-ref", required=True, help="git revision to compare with (e.g. 71f0e37)")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    results = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"baseline": extract(args.baseline_ref, Path(tmp)), "current": REPO}
        for i in range(args.repeats):
            for name in ("baseline", "current") if i % 2 == 0 else ("current", "baseline"):
                res = one_run(trees[name], args.steps)
                results[name].append(res["steps_per_s"])
                print(f"{name:8s} run {i + 1}: {res['steps_per_s']:.3f} steps/s over {res['timed_steps']} steps",
                      flush=True)
    base, cur = statistics.median(results["baseline"]), statistics.median(results["current"])
    env = environment()
    record = {**env, "baseline_ref": args.baseline_ref, "steps": args.steps, "repeats": args.repeats,
              "steps_per_s": results, "median": {"baseline": base, "current": cur}, "ratio": cur / base}
    print(f"\n{env['date']}, {env['hardware']}: quick-start training, median steps/s: {args.baseline_ref} {base:.3f},"
          f" this tree {cur:.3f} (ratio {cur / base:.2f})")
    out = Path(args.out or REPO / "benchmarks" / "results" / "quickstart_speed_cpu.json")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
