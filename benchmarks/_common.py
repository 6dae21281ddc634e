"""Helpers shared by the benchmark scripts: hardware description, CPU time, timing and peak memory.

Every benchmark states the hardware it ran on (CPUs differ a lot between machines of the same size), so the
description lives here once and every script writes it into its JSON output.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import time
from datetime import date
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch

__all__ = ["cpu_model", "cpu_count", "hardware", "device_tag", "environment", "cpu_seconds", "sync", "time_ms",
           "peak_mib", "today"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``) with its family and whether it has AVX-512 (virtual machines often
    report a bare "AMD EPYC" for very different chips), or what :mod:`platform` knows elsewhere."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "flags") and key not in info:
                    info[key] = value.strip()
                if not line.strip() and info:
                    break
    except OSError:
        pass
    if "model name" not in info:
        return platform.processor() or platform.machine() or "unknown CPU"
    extra = [f"family {info['cpu family']} model {info['model']}"] if "cpu family" in info else []
    if "flags" in info:
        extra.append("AVX-512" if "avx512f" in info["flags"].split() else "no AVX-512")
    return f"{info['model name']} ({', '.join(extra)})" if extra else info["model name"]


def cpu_count() -> int:
    """CPU cores this process may run on (the affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def hardware(device: Optional[str] = None) -> str:
    """One line naming the hardware a measurement ran on: the GPU (when ``device`` is CUDA) and the CPU."""
    cpu = f"{cpu_model()}, {cpu_count()} cores"
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} + {cpu}"
    return cpu


def device_tag(device: str) -> str:
    """A file-name-safe tag of the device: ``cpu`` or e.g. ``cuda-nvidia-h200``."""
    if torch.device(device).type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device)).lower()
    return "cuda-" + "".join(c if c.isalnum() else "-" for c in name).strip("-")


def environment(device: Optional[str] = None) -> Dict[str, str]:
    """Date, hardware and library versions, for the JSON record of a benchmark."""
    env = {"date": today(), "hardware": hardware(device), "python": platform.python_version(),
           "torch": torch.__version__, "torch_threads": str(torch.get_num_threads())}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def today() -> str:
    return date.today().isoformat()


def cpu_seconds(children: bool = True) -> float:
    """CPU seconds (user + system) of this process, plus its exited children (e.g. loader workers) when asked."""
    usage = [resource.getrusage(resource.RUSAGE_SELF)]
    if children:
        usage.append(resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usage)


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device, repeats: int, warmup: int = 1) -> float:
    """Median wall milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA (L2 flushed between calls),
    ``repeats`` timed calls after ``warmup`` untimed ones on the CPU."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(100, 20 * repeats), return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_mib(fn: Callable[[], object], device, before: Optional[Callable[[], object]] = None) -> Optional[float]:
    """Peak CUDA memory (MiB) that one call of ``fn`` allocates on top of what was allocated before it (after one
    warm-up call that compiles and autotunes). ``before``, if given, runs after the warm-up and before the baseline
    is read (e.g. to free the warm-up's gradients, for a clean baseline). ``None`` on the CPU, which has no such
    counter."""
    if torch.device(device).type != "cuda":
        return None
    fn()
    if before is not None:
        before()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


REPO = Path(__file__).resolve().parents[1]


def git_archive(ref: str, paths: Sequence[str], into) -> Path:
    """Extract ``paths`` of git revision ``ref`` of this repository into the folder ``into`` (for before / after
    measurements in one run); a SystemExit naming the revision if git cannot."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, *paths], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"--baseline-ref {ref}: git archive failed: {archive.stderr.decode()[-500:]}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return Path(into)
