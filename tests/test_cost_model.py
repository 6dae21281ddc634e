"""The cost model of benchmarks/_cost_model.py: its FLOP formulas against the matrix products the losses dispatch,
its fits on synthetic points, and its memory formula against the allocator (small shapes, CPU)."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


@pytest.fixture(scope="module")
def cm():
    return _load("_cost_model")


@pytest.fixture(scope="module")
def bench():
    return _load("bench_loss")


@pytest.mark.parametrize("n,d", [(24, 40), (37, 16)])
def test_flop_formulas_count_the_products_the_losses_dispatch(cm, bench, n, d):
    for name, fn in cm.loss_fns(["smi (torch)", "barlow", "simclr"]).items():
        za, zb = cm.inputs(n, d)
        counted = bench._product_flops(lambda f=fn, a=za, b=zb: f(a, b).backward())
        assert counted == cm.FLOPS[name](n, d), name


def test_fits_recover_the_coefficients_of_synthetic_points(cm):
    grid = [(n, d) for d in (64, 256) for n in (16, 64, 256, 1024)]
    rate, per_elem, t0 = 50e9, 3e-9, 2e-3
    points = [dict(N=n, D=d, seconds=6 * n * n * d / rate + per_elem * n * d + t0) for n, d in grid]
    fit = cm.fit_time(points, "smi (torch)")
    assert fit["gflops"] == pytest.approx(50.0, rel=1e-6)
    assert fit["ns_per_embedding_element"] == pytest.approx(3.0, rel=1e-6)
    assert fit["t0_ms"] == pytest.approx(2.0, rel=1e-6) and fit["max_rel_err"] < 1e-9
    mem = cm.fit_memory([dict(N=n, D=d, bytes=4 * (5 * n * n + 4 * n * d)) for n, d in grid])
    assert (mem["alpha"], mem["beta"], mem["gamma"]) == pytest.approx((5.0, 4.0, 0.0), abs=1e-6)
    # SMI and Barlow Twins with the same rate and no other terms cross where 6·N²·D = 6·N·D², at N = D
    flat = dict(gflops=50.0, ns_per_quadratic_element=0.0, ns_per_embedding_element=0.0, t0_ms=0.0)
    assert cm.crossover_n(flat, flat, 512) == pytest.approx(512, rel=1e-6)
    assert math.isnan(cm.crossover_n(flat, dict(flat, gflops=1e-6), 512))  # SMI never slower


def test_smi_torch_memory_is_the_formula(cm):
    n, d = 96, 160
    fn = cm.loss_fns(["smi (torch)"])["smi (torch)"]
    assert cm.peak_bytes(fn, n, d) == pytest.approx(4 * (5 * n * n + 4 * n * d), rel=0.02)


def test_local_rows_per_rank_are_one_over_w_of_the_full_matrix(cm):
    n, d = 256, 2048
    for w in (1, 2, 8, 512):
        assert cm.LOCAL_FLOPS["smi (torch)"](n, d, w) * w == cm.FULL_FLOPS["smi (torch)"](n, d, w)
        assert cm.LOCAL_FLOPS["simclr"](n, d, w) * w == cm.FULL_FLOPS["simclr"](n, d, w)
        assert cm.LOCAL_FLOPS["barlow"](n, d, w) * w == cm.FULL_FLOPS["barlow"](n, d, w)
