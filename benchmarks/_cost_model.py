"""The cost model of the losses (``benchmarks/bench_loss.py --sweep``): formulas, their measurement and their plot.

Time: every loss is a few matrix products plus O(N·D) or O(N²) element-wise work. Per forward + backward
(float32, N rows of D features per view; multiply-adds counted as 2 FLOPs):

* SMI (torch and fused): rho = ẑa·ẑbᵀ (2N²D), and the two products of the backward (dẑa = G·ẑb, dẑb = Gᵀ·ẑa):
  ``6·N²·D``.
* Barlow Twins: c = ẑaᵀ·ẑb (2ND²) and the backward's two: ``6·N·D²``. SMI is the cheaper loss while N < D.
* SimCLR: the (2N)×(2N) Gram matrix of the stacked views (8N²D) and its backward (16N²D): ``24·N²·D``.

With ``gather=True`` on W ranks of n rows (N = W·n), the local-rows form does, per rank, ``6·n·N·D`` (SMI),
``24·n·N·D`` (SimCLR), ``6·n·D²`` plus an all-reduce of D² floats (Barlow Twins); the full matrix on every rank
(before issue 24) did ``6·N²·D``: W times as much, growing with W² at a fixed local batch. The all-gather of the
n×D rows moves ``(W−1)·n·D`` floats into each rank in the forward and as many out in the backward.

Measured time is fitted per loss as ``t = FLOPs / R + e·Q + f·N·D + t0``: R the sustained FLOP rate of its products
on this machine, ``e`` seconds per element of its quadratic matrix (Q = N² for SMI, 4N² for SimCLR, D² for Barlow
Twins: the element-wise work of the loss on it), ``f`` per embedding element (standardisation), t0 the fixed cost;
the fit's largest relative error is reported next to it.

Memory: the peak of live bytes allocated during forward + backward above the inputs (their gradients included),
from the allocator's events as the torch profiler records them (``profile_memory=True``). It is fitted as
``bytes = 4·(α·N² + β·N·D + γ·D²)`` (non-negative least squares over the grid); α counts the live N×N float32
matrices at the peak (SMI, SimCLR), γ the D×D ones (Barlow Twins). The fused SMI kernels keep H (N×N in the compute
dtype) and O(N·D) buffers; their model is ``smi_timm.kernels.smi_dense_peak_bytes`` (checked on a GPU by
``bench_loss.py --gpu-check``).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch

__all__ = ["inputs", "FLOPS", "LOCAL_FLOPS", "FULL_FLOPS", "peak_bytes", "fwd_bwd_seconds", "fit_time", "fit_memory",
           "loss_fns", "plot", "crossover_n", "predict_time"]

FLOPS: Dict[str, Callable[[int, int], float]] = {
    "smi (torch)": lambda n, d: 6.0 * n * n * d,
    "smi (fused)": lambda n, d: 6.0 * n * n * d,
    "barlow": lambda n, d: 6.0 * n * d * d,
    "simclr": lambda n, d: 24.0 * n * n * d,
}
# per rank with gather=True: n local rows, W ranks
LOCAL_FLOPS: Dict[str, Callable[[int, int, int], float]] = {
    "smi (torch)": lambda n, d, w: 6.0 * n * (w * n) * d,
    "barlow": lambda n, d, w: 6.0 * n * d * d,
    "simclr": lambda n, d, w: 24.0 * n * (w * n) * d,
}
FULL_FLOPS: Dict[str, Callable[[int, int, int], float]] = {
    "smi (torch)": lambda n, d, w: 6.0 * (w * n) ** 2 * d,
    "barlow": lambda n, d, w: 6.0 * (w * n) * d * d,
    "simclr": lambda n, d, w: 24.0 * (w * n) ** 2 * d,
}


def loss_fns(names: Sequence[str]) -> Dict[str, Callable]:
    """The losses by name, at their defaults (SMI's torch path with the quick start's settings' shape)."""
    from smi_timm.losses import barlow_twins_loss, simclr_loss, smi_loss

    table = {
        "smi (torch)": lambda a, b: smi_loss(a, b, backend="torch"),
        "smi (fused)": lambda a, b: smi_loss(a, b, backend="triton"),
        "barlow": barlow_twins_loss,
        "simclr": simclr_loss,
    }
    return {name: table[name] for name in names}


def inputs(n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    za = torch.randn(n, d, generator=g)
    zb = za + 0.5 * torch.randn(n, d, generator=g)
    return za.requires_grad_(), zb.requires_grad_()


def fwd_bwd_seconds(fn: Callable, n: int, d: int, repeats: int = 3) -> float:
    """Median wall seconds of one forward + backward (after one untimed call)."""
    za, zb = inputs(n, d)

    def step():
        za.grad = zb.grad = None
        fn(za, zb).backward()

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(fn: Callable, n: int, d: int) -> int:
    """Peak live bytes of one forward + backward above its inputs (their gradients included), from the allocator
    events the torch profiler records: each op's own allocations at its start, each free at its time."""
    from torch.profiler import ProfilerActivity, profile

    za, zb = inputs(n, d)
    fn(za, zb).backward()  # warm-up: lazy initialisations are not the loss's memory
    za.grad = zb.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(za, zb).backward()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, cur)
    return int(peak)


QUADRATIC = {"smi (torch)": lambda n, d: n * n, "smi (fused)": lambda n, d: n * n, "barlow": lambda n, d: d * d,
             "simclr": lambda n, d: 4 * n * n}


def _terms_time(name: str, n: int, d: int):
    return [FLOPS[name](n, d), QUADRATIC[name](n, d), n * d, 1.0]


def fit_time(points: List[dict], name: str) -> dict:
    """Non-negative least squares (relative errors) over ``points`` (N, D, seconds) of
    ``t = FLOPs / R + e·Q + f·N·D + t0``: the products at a sustained rate R, the element-wise work on the N×N
    (D×D for Barlow Twins) matrices at ``e`` seconds per element, that on the embeddings, and a fixed cost."""
    coef, err = _nnls([_terms_time(name, p["N"], p["D"]) for p in points], [p["seconds"] for p in points])
    return {"gflops": (1e-9 / coef[0]) if coef[0] > 0 else math.inf, "ns_per_quadratic_element": 1e9 * coef[1],
            "ns_per_embedding_element": 1e9 * coef[2], "t0_ms": 1e3 * coef[3], "max_rel_err": err}


def predict_time(fit: dict, name: str, n: int, d: int) -> float:
    flops, quad, nd, _ = _terms_time(name, n, d)
    return (flops / (fit["gflops"] * 1e9) + quad * fit["ns_per_quadratic_element"] * 1e-9
            + nd * fit["ns_per_embedding_element"] * 1e-9 + fit["t0_ms"] * 1e-3)


def _nnls(rows, y):
    """Non-negative least squares in relative error over every subset of active terms (few terms): the
    coefficients and the largest relative error of the fit."""
    import itertools

    import numpy as np

    rows, y = np.array(rows, dtype=float), np.array(y, dtype=float)
    a, ones = rows / y[:, None], np.ones(len(y))
    k = rows.shape[1]
    best, coef = math.inf, np.zeros(k)
    for size in range(1, k + 1):
        for cols in itertools.combinations(range(k), size):
            sol = np.linalg.lstsq(a[:, cols], ones, rcond=None)[0]
            if (sol < 0).any():
                continue
            full = np.zeros(k)
            full[list(cols)] = sol
            res = float(((a @ full - ones) ** 2).sum())
            if res < best:
                best, coef = res, full
    pred = rows @ coef
    return coef, float(max(abs(p - t) / t for p, t in zip(pred, y)))


def fit_memory(points: List[dict]) -> dict:
    """Non-negative least squares ``bytes = 4·(α·N² + β·N·D + γ·D²)`` over ``points`` (N, D, bytes)."""
    coef, err = _nnls([[p["N"] ** 2, p["N"] * p["D"], p["D"] ** 2] for p in points],
                      [p["bytes"] / 4.0 for p in points])
    return {"alpha": float(coef[0]), "beta": float(coef[1]), "gamma": float(coef[2]), "max_rel_err": err}


def plot(sweep: dict, path) -> None:
    """Three panels: time vs N (D = 2048 and 8192, measured points and the fitted model), peak memory vs N, and the
    per-rank cost vs W for gather=True (local rows vs the full matrix: measured for small W, the model to 512)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colours = {"smi (torch)": "C0", "smi (fused)": "C4", "barlow": "C1", "simclr": "C2"}
    styles = {2048: "-", 8192: "--"}
    for name, pts in sweep["points"].items():
        fit = sweep["time_fit"].get(name)
        for d in sorted({p["D"] for p in pts}):
            sub = sorted((p for p in pts if p["D"] == d and p.get("seconds")), key=lambda p: p["N"])
            if sub:
                axes[0].loglog([p["N"] for p in sub], [1e3 * p["seconds"] for p in sub], "o", color=colours[name],
                               ms=4)
            ns = [2 ** k for k in range(5, 15)]
            if fit:
                axes[0].loglog(ns, [1e3 * predict_time(fit, name, n, d) for n in ns], styles.get(d, ":"),
                               color=colours[name], lw=1, label=f"{name}, D={d}")
            mem = sorted((p for p in pts if p["D"] == d and p.get("bytes")), key=lambda p: p["N"])
            if mem:
                axes[1].loglog([p["N"] for p in mem], [p["bytes"] / 2 ** 20 for p in mem], "o" + styles.get(d, ":"),
                               color=colours[name], ms=4, lw=1, label=f"{name}, D={d}")
    for ax, title, unit in ((axes[0], "forward + backward time", "ms"), (axes[1], "peak memory above the inputs",
                                                                          "MiB")):
        ax.set_xlabel("N (rows per view)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ws = [2 ** k for k in range(0, 10)]
    w_cfg = sweep["world"]
    n, d = w_cfg["n"], w_cfg["D"]
    for name in ("smi (torch)", "simclr", "barlow"):
        axes[2].loglog(ws, [LOCAL_FLOPS[name](n, d, w) / 1e9 for w in ws], "-", color=colours[name],
                       label=f"{name}: local (model)")
        axes[2].loglog(ws, [FULL_FLOPS[name](n, d, w) / 1e9 for w in ws], ":", color=colours[name],
                       label=f"{name}: full matrix per rank (model)")
        for kind, marker in (("local", "o"), ("full", "x")):
            meas = [(r["W"], r["flops"][name][kind]) for r in w_cfg["runs"] if name in r["flops"]]
            if meas:
                axes[2].loglog([m[0] for m in meas], [m[1] / 1e9 for m in meas], marker, color=colours[name], ms=6)
    axes[2].set_xlabel("W (ranks), n = %d rows per rank, D = %d" % (n, d))
    axes[2].set_ylabel("GFLOP per rank per step (matrix products)")
    axes[2].set_title("gather=True: per-rank work (markers: counted in gloo runs)")
    axes[2].grid(True, which="both", alpha=0.3)
    axes[2].legend(fontsize=6)
    fig.suptitle(f"loss cost model — {sweep['environment']['hardware']}, {sweep['environment']['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def crossover_n(fit_smi: dict, fit_barlow: dict, d: int) -> float:
    """N at which SMI's fitted time equals Barlow Twins' at width D (every fitted term included)."""
    def diff(n):
        return predict_time(fit_smi, "smi (torch)", n, d) - predict_time(fit_barlow, "barlow", n, d)

    lo, hi = 2.0, 1e7
    if diff(lo) > 0 or diff(hi) < 0:
        return math.nan
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if diff(mid) < 0 else (lo, mid)
    return math.sqrt(lo * hi)
