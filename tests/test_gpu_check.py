"""benchmarks/gpu_check.sh in its CPU smoke mode: every section runs (tiny sizes), so the one GPU check cannot rot
between GPU rentals; its output obeys the GPU machine's limits (at most 8 files, a summary table)."""
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["env", "tests", "loss", "data", "r50", "vit", "cifar"]
FLOWERS = REPO.parent / "shared" / "data" / "flowers12"  # absent in a plain clone: section g skips its transfer


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, WORK_DIR=str(tmp_path / "work"), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["results.tgz", "summary.md"], files  # well within the 8 files a GPU call returns
    summary = (out / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in summary.splitlines()
            if line.startswith("| ") and line.count("|") == 4}
    expected = {name: "ok" for name in SECTIONS}
    if not FLOWERS.is_dir():  # the plain clone: section g runs without its transfer and spatial phases, and says so
        assert rows.get("cifar", "").startswith("ok (partly skipped: transfer and spatial: no flowers12 data"), rows
        rows["cifar"] = "ok"
    assert {name: rows.get(name) for name in SECTIONS} == expected, (rows, proc.stdout[-3000:])
    assert "| target | measured | wanted | result |" in summary  # the targets table (not judged in smoke mode)
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
    for expected in ("results/sections.tsv", "results/env.json", "results/bench_loss.json", "results/bench_data.json",
                     "results/r50_smi/train_summary.json", "results/r50_barlow/metrics.jsonl",
                     "results/vit_smi/train_summary.json", "results/summary.md"):
        assert expected in names, (expected, names)
