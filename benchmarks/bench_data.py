"""Throughput of the SSL data loader: two-view samples/s, plus a per-stage profile at 224 px.

    python benchmarks/bench_data.py [--json runs/bench_data.json] [--quick]

Configurations:

* ``cifar`` preset at 32 px on the bundled CIFAR-10 sample (4,000 JPEGs, resampled endlessly), 1 and 2 workers;
* ``byol`` preset at 224 px on synthetic 400x350 JPEGs written to shards in a temporary folder, 1 and 2 workers.

For each: samples/s of wall time (after the first batch) and samples per CPU-second (user + system time of the main
process and its workers), which is the per-core rate even when other processes share the CPU. The profile runs the
224 px pipeline in-process, stage by stage (read tar, decode, crop + resize + flip, colour jitter, ...), and the
per-sample ``torchvision.transforms.v2`` reference pipeline for comparison. Total run time: a few minutes.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_seconds() -> float:
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers, once they have exited (end of each epoch)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def synthetic_shards(folder: Path, n: int, size=(350, 400), seed: int = 0) -> str:
    """``n`` smooth random 400x350 JPEGs (quality 90, ~natural-image sizes) in one shard with an index."""
    from PIL import Image

    from smi_timm.data.testing import write_samples

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        small = rng.integers(0, 256, (size[0] // 16, size[1] // 16, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((size[1], size[0]), Image.BICUBIC)
        arr = np.asarray(im).astype(np.int16) + rng.integers(-12, 13, (size[0], size[1], 3))
        im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        samples.append((f"s{i:06d}", {"jpg": buf.getvalue(), "cls": str(i % 10).encode()}))
    write_samples(folder / "synth-%06d.tar", samples, maxcount=max(1, n // 4))
    return str(folder / "synth-*.tar")


def measure_loader(urls, preset: str, image_size: int, batch_size: int, num_workers: int, batches: int) -> dict:
    from smi_timm.data import make_ssl_loader

    loader = make_ssl_loader(urls, batch_size=batch_size, image_size=image_size, augment=preset,
                             num_workers=num_workers, epoch_samples=batch_size * batches, shuffle_buffer=500)
    c0 = cpu_seconds()
    t_start = time.perf_counter()
    t_first = None
    n_after_first = 0
    for i, (a, _b) in enumerate(loader):
        if i == 0:
            t_first = time.perf_counter()
        else:
            n_after_first += a.shape[0]
    t_end = time.perf_counter()
    cpu = cpu_seconds() - c0
    total = batches * batch_size
    return {
        "preset": preset, "image_size": image_size, "batch_size": batch_size, "num_workers": num_workers,
        "samples": total,
        "samples_per_s": n_after_first / (t_end - t_first) if n_after_first else float("nan"),
        "samples_per_cpu_s": total / cpu if cpu > 0 else float("nan"),
        "first_batch_s": t_first - t_start,
        "wall_s": t_end - t_start, "cpu_s": cpu,
    }


def profile_stages(urls, preset: str, image_size: int, batch_size: int, batches: int) -> dict:
    """In-process, single thread: seconds per sample for each stage of the batched pipeline and for the v2 one."""
    from smi_timm.data.augment import BatchTwoViewAugment, V2TwoViewAugment
    from smi_timm.data.reading import decode_image, expand_urls, iter_shard, sample_image_bytes
    from smi_timm.data.stats import DataStats

    torch.set_num_threads(1)
    clock = time.process_time  # CPU seconds of this (single-threaded) process: robust to a busy machine
    stats = DataStats()
    want = batch_size * batches
    raw = []
    t0 = clock()
    while len(raw) < want:
        for url in expand_urls(urls):
            for s in iter_shard(url, stats):
                raw.append(sample_image_bytes(s, stats))
                if len(raw) == want:
                    break
            if len(raw) == want:
                break
    t_read = clock() - t0
    t0 = clock()
    imgs = [decode_image(b, stats) for b in raw]
    t_decode = clock() - t0
    aug = BatchTwoViewAugment(preset, image_size)
    g = torch.Generator().manual_seed(0)
    prof: dict = {}
    t0 = clock()
    for i in range(0, len(imgs), batch_size):
        aug(imgs[i:i + batch_size], g, prof)
    t_aug = clock() - t0
    n = len(imgs)
    ref = V2TwoViewAugment(preset, image_size)
    m = min(n, 2 * batch_size)
    t0 = clock()
    for i in range(0, m, batch_size):
        ref(imgs[i:i + batch_size])
    t_v2 = (clock() - t0) / m
    stages = {"read_tar": t_read / n, "decode": t_decode / n}
    stages.update({f"aug_{k}": v / n for k, v in prof.items()})
    total = t_read / n + t_decode / n + t_aug / n
    return {"preset": preset, "image_size": image_size, "samples": n, "us_per_sample": {k: v * 1e6 for k, v in stages.items()},
            "batched_total_us": total * 1e6, "batched_samples_per_s": 1 / total,
            "v2_augment_us": t_v2 * 1e6, "v2_total_us": (t_read / n + t_decode / n + t_v2) * 1e6,
            "v2_samples_per_s": 1 / (t_read / n + t_decode / n + t_v2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="runs/bench_data.json", help="where to write the results (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="fewer batches (smoke test)")
    args = p.parse_args(argv)

    import torchvision
    import webdataset

    from smi_timm.data import sample_shards

    scale = 0.25 if args.quick else 1.0
    info = {
        "date": _dt.date.today().isoformat(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "webdataset": webdataset.__version__,
        "command": "python benchmarks/bench_data.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        synth = synthetic_shards(Path(tmp), 256)
        cifar = sample_shards("train")
        for preset, size, urls, bs, nb in (("cifar", 32, cifar, 256, max(4, int(40 * scale))),
                                           ("byol", 224, synth, 32, max(3, int(16 * scale)))):
            for nw in (1, 2):
                r = measure_loader(urls, preset, size, bs, nw, nb)
                rows.append(r)
                print(f"{preset:>5} {size:>3}px workers={nw}: {r['samples_per_s']:7.0f} samples/s wall, "
                      f"{r['samples_per_cpu_s']:7.0f} samples/CPU-s", flush=True)
        prof224 = profile_stages(synth, "byol", 224, 32, max(1, int(4 * scale)))
        prof32 = profile_stages(cifar, "cifar", 32, 256, max(2, int(8 * scale)))

    print()
    print("| preset | size | workers | two-view samples/s (wall) | samples per CPU-second |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['image_size']} | {r['num_workers']} | {r['samples_per_s']:.0f} | "
              f"{r['samples_per_cpu_s']:.0f} |")
    print()
    print("| stage (one core, per two-view sample) | byol 224 px (us) | cifar 32 px (us) |")
    print("|---|---|---|")
    keys = list(dict.fromkeys(list(prof224["us_per_sample"]) + list(prof32["us_per_sample"])))
    for k in keys:
        a = prof224["us_per_sample"].get(k)
        b = prof32["us_per_sample"].get(k)
        print(f"| {k} | {'-' if a is None else f'{a:.0f}'} | {'-' if b is None else f'{b:.0f}'} |")
    print(f"| **total, batched** | {prof224['batched_total_us']:.0f} | {prof32['batched_total_us']:.0f} |")
    print(f"| total with per-sample v2 transforms | {prof224['v2_total_us']:.0f} | {prof32['v2_total_us']:.0f} |")
    result = {"info": info, "loader": rows, "profile": [prof224, prof32]}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{info['date']}, {info['cpu']} ({info['cpus']} CPUs), Python {info['python']}, torch {info['torch']}, "
          f"torchvision {info['torchvision']}, webdataset {info['webdataset']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
