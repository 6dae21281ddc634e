"""Training speed of the quick start's configuration: this tree against an earlier revision, in one run.

Both versions train the quick start's configuration (``QUICKSTART`` of ``smi_timm.cli.quickstart``, or of
``smi_timm.quickstart`` in revisions before the command lines moved; each its own copy: same model, data, batch
and loader workers) for ``--steps`` steps in fresh subprocesses, alternating, ``--repeats`` times each; the speed is
the steps per second between the first and the last log step (so start-up, compilation and the first batches do not
count).
The earlier revision is extracted with ``git archive`` into a temporary folder and imported from there.

    python benchmarks/quickstart_speed.py --baseline-ref 71f0e37 --steps 80 --repeats 2
    python benchmarks/quickstart_speed.py --variants --repeats 1       # torch.compile / channels-last, end to end

Prints the speeds and writes ``benchmarks/results/quickstart_speed_cpu.json`` (``--out`` overrides), with the
hardware it ran on.

``--variants`` trains the whole quick start (``--steps``, default its 400 steps) of this tree eagerly with contiguous
tensors, with channels-last, with ``torch.compile`` and with both, in fresh subprocesses, alternating, and reports
the wall time of the training call end to end (model creation, compilation and data start-up included), the time to
the first log step and the steady steps per second (``benchmarks/results/quickstart_variants_cpu.json``). Every
run starts with empty compiler caches (``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``), so compilation is paid
in full, as on a first quick start.
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
from _common import environment, git_archive  # noqa: E402

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
cfg.update(json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
cfg.pop("eval_train", None); cfg.pop("eval_test", None)
start = time.perf_counter()
train(TrainConfig(**cfg), on_step=lambda step, record: stamps.append((step, time.perf_counter())))
end = time.perf_counter()
(s0, t0), (s1, t1) = stamps[0], stamps[-1]
print(json.dumps({"steps_per_s": (s1 - s0) / (t1 - t0), "timed_steps": s1 - s0, "wall_s": end - start,
                  "first_log_step_s": t0 - start, "first_log_step": s0}))
"""

#: eager: contiguous tensors, no compilation (the quick start's settings before channels-last became its default)
VARIANTS = {"eager": {"channels_last": False}, "channels_last": {"channels_last": True},
            "compile": {"compile": True, "channels_last": False}, "compile+channels_last": {"compile": True,
                                                                                           "channels_last": True}}


def extract(ref: str, into: Path) -> Path:
    """The package of revision ``ref`` in ``into``, importable as ``smi_timm`` (kernels mapped as when installed)."""
    git_archive(ref, ["smi_timm", "kernels"], into)
    (into / "smi_timm" / "kernels").symlink_to(into / "kernels", target_is_directory=True)
    return into


def one_run(tree: Path, steps: int, overrides: dict = None) -> dict:
    # fresh compiler caches: every run compiles from nothing, as a first quick start on a new machine does
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, PYTHONPATH=str(tree), TORCHINDUCTOR_CACHE_DIR=str(Path(cache) / "inductor"),
                   TRITON_CACHE_DIR=str(Path(cache) / "triton"))
        proc = subprocess.run([sys.executable, "-c", CHILD, str(steps), json.dumps(overrides or {})],
                              capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"quick-start run from {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--baseline-ref", help="git revision to compare with (e.g. 71f0e37)")
    mode.add_argument("--variants", action="store_true", help="this tree: default / channels-last / compile")
    p.add_argument("--steps", type=int, default=None, help="steps (default 80; --variants: the quick start's)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.variants:
        return run_variants(args)
    args.steps = args.steps or 80
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


def run_variants(args) -> int:
    from smi_timm.cli.quickstart import QUICKSTART

    steps = args.steps or QUICKSTART["max_steps"]
    runs = {name: [] for name in VARIANTS}
    for i in range(args.repeats):
        for name in VARIANTS if i % 2 == 0 else reversed(VARIANTS):
            res = one_run(REPO, steps, VARIANTS[name])
            runs[name].append(res)
            print(f"{name:22s} run {i + 1}: {res['wall_s']:6.1f} s end to end, first log step (step "
                  f"{res['first_log_step']}) at {res['first_log_step_s']:5.1f} s, {res['steps_per_s']:.3f} steps/s "
                  f"after it", flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "first_log_step_s", "steps_per_s")}
           for name, rs in runs.items()}
    base = med["eager"]["wall_s"]
    env = environment()
    print(f"\n{env['date']}, {env['hardware']}: the quick start ({steps} steps), median of {args.repeats}:")
    print("| variant | end to end s | vs eager | first log step s | steps/s after it |\n|---|---:|---:|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['wall_s']:.1f} | {base / m['wall_s']:.2f}x | {m['first_log_step_s']:.1f} | "
              f"{m['steps_per_s']:.3f} |")
    record = {**env, "steps": steps, "repeats": args.repeats, "variants": VARIANTS, "runs": runs, "median": med,
              "speedup_end_to_end": {name: base / m["wall_s"] for name, m in med.items()}}
    out = Path(args.out or REPO / "benchmarks" / "results" / "quickstart_variants_cpu.json")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
