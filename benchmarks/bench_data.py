"""Throughput of the SSL data loader: two-view samples/s, where the time goes, and the accelerator path's targets.

    python benchmarks/bench_data.py [--out runs/bench_data.json]                     # CPU: loader + per-stage table
    python benchmarks/bench_data.py --baseline-ref main --profile-only               # CPU: this tree vs a revision
    python benchmarks/bench_data.py --device cuda --make-shards DIR --count 4096 --out FILE   # GPU targets
    python benchmarks/bench_data.py --smoke --make-shards DIR --count 64             # seconds, CPU, both paths

``--make-shards DIR --count N``: writes N synthetic natural-looking JPEGs (smooth colour fields, shapes, texture and
noise; 256-400 px per side, quality 90; 10 classes) into ``DIR/images/<class>/`` and shards them with the
``smi-make-shards`` code path into ``DIR/shards/train-%06d.tar`` + ``train.json`` (kept for later runs: an existing
index with N samples is reused). Without it, the CPU mode writes 256 such images into a temporary folder.

CPU mode (default). The loader (``make_ssl_loader``, CPU path, batches delivered on the CPU and touched like a training
step would touch them) at 32 px (``cifar`` preset, the bundled CIFAR-10 sample) and 224 px (``byol``, the synthetic
shards), 1 and 2 workers: two-view samples/s of wall time and samples per CPU-second (user + system time of the
process and its workers, the per-core rate). Then a per-stage profile of the CPU path in one thread (CPU
microseconds per two-view sample), next to the per-sample ``torchvision.transforms.v2`` reference measured in the
same run, and the pre-rewrite pipeline's: measured in the same run with ``--legacy DIR`` (a copy of the old
``smi_timm/data``: ``git archive 71f0e37 smi_timm/data | tar -x -C DIR``, then ``--legacy DIR/smi_timm/data``),
otherwise taken from the record of such a run, ``benchmarks/results/bench_data_cpu.json``.

``--baseline-ref REF`` (CPU mode) measures the in-process profile of this tree and of the package at git revision
REF (``git archive REF smi_timm``) in one run: each in its own subprocess, alternately, ``--rounds`` times on the same
shards; per build the median over rounds of every stage and of the total. It prints the two-view 224-px samples per
CPU-second of both and the target of issue 24 (>= 250 on one core, decode + the full recipe + normalisation) with
pass / fail. ``--profile-only`` skips the loader rates.

CUDA mode (``--device cuda``): the accelerator path (workers read shards, nvJPEG decodes, batched ops augment on the
GPU) with 1 worker and with the default count, the device stage alone on pre-read batches, the CPU path for
comparison, and the split between decode and augmentation (CUDA events). Targets of issue 12, printed pass / fail
with the measured numbers: decode + augmentation >= 10,000 two-view 224-px samples/s on an H200, using <= 2 CPU
cores. The share of a ResNet-50 step spent waiting for data is measured by the training section of
``benchmarks/gpu_check.sh``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, environment, git_archive, sync  # noqa: E402

RECORD = Path(__file__).resolve().parent / "results" / "bench_data_cpu.json"  # has the before / after record
TARGET_RATE, TARGET_CORES = 10_000, 2.0
TARGET_CPU_RATE = 250.0  # two-view 224-px samples per CPU-second, in-process, one thread (issue 24)


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------------------------------


def synthetic_jpeg(index: int, sizes=(256, 400), quality: int = 90) -> bytes:
    """A natural-looking image: smooth colour field, a few soft-edged shapes, texture and sensor noise."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(index)
    h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
    field = rng.integers(0, 256, (max(2, h // 48), max(2, w // 48), 3), dtype=np.uint8)
    im = Image.fromarray(field).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(4, 10))):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    arr = np.asarray(im, dtype=np.int16) + rng.normal(0, 5, (h, w, 1)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_one(args) -> None:
    index, path, sizes = args
    Path(path).write_bytes(synthetic_jpeg(index, sizes))


def make_shards(folder: Path, count: int, sizes=(256, 400), workers: int = 0) -> str:
    """Synthetic image folder -> ``folder/shards/train-%06d.tar`` via ``write_shards`` (reused if already there)."""
    from smi_timm.data import write_shards

    index = folder / "shards" / "train.json"
    if index.is_file() and json.loads(index.read_text()).get("num_samples") == count:
        return str(folder / "shards" / "train-*.tar")
    workers = workers or max(1, (os.cpu_count() or 1))
    jobs = []
    for i in range(count):
        d = folder / "images" / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((i, str(d / f"{i:06d}.jpg"), sizes))
    t0 = time.perf_counter()
    if workers > 1 and count > 64:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            pool.map(_write_one, jobs, chunksize=32)
    else:
        for job in jobs:
            _write_one(job)
    summary = write_shards(folder / "images", folder / "shards" / "train-%06d.tar",
                           maxcount=max(64, count // 8), workers=workers, progress=False)
    print(f"wrote {summary.num_samples} synthetic JPEGs ({sizes[0]}-{sizes[1]} px) into {len(summary.shards)} shards "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    return str(folder / "shards" / "train-*.tar")


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------


def measure_loader(urls, preset: str, image_size: int, batch_size: int, num_workers: int, batches: int,
                   device: str = "cpu", augment_on: str = "cpu", legacy=None, **kw) -> dict:
    """Samples/s (wall, after the first batch) and per CPU-second (this process + its workers, whole epoch).
    ``legacy``: a pre-rewrite ``smi_timm.data`` package (:func:`load_legacy`) to measure instead."""
    if legacy is not None:
        loader = legacy.make_ssl_loader(urls, batch_size=batch_size, image_size=image_size, augment=preset,
                                        num_workers=num_workers, epoch_samples=batch_size * batches,
                                        shuffle_buffer=500)
        loader.path = "legacy"
    else:
        from smi_timm.data import make_ssl_loader

        loader = make_ssl_loader(urls, batch_size=batch_size, image_size=image_size, augment=preset,
                                 num_workers=num_workers, epoch_samples=batch_size * batches, shuffle_buffer=500,
                                 device=device, augment_on=augment_on, **kw)
    c0 = cpu_seconds()
    t_start = time.perf_counter()
    t_first, n_after = None, 0
    for i, (a, b) in enumerate(loader):
        if device == "cpu":  # touch every page, as a training step would
            float(a.view(-1)[::1024].sum() + b.view(-1)[::1024].sum())
        if i == 0:
            sync(device)
            t_first = time.perf_counter()
        else:
            n_after += a.shape[0]
    sync(device)
    t_end = time.perf_counter()
    cpu = cpu_seconds() - c0  # workers have exited: their time is in RUSAGE_CHILDREN
    total = batches * batch_size
    wall = t_end - t_start
    return {"preset": preset, "image_size": image_size, "batch_size": batch_size, "num_workers": num_workers,
            "path": loader.path, "device": device, "samples": total,
            "samples_per_s": n_after / (t_end - t_first) if n_after else float("nan"),
            "samples_per_cpu_s": total / cpu if cpu > 0 else float("nan"), "cpu_cores_used": cpu / wall,
            "first_batch_s": t_first - t_start, "wall_s": wall, "cpu_s": cpu}


def load_legacy(folder: str):
    """Import a copy of the pre-rewrite ``smi_timm/data`` folder (e.g. ``git archive 71f0e37 smi_timm/data``) as the
    package ``smi_legacy_data``, to measure the old path in the same run."""
    import importlib.util

    init = Path(folder) / "__init__.py"
    spec = importlib.util.spec_from_file_location("smi_legacy_data", init, submodule_search_locations=[str(folder)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["smi_legacy_data"] = pkg
    spec.loader.exec_module(pkg)
    return pkg


def legacy_profile(urls, preset: str, image_size: int, batch_size: int, batches: int) -> dict:
    """Per-stage profile of the pre-rewrite batched pipeline (one thread), as its own benchmark measured it."""
    import importlib

    aug = importlib.import_module("smi_legacy_data.augment")
    reading = importlib.import_module("smi_legacy_data.reading")
    stats = importlib.import_module("smi_legacy_data.stats").DataStats()
    torch.set_num_threads(1)
    clock = time.process_time
    n = batch_size * batches
    t0 = clock()
    raw = []
    while len(raw) < n:
        for url in reading.expand_urls(urls):
            raw.extend(reading.sample_image_bytes(s, stats) for s in reading.iter_shard(url, stats))
    raw = raw[:n]
    t_read = clock() - t0
    t0 = clock()
    imgs = [reading.decode_image(b, stats) for b in raw]
    t_decode = clock() - t0
    batched = aug.BatchTwoViewAugment(preset, image_size)
    g = torch.Generator().manual_seed(0)
    prof: dict = {}
    t0 = clock()
    for i in range(0, n, batch_size):
        batched(imgs[i:i + batch_size], g, prof)
    t_aug = clock() - t0
    stages = {"read_tar": t_read / n, "decode": t_decode / n, **{f"aug_{k}": v / n for k, v in prof.items()}}
    return {"preset": preset, "image_size": image_size, "samples": n,
            "us_per_sample": {k: v * 1e6 for k, v in stages.items()},
            "batched_total_us": (t_read + t_decode + t_aug) / n * 1e6}


def _raw_samples(urls, n: int):
    from smi_timm.data.reading import expand_urls, iter_shard, sample_image_bytes
    from smi_timm.data.stats import DataStats

    stats, raw = DataStats(), []
    while len(raw) < n:
        for url in expand_urls(urls):
            for s in iter_shard(url, stats):
                raw.append(sample_image_bytes(s, stats))
                if len(raw) == n:
                    return raw
    return raw


def profile_stages(urls, preset: str, image_size: int, batch_size: int, batches: int) -> dict:
    """In-process, one thread: CPU microseconds per two-view sample for each stage of the CPU path, and for the
    per-sample v2 reference. Loader workers keep freed memory for reuse (``keep_freed_memory``): so does this."""
    from smi_timm.data import get_augment_config
    from smi_timm.data.augment import V2TwoViewAugment, batch_seed
    from smi_timm.data.pipeline import CPUTwoView, FinishUint8
    from smi_timm.data.reading import decode_image, expand_urls, iter_shard, sample_image_bytes
    from smi_timm.data.stats import DataStats
    from smi_timm.data.workers import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(1)
    clock = time.process_time
    cfg = get_augment_config(preset)
    n = batch_size * batches
    stats = DataStats()
    t0 = clock()
    raw = []
    while len(raw) < n:
        for url in expand_urls(urls):
            raw.extend(sample_image_bytes(s, stats) for s in iter_shard(url, stats))
    raw = raw[:n]
    t_read = clock() - t0
    t0 = clock()
    imgs = [decode_image(b, stats, max(1024, 4 * image_size)) for b in raw]
    t_decode = clock() - t0
    aug, finish = CPUTwoView(cfg, image_size), FinishUint8(cfg, "cpu")
    finish(aug(imgs[:batch_size], 0))  # warm-up (and the one-time load of compiled kernels, where there are any)
    prof: dict = {}
    views = []
    t0 = clock()
    for k, i in enumerate(range(0, n, batch_size)):
        views.append(aug(imgs[i:i + batch_size], batch_seed(0, 0, 0, k), prof))
    t_aug = clock() - t0
    t0 = clock()
    for v in views:
        finish(v)
    prof["normalize_main_process"] = clock() - t0
    ref = V2TwoViewAugment(cfg, image_size)
    m = min(n, 2 * batch_size)
    t0 = clock()
    for i in range(0, m, batch_size):
        ref(imgs[i:i + batch_size])
    t_v2 = (clock() - t0) / m
    stages = {"read_tar": t_read / n, "decode": t_decode / n, **{k: v / n for k, v in prof.items()}}
    total = t_read / n + t_decode / n + t_aug / n + prof["normalize_main_process"] / n
    return {"preset": preset, "image_size": image_size, "samples": n,
            "us_per_sample": {k: v * 1e6 for k, v in stages.items()}, "total_us": total * 1e6,
            "samples_per_cpu_s": 1 / total, "v2_augment_us": t_v2 * 1e6,
            "v2_total_us": (t_read / n + t_decode / n + t_v2) * 1e6}


def profiles(urls, scale: float) -> list:
    """The in-process profiles of the CPU path: 224 px (``byol``, the synthetic shards), 32 px (``cifar``)."""
    from smi_timm.data import sample_shards

    return [profile_stages(urls, "byol", 224, 32, max(1, int(8 * scale))),
            profile_stages(sample_shards("train"), "cifar", 32, 256, max(2, int(8 * scale)))]


def _median_profile(runs: list) -> dict:
    """Stage-wise median of several profile records of one preset."""
    import statistics

    keys = sorted({k for r in runs for k in r["us_per_sample"]})
    us = {k: statistics.median(r["us_per_sample"].get(k, 0.0) for r in runs) for k in keys}
    total = statistics.median(r["total_us"] for r in runs)
    return {**runs[0], "us_per_sample": us, "total_us": total, "samples_per_cpu_s": 1e6 / total,
            "rounds": len(runs), "totals_us": [r["total_us"] for r in runs]}


def compare_builds(urls, ref: str, rounds: int, scale: float) -> dict:
    """Profiles of this tree and of git revision ``ref``, each in a subprocess, alternately, ``rounds`` times."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    shard_urls = urls if isinstance(urls, str) else " ".join(urls)
    with tempfile.TemporaryDirectory() as tmp:
        git_archive(ref, ["smi_timm"], tmp)
        runs = {"this tree": [], ref: []}
        for i in range(rounds):
            order = [("this tree", root), (ref, Path(tmp))]
            for name, tree in order if i % 2 == 0 else order[::-1]:
                env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
                cmd = [sys.executable, __file__, "--profile-json", shard_urls, "--scale", str(scale)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
                if out.returncode != 0:
                    raise SystemExit(f"profile of {name} failed:\n{out.stderr[-3000:]}")
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {i + 1}/{rounds} {name}: 224 px {runs[name][-1][0]['samples_per_cpu_s']:.0f} "
                      f"samples/CPU-s", flush=True)
    return {name: [_median_profile([r[j] for r in rs]) for j in range(len(rs[0]))] for name, rs in runs.items()}


def _proc_cpu(pids) -> float:
    """CPU seconds (user + system) of live processes, from /proc (Linux; 0 elsewhere)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def steady_loader(urls, image_size: int, batch_size: int, num_workers: int, batches: int, device: str,
                  augment_on: str) -> dict:
    """Steady-state rate of the loader on ``device``: wall and CPU time (this process and its live workers) from the
    end of the 3rd batch to the last one, so start-up (worker launch, nvJPEG / cuDNN initialisation) is excluded."""
    import multiprocessing as mp
    import resource

    from smi_timm.data import make_ssl_loader

    loader = make_ssl_loader(urls, batch_size=batch_size, image_size=image_size, augment="byol",
                             num_workers=num_workers, epoch_samples=batch_size * batches, shuffle_buffer=1000,
                             device=device, augment_on=augment_on, out_dtype=torch.bfloat16, channels_last=True)

    def cpu_now():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime + _proc_cpu(p.pid for p in mp.active_children())

    mark = None
    for i, _batch in enumerate(loader):
        if i == 2:
            sync(device)
            mark = (time.perf_counter(), cpu_now())
        elif i == batches - 1:
            sync(device)
            wall, cpu = time.perf_counter() - mark[0], cpu_now() - mark[1]
    n = (batches - 3) * batch_size
    return {"path": loader.path, "num_workers": loader.num_workers, "batch_size": batch_size,
            "image_size": image_size, "samples": n, "samples_per_s": n / wall, "cpu_cores_used": cpu / wall,
            "cpu_us_per_sample": cpu / n * 1e6, "out_dtype": "bfloat16", "channels_last": True}


def device_stage_split(urls, image_size: int, batch_size: int, batches: int, device: str) -> dict:
    """The accelerator stage alone on raw batches read beforehand (the GPU-side capacity), and its split into nvJPEG
    decoding and augmentation (wall time with the device synchronised; one thread)."""
    from smi_timm.data import get_augment_config
    from smi_timm.data.augment import batch_seed
    from smi_timm.data.feed import DeviceStage
    from smi_timm.data.pipeline import DeviceTwoView
    from smi_timm.data.sources import open_data
    from smi_timm.data.stats import DataStats
    from smi_timm.data.stream import SSLStream, StreamOptions

    cfg = get_augment_config("byol")
    options = StreamOptions(batch_size=batch_size, batches=batches, augment=cfg, image_size=image_size, seed=0, rank=0,
                            world_size=1, shuffle_buffer=500, mode="raw")
    items = list(SSLStream(open_data(list(_expand(urls))), options, epoch=0, start_batch=0))
    if torch.device(device).type == "cuda":  # as the loader delivers them
        items = [it._replace(enc=it.enc.pin_memory(), pix=it.pix.pin_memory()) for it in items]
    pipe = DeviceTwoView(cfg, image_size, device, torch.bfloat16, channels_last=True)
    stage = DeviceStage(pipe, lambda k: batch_seed(0, 0, 0, k), DataStats())
    for it in items[:2]:
        stage(it)  # warm-up
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    for it in items[2:]:
        stage(it)
    sync(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = (len(items) - 2) * batch_size
    decoded = []
    t0 = time.perf_counter()
    for it in items[2:]:
        decoded.append(stage.decode(list(torch.split(it.enc, list(it.enc_sizes))))[0])
    sync(device)
    t_dec = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k, (it, imgs) in enumerate(zip(items[2:], decoded)):
        pipe(imgs, it.slot_image, batch_seed(0, 0, 0, k))
    sync(device)
    t_aug = time.perf_counter() - t0
    return {"samples": n, "samples_per_s": n / wall, "main_cpu_us_per_sample": cpu / n * 1e6,
            "decode_samples_per_s": n / t_dec, "augment_samples_per_s": n / t_aug,
            "decode_ms_per_batch": t_dec / (len(items) - 2) * 1e3,
            "augment_ms_per_batch": t_aug / (len(items) - 2) * 1e3}


def _expand(urls):
    from smi_timm.data import expand_urls

    return expand_urls(urls)


# ---------------------------------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------------------------------


def run_accelerator(urls, device: str, image_size: int = 224, batch_size: int = 256, batches: int = 40,
                    budget: float = 55.0) -> dict:
    """The accelerator path's measurements and targets (on CUDA; the smoke test runs the same code on the CPU)."""
    cores = os.cpu_count() or 1
    out = {"device_stage": device_stage_split(urls, image_size, batch_size, max(4, batches // 3), device)}
    ds = out["device_stage"]
    print(f"device stage alone (pre-read batches): {ds['samples_per_s']:.0f} samples/s; nvJPEG decode "
          f"{ds['decode_ms_per_batch']:.1f} ms, augmentation {ds['augment_ms_per_batch']:.1f} ms per batch of "
          f"{batch_size}", flush=True)
    rows = []
    for nw in sorted({1, _default_workers()}):
        r = steady_loader(urls, image_size, batch_size, nw, batches, device, "device")
        rows.append(r)
        print(f"accelerator path, {r['num_workers']} worker(s): {r['samples_per_s']:.0f} samples/s, "
              f"{r['cpu_cores_used']:.2f} CPU cores", flush=True)
    if time.perf_counter() - T_START < budget - 15:
        r = steady_loader(urls, image_size, batch_size, max(1, cores - 1), max(6, batches // 4), device, "cpu")
        rows.append(r)
        print(f"CPU path, {r['num_workers']} workers: {r['samples_per_s']:.0f} samples/s, "
              f"{r['cpu_cores_used']:.2f} CPU cores", flush=True)
    out["loader"] = rows
    eligible = [r for r in rows if r["path"] == "device" and r["cpu_cores_used"] <= TARGET_CORES]
    best = max(eligible or [r for r in rows if r["path"] == "device"], key=lambda r: r["samples_per_s"])
    # records as benchmarks/gpu_check_summary.py reads them: name, value, target, passed
    out["targets"] = [
        {"name": f"data: decode + augmentation, two-view {image_size}-px samples/s ({best['num_workers']} worker(s))",
         "value": round(best["samples_per_s"]), "target": f">= {TARGET_RATE}",
         "passed": best["samples_per_s"] >= TARGET_RATE},
        {"name": "data: CPU cores used at that rate", "value": round(best["cpu_cores_used"], 2),
         "target": f"<= {TARGET_CORES:g}", "passed": best["cpu_cores_used"] <= TARGET_CORES},
    ]
    for t in out["targets"]:
        print(f"TARGET {'PASS' if t['passed'] else 'FAIL'}: {t['name']}: measured {t['value']}, wanted {t['target']} "
              f"({device})", flush=True)
    return out


def _default_workers() -> int:
    from smi_timm.data import default_num_workers

    return default_num_workers(1, path="device")


def run_cpu(urls, scale: float, legacy=None, baseline_ref=None, rounds: int = 3, profile_only: bool = False
            ) -> dict:
    """Loader rates and per-stage profiles of the CPU path (and of the pre-rewrite package, or of the package at
    git revision ``baseline_ref``, when given)."""
    from smi_timm.data import sample_shards

    cifar = sample_shards("train")
    rows = []
    for preset, size, src, bs, nb in (() if profile_only else (("cifar", 32, cifar, 256, max(4, int(40 * scale))),
                                                               ("byol", 224, urls, 32, max(3, int(16 * scale))))):
        for nw in (1, 2):
            for pkg in ((legacy, None) if legacy is not None else (None,)):
                r = measure_loader(src, preset, size, bs, nw, nb, legacy=pkg)
                rows.append(r)
                print(f"{preset:>5} {size:>3}px workers={nw} {r['path']:>6}: {r['samples_per_s']:7.0f} samples/s "
                      f"wall, {r['samples_per_cpu_s']:7.0f} samples/CPU-s", flush=True)
    out = {"loader": rows}
    if baseline_ref:
        both = compare_builds(urls, baseline_ref, rounds, scale)
        out["profile"], out["baseline_profile"], out["baseline_ref"] = both["this tree"], both[baseline_ref], \
            baseline_ref
    else:
        out["profile"] = profiles(urls, scale)
    rate = out["profile"][0]["samples_per_cpu_s"]
    out["targets"] = [{"name": "data: CPU path, two-view 224-px samples per CPU-second (decode + full recipe + "
                               "normalisation, one thread, in-process)", "value": round(rate),
                       "target": f">= {TARGET_CPU_RATE:g}", "passed": rate >= TARGET_CPU_RATE}]
    if legacy is not None:
        out["legacy_profile"] = [legacy_profile(urls, "byol", 224, 32, max(1, int(4 * scale))),
                                 legacy_profile(cifar, "cifar", 32, 256, max(2, int(8 * scale)))]
    return out


def run_smoke(urls) -> dict:
    """Tiny sizes on the CPU: the CPU-mode and CUDA-mode code paths (the accelerator path on CPU tensors)."""
    rows = [measure_loader(urls, "byol", 32, 16, 1, 2),
            measure_loader(urls, "byol", 32, 16, 1, 2, device="cpu", augment_on="device")]
    for r in rows:
        print(f"smoke: {r['path']} path, 32 px: {r['samples']} samples, {r['samples_per_cpu_s']:.0f} samples/CPU-s")
    accel = run_accelerator(urls, "cpu", image_size=32, batch_size=16, batches=6)
    return {"loader": rows, "profile": [profile_stages(urls, "byol", 32, 16, 1)], "accelerator_on_cpu": accel,
            "targets": accel["targets"]}  # records of the CUDA mode's shape; not judged on a CPU


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------

_STAGES = (  # (label, stages now, stages before the rewrite)
    ("read tar", ("read_tar",), ("read_tar",)),
    ("decode", ("decode",), ("decode",)),
    ("draw parameters (+ plan the rows)", ("params_plan",), ("aug_params",)),
    ("crop + resize (uint8 bicubic, antialiased) + flip", ("crop_resize_flip",), ("aug_crop_resize_flip",)),
    ("colour jitter + grayscale (fused kernels: + uint8 to float)", ("color_jitter_grayscale",),
     ("aug_color_jitter", "aug_grayscale")),
    ("Gaussian blur", ("blur", "blur_solarize"), ("aug_blur",)),
    ("solarize (fused kernels: + float to uint8)", ("solarize",), ("aug_solarize",)),
    ("to float and back / normalise", ("to_float_and_back", "normalize_main_process"), ("aug_normalize",)),
)


def print_tables(res: dict) -> None:
    """Markdown tables: loader rates, and per-stage CPU microseconds before (the pre-rewrite package, measured in this
    run with ``--legacy``, else the stored record) and after."""
    before, source = None, ""
    if "baseline_profile" in res:
        before = {"profile": res["baseline_profile"], "info": {"date": "this run", "hardware": "this machine"}}
        source = f"git {res['baseline_ref']} (--baseline-ref), this run; its blur row includes solarize where " \
                 f"that build timed them together"
    elif "legacy_profile" in res:
        before = {"profile": res["legacy_profile"], "info": {"date": "this run", "hardware": "this machine"}}
        source = "the pre-rewrite package (--legacy), this run"
    elif RECORD.is_file() and "legacy_profile" in json.loads(RECORD.read_text()):
        rec = json.loads(RECORD.read_text())
        before = {"profile": rec["legacy_profile"], "info": rec["info"]}
        source = f"{RECORD.name} (--legacy run)"
    if res["loader"]:
        print("\n| preset | size | workers | code | two-view samples/s (wall) | samples per CPU-second |")
        print("|---|---:|---:|---|---:|---:|")
    for r in res["loader"]:
        code = "before" if r["path"] == "legacy" else "after"
        print(f"| {r['preset']} | {r['image_size']} | {r['num_workers']} | {code} | {r['samples_per_s']:.0f} | "
              f"{r['samples_per_cpu_s']:.0f} |")
    prof = {p["image_size"]: p for p in res["profile"]}
    old = {p["image_size"]: p for p in before["profile"]} if before else {}
    cols = [s for s in (224, 32) if s in prof]
    print("\n| stage (one core, CPU us per two-view sample) | " +
          " | ".join(f"{prof[s]['preset']} {s} px before | after" for s in cols) + " |")
    print("|---|" + "---:|---:|" * len(cols))
    same_names = "baseline_profile" in res  # a revision of this pipeline: its stages have today's names
    for label, now, then in _STAGES:
        cells = []
        for s in cols:
            keys = now if same_names else then
            b = sum(old[s]["us_per_sample"].get(k, 0.0) for k in keys) if s in old else float("nan")
            a = sum(prof[s]["us_per_sample"].get(k, 0.0) for k in now)
            cells.append(f"{b:.0f} | {a:.0f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    def total(p):
        return p.get("batched_total_us", p.get("total_us"))

    cells = [f"{total(old[s]):.0f} | {prof[s]['total_us']:.0f}" if s in old else f"- | {prof[s]['total_us']:.0f}"
             for s in cols]
    print("| **total** | " + " | ".join(cells) + " |")
    cells = [f"{1e6 / total(old[s]):.0f} | {prof[s]['samples_per_cpu_s']:.0f}" if s in old
             else f"- | {prof[s]['samples_per_cpu_s']:.0f}" for s in cols]
    print("| **two-view samples per CPU-second** | " + " | ".join(cells) + " |")
    cells = [f"- | {prof[s]['v2_total_us']:.0f}" for s in cols]
    print("| per-sample `transforms.v2` reference | " + " | ".join(cells) + " |")
    if before:
        print(f"\nbefore: {before['info'].get('date')}, {before['info'].get('hardware')}, from {source}")
    for t in res.get("targets", []):
        print(f"TARGET {'PASS' if t['passed'] else 'FAIL'}: {t['name']}: measured {t['value']}, wanted {t['target']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", "--json", dest="out", default="runs/bench_data.json", help="JSON results (%(default)s)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: the accelerator path's targets")
    p.add_argument("--make-shards", metavar="DIR", default=None, help="write synthetic JPEG shards into DIR/shards")
    p.add_argument("--count", type=int, default=None, help="images for --make-shards (default 256; 4096 on CUDA)")
    p.add_argument("--image-size", type=int, default=224, help="augmentation output size on CUDA (default 224)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, both paths (seconds)")
    p.add_argument("--quick", action="store_true", help="CPU mode with a quarter of the batches")
    p.add_argument("--budget", type=float, default=55.0, help="CUDA mode: seconds to stay within (optional parts)")
    p.add_argument("--legacy", metavar="DIR", default=None,
                   help="CPU mode: also measure this copy of the pre-rewrite smi_timm/data folder (before / after "
                        "in one run), e.g. from `git archive 71f0e37 smi_timm/data | tar -x -C /tmp/old`")
    p.add_argument("--baseline-ref", metavar="REF", default=None,
                   help="CPU mode: also profile the package at this git revision (subprocesses, alternately)")
    p.add_argument("--rounds", type=int, default=3, help="--baseline-ref: alternating rounds (default 3)")
    p.add_argument("--profile-only", action="store_true", help="CPU mode: the in-process profiles only")
    p.add_argument("--scale", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--profile-json", metavar="URLS", default=None, help=argparse.SUPPRESS)  # one build's profile
    args = p.parse_args(argv)
    if args.profile_json:
        print(json.dumps(profiles(args.profile_json.split(" "), args.scale or 1.0)))
        return 0
    cuda = torch.device(args.device).type == "cuda"
    count = args.count or (64 if args.smoke else 4096 if cuda else 256)
    sizes = (48, 80) if args.smoke else (256, 400)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.make_shards) if args.make_shards else Path(tmp)
        urls = make_shards(folder, count, sizes)
        if args.smoke:
            res = run_smoke(urls)
        elif cuda:
            res = run_accelerator(urls, args.device, args.image_size, budget=args.budget)
        else:
            res = run_cpu(urls, args.scale or (0.25 if args.quick else 1.0),
                          load_legacy(args.legacy) if args.legacy else None, args.baseline_ref, args.rounds,
                          args.profile_only)
            print_tables(res)
    res["info"] = {**environment(args.device if cuda else None), "torchvision": _tv_version(),
                   "command": _command(sys.argv[1:] if argv is None else argv),
                   "images": {"count": count, "sizes": list(sizes)}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"\n{res['info']['date']}, {res['info']['hardware']}; wrote {out}")
    judged = not args.smoke  # the smoke run's records have the CUDA mode's shape; not judged on a CPU
    return 0 if not judged or all(t["passed"] for t in res.get("targets", [])) else 1


def _command(argv) -> str:
    """The command line, with the machine's paths replaced by what they stand for."""
    names = {"--make-shards": "DIR", "--legacy": "OLD/smi_timm/data", "--out": "FILE", "--json": "FILE"}
    out, hide = [], None
    for a in argv:
        out.append(names[hide] if hide else a.split("=")[0] + ("=" + names[a.split("=")[0]] if "=" in a and
                                                               a.split("=")[0] in names else ""))
        hide = a if a in names else None
    return "python benchmarks/bench_data.py " + " ".join(out)


def _tv_version() -> str:
    import torchvision

    return torchvision.__version__


T_START = time.perf_counter()

if __name__ == "__main__":
    sys.exit(main())
