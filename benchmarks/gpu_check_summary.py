"""The summary table of ``benchmarks/gpu_check.sh``: every section, its time, its numbers and its targets.

``python benchmarks/gpu_check_summary.py RESULTS_DIR [--smoke]`` reads what the sections wrote into RESULTS_DIR
(``sections.tsv``, ``env.json``, ``bench_loss.json``, ``bench_data.json``, the training runs' ``train_summary.json``
and ``metrics.jsonl``, the CIFAR table) and prints markdown. Benchmarks report their targets as a list of
``{"name", "value", "target", "passed"}`` records under the key ``targets``; this script adds the training targets
(issue: ResNet-50 with SMI at >= 1,300 two-view images/s on one H200 in bf16, data wait < 5 % of the step time, SMI's
step no slower than Barlow Twins' at 8192-d). In ``--smoke`` mode the numbers are the CPU's and the targets are not
judged.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

R50_IMAGES_PER_S = 1300.0
DATA_WAIT_MAX = 0.05


def _json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_loss(run: Path) -> Optional[float]:
    try:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    losses = [r["loss"] for r in rows if "loss" in r]
    return losses[-1] if losses else None


def _target(name: str, value: Optional[float], target: str, passed: Optional[bool]) -> Dict[str, Any]:
    return {"name": name, "value": value, "target": target, "passed": passed}


def training_targets(res: Path) -> List[Dict[str, Any]]:
    """The main job's targets, from the R50 runs of section e."""
    smi, barlow = _json(res / "r50_smi" / "train_summary.json"), _json(res / "r50_barlow" / "train_summary.json")
    out = []
    if smi:
        ips = smi.get("images_per_s")
        out.append(_target("R50 SMI two-view images/s (bf16, batch 256)", ips, f">= {R50_IMAGES_PER_S:.0f}",
                           None if ips is None else ips >= R50_IMAGES_PER_S))
        wait = smi.get("data_wait_frac")
        out.append(_target("R50 SMI share of step time waiting for data", wait, f"< {DATA_WAIT_MAX:.0%}",
                           None if wait is None else wait < DATA_WAIT_MAX))
        loss = _last_loss(res / "r50_smi")
        out.append(_target("R50 SMI last logged loss is finite", loss, "finite",
                           None if loss is None else math.isfinite(loss)))
    if smi and barlow and smi.get("step_time_ms") and barlow.get("step_time_ms"):
        ratio = smi["step_time_ms"] / barlow["step_time_ms"]
        out.append(_target("R50 step time SMI / Barlow Twins (8192-d)", round(ratio, 3), "<= 1.00", ratio <= 1.0))
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _runs_table(res: Path) -> List[str]:
    lines = ["| run | two-view images/s | step ms | data wait | peak GiB | last loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for run in sorted(p for p in res.iterdir() if p.is_dir() and (p / "train_summary.json").is_file()):
        s = _json(run / "train_summary.json") or {}
        peak = s.get("peak_mem_mib")
        lines.append(f"| {run.name} | {_fmt(s.get('images_per_s'))} | {_fmt(s.get('step_time_ms'))} | "
                     f"{_fmt(s.get('data_wait_frac'))} | {_fmt(None if peak is None else peak / 1024)} | "
                     f"{_fmt(_last_loss(run))} |")
    return lines if len(lines) > 2 else []


def summarize(res: Path, smoke: bool) -> str:
    env = _json(res / "env.json") or {}
    out = [f"# GPU check{' (CPU smoke mode: sizes are tiny, targets not judged)' if smoke else ''}", "",
           f"{env.get('date', '?')}, {env.get('gpu', env.get('hardware', '?'))}; torch {env.get('torch', '?')}, "
           f"triton {env.get('triton', '?')}, timm {env.get('timm', '?')}", "",
           "| section | status | seconds |", "|---|---|---:|"]
    try:
        rows = [line.split("\t") for line in (res / "sections.tsv").read_text().splitlines()[1:] if line.strip()]
    except OSError:
        rows = []
    out += [f"| {name} | {status} | {secs} |" for name, status, secs in rows]
    targets = []
    for name in ("bench_loss.json", "bench_data.json"):
        targets += (_json(res / name) or {}).get("targets", [])
    targets += training_targets(res)
    if targets:
        out += ["", "| target | measured | wanted | result |", "|---|---:|---|---|"]
        for t in targets:
            verdict = "not judged" if smoke or t.get("passed") is None else ("pass" if t["passed"] else "FAIL")
            out.append(f"| {t['name']} | {_fmt(t.get('value'))} | {t.get('target', '')} | {verdict} |")
    runs = _runs_table(res)
    if runs:
        out += ["", "Training runs (averages over the log windows after the first):", ""] + runs
    table = res / "cifar" / "table.md"
    if table.is_file():
        out += ["", "## CIFAR-10 (section g)", "", table.read_text().strip()]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="the results folder of a gpu_check.sh run")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    print(summarize(Path(args.results), args.smoke), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
