"""Benchmark of the SMI loss: the fused Triton kernels against the torch reference (eager and torch.compile), the
Barlow Twins loss and a three-GEMM roofline; the host overhead of the fused loss; the targets of its GPU check.

    python benchmarks/bench_loss.py --host [--baseline-ref REF]      # CPU: host us and torch ops per call
    python benchmarks/bench_loss.py --gpu-check --out FILE.json      # CUDA: the fused loss's targets (< 60 s)
    python benchmarks/bench_loss.py --smoke [--out FILE.json]        # CPU: the --gpu-check code at tiny sizes
    python benchmarks/bench_loss.py [--quick] [--out FILE.json]      # the full grid (CUDA) / reduced grid (CPU)
    python benchmarks/bench_loss.py --sweep [--quick]                 # the cost model: time, memory vs N, D, W

``--host`` runs the fused loss with every Triton launch stubbed out (``smi_timm.kernels.overhead``) on CPU tensors
under the Triton interpreter (``--device cuda``: on CUDA tensors), and reports the host microseconds per forward +
backward (``torch.autograd.grad``), the same in units of one ``torch.add`` of two (N, D) tensors timed in alternation
with it in the same process (the median of the per-run ratios: a number that carries across CPUs; target <= 25x),
the time above a floor timed the same way (``_Floor``: an ``autograd.Function`` that only saves its tensors and
allocates its buffers, what any such loss costs at least), and the torch operators dispatched per call outside the
Triton kernels (counted with a ``TorchDispatchMode``; the autograd profiler's count, which also sees inside custom
operators, is reported beside it; target <= 12 aten ops).
``--baseline-ref REF`` measures the kernels of git revision REF the same way in a subprocess of the same run, for
before / after ratios; without it the ratios are against the issue's stated baseline (63 us = 29x one torch.add,
8 aten ops).

``--gpu-check`` measures exactly the targets of the fused loss on one GPU: N=256, D=8192 bf16 forward + backward
<= 0.10 ms and >= 17x / 20x / 35x faster than the fused loss of 2026-11-28 (1.72 ms on an H200), the torch
reference and Barlow Twins; N=4096, D=8192 bf16 <= 1.10x three bare GEMMs of the same shapes; the streaming
(N=16384, D=8192 bf16) and dense (N=4096, D=8192 bf16) peak memory within 5% of the memory model. It prints every
ratio with pass / fail and writes FILE.json and FILE.md (a markdown table). It also measures the host time with the
real launches and ``gather=True``'s work per rank on the one GPU: the local rows (256 rows against the W·256 gathered
columns, W = 8 and 32, D = 8192 bf16) against the full (W·256)² matrix each rank formed before local rows.

``--sweep`` measures the cost model of ``benchmarks/_cost_model.py`` (its docstring has the formulas): forward +
backward time and peak memory of SMI (torch path), Barlow Twins and SimCLR over N at D = 2048 and 8192 (one CPU
thread, or the GPU), fits the formulas to them, and for ``gather=True`` runs W = 1, 2, 4, 8 gloo processes on this
machine counting each rank's matrix-product FLOPs (local rows vs the full matrix that every rank formed before
issue 24) and timing them where W <= the cores; writes ``benchmarks/results/loss_cost_<device>.json`` and the plot
``docs/img/loss_cost_<device>.png``.

Times: median of ``triton.testing.do_bench`` on CUDA (``_common.time_ms``); memory: ``max_memory_allocated``
during one forward + backward above what was allocated before it (inputs and their freed gradients excluded).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_tag, environment, git_archive, peak_mib, sync, time_ms  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# The issue's baseline: the fused loss on 2026-11-28 (docs/benchmarks.md, NVIDIA H200, bf16, N=256, D=8192) and the
# host overhead as the last issue on it states it (63 us = 29x one torch.add, 8 aten ops).
TODAY_FUSED_MS = 1.72
ISSUE_HOST = {"cpu_us": 63.0, "vs_add": 29.0, "profiler_aten_ops": 8}
TARGETS = {"host_vs_add": 25.0, "host_ops": 12, "small_ms": 0.10, "vs_today": 17.0, "vs_eager": 20.0, "vs_barlow": 35.0,
           "vs_gemm3": 1.10, "memory_rel": 0.05}


# ------------------------------------------------------------------------------------------------------------------
# measured functions: each returns a callable running forward + backward
# ------------------------------------------------------------------------------------------------------------------
def _inputs(n, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    za = torch.randn(n, d, generator=g, device=device, dtype=torch.float32)
    zb = za + 0.5 * torch.randn(n, d, generator=g, device=device, dtype=torch.float32)
    return za.to(dtype).requires_grad_(), zb.to(dtype).requires_grad_()


def _fwd_bwd(loss_fn, za, zb):
    """Forward + backward; ``run.free()`` drops the gradients (a clean baseline for peak memory)."""

    def free():
        za.grad = None
        zb.grad = None

    def run():
        free()
        loss_fn(za, zb).backward()

    run.free = free
    return run


def _three_gemms(n, d, dtype, device):
    """The roofline: the three GEMMs the loss cannot avoid (rho = ahat bhat^T, G bhat, G^T ahat), bare torch.mm."""
    ahat = torch.randn(n, d, device=device, dtype=dtype)
    bhat = torch.randn(n, d, device=device, dtype=dtype)
    gmat = torch.randn(n, n, device=device, dtype=dtype)

    def run():
        torch.mm(ahat, bhat.t())
        torch.mm(gmat, bhat)
        torch.mm(gmat.t(), ahat)

    return run


def make_cases(n, d, dtype, device, names):
    from smi_timm.losses import BarlowTwinsLoss, smi_loss_reference

    za, zb = _inputs(n, d, dtype, device)
    cases = {}
    if "triton" in names:
        from smi_timm.kernels import smi_loss_triton

        cases["triton"] = _fwd_bwd(smi_loss_triton, za, zb)
    if "eager" in names:
        cases["eager"] = _fwd_bwd(smi_loss_reference, za, zb)
    if "compile" in names:
        cases["compile"] = _fwd_bwd(torch.compile(smi_loss_reference), za, zb)
    if "barlow" in names:
        cases["barlow"] = _fwd_bwd(BarlowTwinsLoss(), za, zb)
    if "gemm3" in names:
        cases["gemm3"] = _three_gemms(n, d, dtype, device)
    return cases


def _ratio(a, b):
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b == 0:
        return None
    return a / b


def _fmt(x, digits=2):
    if x is None:
        return "n/a"
    return x if isinstance(x, str) else f"{x:.{digits}f}"


def _use_interpreter():
    """CPU runs of the fused kernels need the Triton interpreter, set before the kernels are imported."""
    os.environ["TRITON_INTERPRET"] = "1"


def _write(path, record, markdown=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    if markdown is not None:
        md = path.with_suffix(".md")
        md.write_text(markdown + "\n")
        print(f"wrote {md}")


# ------------------------------------------------------------------------------------------------------------------
# --host: host microseconds and dispatched torch ops per forward + backward, Triton launches stubbed
# ------------------------------------------------------------------------------------------------------------------
def measure_host(n, d, dtype, device, calls, repeats):
    """Host cost of one forward + backward of the loss importable as ``smi_timm.kernels`` (this build, or the
    baseline build the ``--kernels-from`` subprocess installed under that name)."""
    import smi_timm.kernels as kernels

    overhead = _overhead_module()
    za, zb = _inputs(n, d, dtype, device)
    seed = torch.ones((), device=device)

    def step():  # forward + backward, no AccumulateGrad: what the loss itself costs
        torch.autograd.grad(kernels.smi_loss_triton(za, zb), (za, zb), seed)

    def step_backward():  # what a training step sees: .backward() adds the engine's seed and .grad bookkeeping
        za.grad = zb.grad = None
        kernels.smi_loss_triton(za, zb).backward()

    with overhead.stub_launches(sys.modules["smi_timm.kernels._smi_kernels"]):
        step()
        # timed before the op counts: once the autograd profiler has run in a process, every later call costs about
        # twice the host time (its observers stay installed)
        timing, add, ratio = _interleaved(overhead, step, za, zb, calls, repeats)
        ops = overhead.dispatched_ops(step)
        profiled = overhead.aten_ops(step)
        with_backward = overhead.dispatched_ops(step_backward)
    return {**timing, "add_cpu_us": add["cpu_us"], "add_wall_us": add["wall_us"], "vs_add": ratio,
            "ops": len(ops), "op_names": ops,
            "profiler_aten_ops": len(profiled),
            "profiler_op_names": profiled, "ops_with_backward_call": len(with_backward)}


class _Floor(torch.autograd.Function):
    """What any loss written as a torch.autograd.Function costs at least: the forward saves four tensors and
    allocates three buffers, the backward allocates the two gradients, and nothing else runs."""

    @staticmethod
    def forward(ctx, za, zb, scalar):
        ws_c, ws_f = torch.empty_like(za), torch.empty_like(zb)
        ctx.save_for_backward(za, zb, ws_c, ws_f)
        return torch.empty_like(scalar)

    @staticmethod
    def backward(ctx, grad):
        za, zb, _, _ = ctx.saved_tensors
        return torch.empty_like(za), torch.empty_like(zb), None


def _interleaved(overhead, step, za, zb, calls, repeats):
    """Host time of ``step``, of one ``torch.add`` of two such tensors and of the floor (:class:`_Floor` forward +
    backward), timed in alternation (one run of each per repeat, so that all see the same state of a shared
    machine): the medians, the median of the per-repeat ratios to the add, and the floor's record."""
    import statistics

    a, b = za.detach().clone(), zb.detach().clone()
    scalar, seed = torch.empty((), device=za.device), torch.ones((), device=za.device)

    def add():
        torch.add(a, b)

    def floor():
        torch.autograd.grad(_Floor.apply(za, zb, scalar), (za, zb), seed)

    runs, adds, floors = [], [], []
    for _ in range(repeats):
        runs.append(overhead.host_time_us(step, calls=calls, repeats=1))
        adds.append(overhead.host_time_us(add, calls=calls * 10, repeats=1))
        floors.append(overhead.host_time_us(floor, calls=calls, repeats=1))
    def summary(rs):  # medians, and the fastest run for the *_min fields
        return {k: (min if k.endswith("_min") else statistics.median)(r[k] for r in rs) for k in rs[0]}

    med, add_med = summary(runs), summary(adds)
    ratio = statistics.median(r["cpu_us"] / s["cpu_us"] for r, s in zip(runs, adds))
    floor_rec = {"floor_cpu_us": summary(floors)["cpu_us"],
                 "floor_vs_add": statistics.median(f["cpu_us"] / s["cpu_us"] for f, s in zip(floors, adds)),
                 "above_floor_us": statistics.median(r["cpu_us"] - f["cpu_us"] for r, f in zip(runs, floors))}
    return {**med, **floor_rec}, add_med, ratio


def _overhead_module():
    """``smi_timm.kernels.overhead`` of this checkout, loaded by path (a baseline build lacks it)."""
    path = Path(__file__).resolve().parents[1] / "kernels" / "overhead.py"
    spec = importlib.util.spec_from_file_location("smi_kernels_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _install_kernels_from(folder):
    """Import the kernels package in ``folder`` as ``smi_timm.kernels`` (before anything imports this build)."""
    import smi_timm

    init = Path(folder) / "__init__.py"
    spec = importlib.util.spec_from_file_location("smi_timm.kernels", init, submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["smi_timm.kernels"] = module
    spec.loader.exec_module(module)
    smi_timm.kernels = module


def measure_baseline(ref, args):
    """Run ``--host`` on the kernels of git revision ``ref`` in a subprocess; its JSON record."""
    with tempfile.TemporaryDirectory() as tmp:
        git_archive(ref, ["kernels"], tmp)
        cmd = [sys.executable, __file__, "--host", "--kernels-from", str(Path(tmp) / "kernels"), "--json-stdout",
               "--n", str(args.n[0]), "--d", str(args.d[0]), "--dtypes", args.dtypes[0], "--device", args.device,
               "--calls", str(args.calls), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"baseline run failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def _host_targets(new, base, base_label):
    """(name, value, target, pass, ratio vs baseline) of the two host targets: CPU time per forward + backward in
    units of one torch.add, and the aten ops the profiler counts."""
    rows = []
    for key, name, target in (("vs_add", "host CPU time per forward + backward, x one torch.add", "host_vs_add"),
                              ("profiler_aten_ops", "aten ops per forward + backward", "host_ops")):
        value, target, base_value = new[key], TARGETS[target], base.get(key)
        rows.append({"target": f"{name} <= {target:g}", "value": value,
                     "pass": value <= target, "baseline": base_value, "baseline_from": base_label,
                     "baseline_over_new": _ratio(base_value, value)})
    return rows


def run_host(args):
    if args.device == "cpu":
        _use_interpreter()
    if args.kernels_from:
        _install_kernels_from(args.kernels_from)
    n, d, dtype = args.n[0], args.d[0], DTYPES[args.dtypes[0]]
    torch.set_num_threads(args.threads)
    new = measure_host(n, d, dtype, args.device, args.calls, args.repeats)
    if args.json_stdout:
        print(json.dumps(new))
        return
    if args.baseline_ref:
        base = measure_baseline(args.baseline_ref, args)
        # the dispatch mode sees a custom op as one call: the old build's ops are counted with the profiler too
        label = f"git {args.baseline_ref}, measured in this run"
    else:
        base = dict(ISSUE_HOST)
        label = "the issue's stated baseline (not measured here)"
    targets = _host_targets(new, base, label)
    print(f"host overhead, N={n}, D={d}, {args.dtypes[0]}, {args.device}, Triton launches stubbed "
          f"({args.calls} calls x {args.repeats}):")
    print(f"  one torch.add of two ({n}, {d}) tensors: {new['add_cpu_us']:.2f} us CPU")
    print(f"  this build: {new['cpu_us']:.1f} us CPU ({new['wall_us']:.1f} us wall) per forward + backward "
          f"= {new['vs_add']:.1f}x one torch.add, "
          f"{new['ops']} torch ops ({', '.join(sorted(set(new['op_names'])))}); profiler: "
          f"{new['profiler_aten_ops']} aten ops; with loss.backward(): {new['ops_with_backward_call']} ops")
    print(f"  floor (an autograd.Function that only saves its tensors and allocates its buffers): "
          f"{new['floor_cpu_us']:.1f} us = {new['floor_vs_add']:.1f}x one torch.add; this build above it: "
          f"{new['above_floor_us']:.1f} us")
    if args.baseline_ref:
        print(f"  baseline ({label}): {base['cpu_us']:.1f} us CPU ({base['wall_us']:.1f} us wall) "
              f"= {base['vs_add']:.1f}x one torch.add, "
              f"{base['profiler_aten_ops']} aten ops (profiler), {len(base['op_names'])} seen by the dispatch mode; "
              f"above its floor: {base['above_floor_us']:.1f} us")
    for t in targets:
        print(f"  target {t['target']}: {_fmt(t['value'], 1)} -> {'PASS' if t['pass'] else 'FAIL'}; "
              f"baseline {_fmt(t['baseline'], 1)} ({t['baseline_from']}), {_fmt(t['baseline_over_new'], 1)}x")
    record = {"environment": environment(args.device), "command": args.command, "mode": "host", "N": n, "D": d,
              "dtype": args.dtypes[0],
              "device": args.device, "new": new, "baseline": base, "baseline_from": label, "targets": targets}
    _write(args.out or RESULTS / f"bench_loss_host_{device_tag(args.device)}.json", record)


# ------------------------------------------------------------------------------------------------------------------
# --gpu-check / --smoke: the targets of the fused loss
# ------------------------------------------------------------------------------------------------------------------
GPU_SIZES = {"small": (256, 8192), "large": (4096, 8192), "stream": (16384, 8192, None), "dense": (4096, 8192)}
SMOKE_SIZES = {"small": (32, 64), "large": (64, 64), "stream": (64, 32, 16), "dense": (48, 32)}


def _timed(n, d, names, device, repeats):
    cases = make_cases(n, d, torch.bfloat16 if device == "cuda" else torch.float32, device, names)
    out = {}
    for name, fn in cases.items():
        out[f"{name}_ms"] = time_ms(fn, device, repeats)
    del cases
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


#: gather=True on one device: (rows per rank n, D, world sizes W) of the --gpu-check and of the CPU smoke run.
GATHER_SIZES = {False: (256, 8192, (8, 32)), True: (8, 32, (2, 4))}


def _local_rows_check(device, n, d, worlds, repeats):
    """``gather=True``'s work per rank on one device: forward + backward of the local rows (rank 0's n rows against
    all W·n gathered columns, ``smi_loss_triton(..., row0=0)``, what each rank runs) against the full (W·n)² matrix
    that every rank formed before local rows. The all-gather itself is not in it (one device); the ratio should be
    close to W where the matrix products dominate."""
    from smi_timm.kernels import smi_loss_triton

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = []
    for w in worlds:
        za_all, zb_all = _inputs(w * n, d, dtype, device)
        za_rows = za_all[:n].detach().clone().requires_grad_()
        local = _fwd_bwd(lambda a, b: smi_loss_triton(a, b, row0=0), za_rows, zb_all)
        full = _fwd_bwd(smi_loss_triton, za_all, zb_all)
        row = {"W": w, "n": n, "D": d, "local_ms": time_ms(local, device, repeats),
               "full_ms": time_ms(full, device, repeats)}
        row["full_over_local"] = _ratio(row["full_ms"], row["local_ms"])
        out.append(row)
        del za_all, zb_all, za_rows, local, full
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def _peak_check(n, d, streaming, block_rows, device):
    """Measured peak bytes of one forward + backward against the memory model (CUDA only)."""
    from smi_timm.kernels import smi_dense_peak_bytes, smi_loss_triton, smi_streaming_peak_bytes
    from smi_timm.kernels._memory import default_block_rows

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = block_rows or default_block_rows(n, dtype)
    model = smi_streaming_peak_bytes(n, d, rows, dtype) if streaming else smi_dense_peak_bytes(n, d, dtype)
    za, zb = _inputs(n, d, dtype, device)
    fn = _fwd_bwd(lambda a, b: smi_loss_triton(a, b, streaming=streaming, block_rows=rows if streaming else None),
                  za, zb)
    peak = peak_mib(fn, device, before=fn.free)  # after a warm-up call, its gradients freed: a clean baseline
    if device == "cuda":
        ms = time_ms(fn, device, 3)
    else:  # no peak counter on the CPU: run the path once all the same
        fn()
        ms = None
    result = {"N": n, "D": d, "block_rows": rows if streaming else None, "model_bytes": model, "ms": ms,
              "peak_bytes": None if peak is None else int(round(peak * 2 ** 20))}
    del za, zb, fn
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def run_check(args, smoke):
    device = "cpu" if smoke else "cuda"
    if smoke:
        _use_interpreter()
    elif not torch.cuda.is_available():
        raise SystemExit("--gpu-check needs a CUDA device (use --smoke on a CPU)")
    sizes = SMOKE_SIZES if smoke else GPU_SIZES
    repeats = 2 if smoke else 20
    m = {"small": {"N": sizes["small"][0], "D": sizes["small"][1],
                   **_timed(*sizes["small"], ("triton", "eager", "barlow", "gemm3"), device, repeats)},
         "large": {"N": sizes["large"][0], "D": sizes["large"][1],
                   **_timed(*sizes["large"], ("triton", "gemm3"), device, repeats)},
         "stream": _peak_check(*sizes["stream"][:2], True, sizes["stream"][2], device),
         "dense": _peak_check(*sizes["dense"], False, None, device)}
    m["host"] = _host_on_device(device, *sizes["small"])
    m["gather"] = _local_rows_check(device, *GATHER_SIZES[smoke], repeats)
    m["dtype"] = "bf16" if device == "cuda" else "fp32"
    if device == "cuda":  # where the GPU time goes, for whoever reads a failed target
        m["kernels_us"] = {f"N={n}": _kernel_breakdown(n, d) for n, d in (sizes["small"], sizes["large"])}
    targets = _check_targets(m, smoke)
    for t in targets:
        print(f"{t['name']}: {_fmt(t['value'], 3)} (target {t['target']}) -> {t['status']}", flush=True)
    md = _check_markdown(m, targets, device)
    print("\n" + md)
    record = {"environment": environment(device), "command": args.command,
              "mode": "smoke" if smoke else "gpu-check", "measurements": m,
              "targets": targets, "today_fused_ms": TODAY_FUSED_MS}
    _write(args.out or RESULTS / f"bench_loss_check_{device_tag(device)}.json", record, md)
    return 0


def _host_on_device(device, n, d):
    """Host CPU microseconds per forward + backward with the real launches (nothing waits for the GPU): when this
    exceeds the GPU time, the loss is host-bound."""
    import smi_timm.kernels as kernels
    from smi_timm.kernels.overhead import host_time_us

    za, zb = _inputs(n, d, torch.bfloat16 if device == "cuda" else torch.float32, device)
    seed = torch.ones((), device=device)

    def step():
        torch.autograd.grad(kernels.smi_loss_triton(za, zb), (za, zb), seed)

    calls = 200 if device == "cuda" else 2
    result = host_time_us(step, calls=calls, repeats=3, warmup=3)
    sync(device)
    return result


def _kernel_breakdown(n, d, calls=3):
    """GPU microseconds per forward + backward of each kernel (torch.profiler, CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    from smi_timm.kernels import smi_loss_triton

    fn = _fwd_bwd(smi_loss_triton, *_inputs(n, d, torch.bfloat16, "cuda"))
    fn()
    sync("cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync("cuda")
    out = {}
    for ev in prof.key_averages():
        total = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if total:
            out[ev.key] = round(total / calls, 2)
    return out


def _target(name, value, target, ok, smoke=False):
    if smoke:  # the interpreter on a CPU: the code path is exercised, the numbers mean nothing
        status = "n/a (CPU smoke run)"
    else:
        status = "n/a" if value is None else ("PASS" if ok else "FAIL")
    return {"name": name, "value": value, "target": target, "status": status}


def _check_targets(m, smoke=False):
    """Every target of the issue with its value and PASS / FAIL."""
    out = _speed_targets(m)
    for key in ("stream", "dense"):
        c = m[key]
        rel = None if c["peak_bytes"] is None else abs(c["peak_bytes"] - c["model_bytes"]) / c["model_bytes"]
        out.append(_target(f"{key} peak N={c['N']},D={c['D']} vs memory model, relative error", rel,
                           f"<= {TARGETS['memory_rel']}", rel is not None and rel <= TARGETS["memory_rel"]))
    return [_target(t["name"], t["value"], t["target"], t["status"] == "PASS", smoke) for t in out]


def _speed_targets(m):
    s, big, dt = m["small"], m["large"], m["dtype"]
    fused = s.get("triton_ms")
    out = [_target(f"N={s['N']},D={s['D']} {dt} fused fwd+bwd ms", fused, f"<= {TARGETS['small_ms']}",
                   fused is not None and fused <= TARGETS["small_ms"])]
    for key, ref, label in (("vs_today", TODAY_FUSED_MS, "2026-11-28 fused (1.72 ms, recorded)"),
                            ("vs_eager", s.get("eager_ms"), "torch eager"),
                            ("vs_barlow", s.get("barlow_ms"), "Barlow Twins")):
        r = _ratio(ref, fused)
        out.append(_target(f"speed-up over {label}", r, f">= {TARGETS[key]}", r is not None and r >= TARGETS[key]))
    r = _ratio(big.get("triton_ms"), big.get("gemm3_ms"))
    out.append(_target(f"N={big['N']},D={big['D']} {dt} fused / three GEMMs", r, f"<= {TARGETS['vs_gemm3']}",
                       r is not None and r <= TARGETS["vs_gemm3"]))
    return out


_LABELS = {"triton_ms": "fused loss fwd+bwd", "eager_ms": "torch reference fwd+bwd",
           "barlow_ms": "Barlow Twins fwd+bwd", "gemm3_ms": "three bare GEMMs"}


def _check_markdown(m, targets, device):
    s, big = m["small"], m["large"]
    lines = ["| measurement | value |", "|---|---:|"]
    for k in ("triton_ms", "eager_ms", "barlow_ms", "gemm3_ms"):
        lines.append(f"| N={s['N']}, D={s['D']} {m['dtype']}: {_LABELS[k]} ms | {_fmt(s.get(k), 3)} |")
    for k in ("triton_ms", "gemm3_ms"):
        lines.append(f"| N={big['N']}, D={big['D']} {m['dtype']}: {_LABELS[k]} ms | {_fmt(big.get(k), 3)} |")
    for key in ("stream", "dense"):
        c = m[key]
        peak = None if c["peak_bytes"] is None else c["peak_bytes"] / 2 ** 20
        lines.append(f"| {key} N={c['N']}, D={c['D']}: peak MiB / model MiB | {_fmt(peak, 1)} / "
                     f"{c['model_bytes'] / 2 ** 20:.1f} |")
    lines.append(f"| host CPU us per fwd+bwd, real launches ({device}) | {_fmt(m['host']['cpu_us'], 1)} |")
    for g in m.get("gather", []):
        lines.append(f"| gather=True, W={g['W']}, n={g['n']} per rank, D={g['D']}: local rows / full matrix ms "
                     f"(full / local) | {_fmt(g['local_ms'], 3)} / {_fmt(g['full_ms'], 3)} "
                     f"({_fmt(g['full_over_local'], 1)}×) |")
    for shape, kernels in m.get("kernels_us", {}).items():
        for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:6]:
            lines.append(f"| {shape}: GPU us per fwd+bwd in {name[:60]} | {us:.1f} |")
    lines += ["", "| target | value | goal | result |", "|---|---:|---:|---|"]
    lines += [f"| {t['name']} | {_fmt(t['value'], 3)} | {t['target']} | {t['status']} |" for t in targets]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# the full grid
# ------------------------------------------------------------------------------------------------------------------
_COLS = ["triton", "eager", "compile", "barlow", "gemm3"]


def run_grid(args):
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
        grid_n, grid_d = ([256], [512]) if args.quick else ([256, 1024], [512, 2048])
        names = [c for c in _COLS if c != "triton"]  # the interpreter's speed means nothing
    else:
        grid_n, grid_d = ([256, 1024], [2048]) if args.quick else ([256, 1024, 4096, 16384], [2048, 8192])
        names = list(_COLS)
    if args.no_compile:
        names.remove("compile")
    dtypes = args.dtypes or (["bf16"] if args.quick else ["bf16", "fp32"])
    rows = []
    for dname in dtypes:
        for n in args.n or grid_n:
            for d in args.d or grid_d:
                rows.append(_grid_row(n, d, dname, device, names, 3 if args.quick else args.repeats))
                print(_row_line(rows[-1], device), flush=True)
    md = _grid_markdown(rows, device)
    print("\n" + md)
    record = {"environment": environment(device), "command": args.command, "mode": "grid", "rows": rows}
    _write(args.out or RESULTS / f"bench_loss_{device_tag(device)}.json", record)


def _grid_row(n, d, dname, device, names, repeats):
    row = {"N": n, "D": d, "dtype": dname}
    cases = make_cases(n, d, DTYPES[dname], device, names)
    for name, fn in cases.items():
        try:
            row[f"{name}_ms"] = time_ms(fn, device, repeats)
            row[f"{name}_mib"] = peak_mib(fn, device, before=getattr(fn, "free", None))
        except torch.cuda.OutOfMemoryError:
            row[f"{name}_ms"] = row[f"{name}_mib"] = "OOM"
            torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001 - e.g. no C++ compiler for torch.compile on CPU
            row[f"{name}_ms"] = row[f"{name}_mib"] = None
            row[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    del cases
    for key, a, b in (("triton_over_3gemm", "triton", "gemm3"), ("eager_over_triton", "eager", "triton"),
                      ("barlow_over_triton", "barlow", "triton"), ("eager_over_3gemm", "eager", "gemm3")):
        row[key] = _ratio(row.get(f"{a}_ms"), row.get(f"{b}_ms"))
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def _row_line(row, device):
    cells = [str(row["N"]), str(row["D"]), row["dtype"]] + [_fmt(row.get(f"{c}_ms")) for c in _COLS]
    if device == "cuda":
        cells += [_fmt(row.get(f"{c}_mib"), 1) for c in _COLS]
        cells += [_fmt(row.get(k)) for k in ("triton_over_3gemm", "eager_over_triton", "barlow_over_triton")]
    else:
        cells += [_fmt(row.get("eager_over_3gemm"))]
    return "| " + " | ".join(cells) + " |"


def _grid_markdown(rows, device):
    head = ["N", "D", "dtype"] + [f"{c} ms" for c in _COLS]
    if device == "cuda":
        head += [f"{c} MiB" for c in _COLS] + ["triton/3gemm", "eager/triton", "barlow/triton"]
    else:
        head += ["eager/3gemm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + [_row_line(r, device) for r in rows])


# ------------------------------------------------------------------------------------------------------------------
# --sweep: the cost model
# ------------------------------------------------------------------------------------------------------------------
SWEEP_N = {2048: [64, 128, 256, 512, 1024, 2048, 4096], 8192: [64, 128, 256, 512, 1024, 2048]}
SWEEP_N_QUICK = {2048: [64, 256, 1024], 8192: [64, 256]}
SWEEP_LOSSES = ["smi (torch)", "barlow", "simclr"]
WORLD_SIZES, WORLD_N, WORLD_D = (1, 2, 4, 8), 256, 2048


def run_sweep(args):
    import _cost_model as cm

    torch.set_num_threads(args.threads)
    grid = SWEEP_N_QUICK if args.quick else SWEEP_N
    fns = cm.loss_fns(SWEEP_LOSSES)
    points = {name: [] for name in fns}
    for d, ns in grid.items():
        for n in ns:
            for name, fn in fns.items():
                rec = {"N": n, "D": d, "seconds": cm.fwd_bwd_seconds(fn, n, d, repeats=1 if args.quick else 3),
                       "bytes": cm.peak_bytes(fn, n, d), "flops": cm.FLOPS[name](n, d)}
                points[name].append(rec)
                print(f"{name:12s} N={n:5d} D={d:5d}: {1e3 * rec['seconds']:9.2f} ms, "
                      f"{rec['flops'] / rec['seconds'] / 1e9:6.1f} GFLOP/s, {rec['bytes'] / 2 ** 20:8.1f} MiB",
                      flush=True)
    time_fit = {name: cm.fit_time(pts, name) for name, pts in points.items()}
    mem_fit = {name: cm.fit_memory(pts) for name, pts in points.items()}
    world = run_world(args)
    sweep = {"environment": environment("cpu"), "command": args.command, "points": points, "time_fit": time_fit,
             "memory_fit": mem_fit, "world": world,
             "crossover_n": {d: cm.crossover_n(time_fit["smi (torch)"], time_fit["barlow"], d) for d in grid}}
    _print_sweep(sweep)
    out = Path(args.out or RESULTS / "loss_cost_cpu.json")
    _write(out, sweep)
    img = Path(__file__).resolve().parents[1] / "docs" / "img" / "loss_cost_cpu.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    cm.plot(sweep, img)
    print(f"wrote {img}")


def _print_sweep(sweep):
    print("\n| loss | products GFLOP/s | ns per N² (D² Barlow) element | ns per N·D element | t0 ms | "
          "max rel. error | memory: 4·(α·N² + β·N·D + γ·D²) bytes, α / β / γ | max rel. error |\n"
          "|---|---:|---:|---:|---:|---:|---|---:|")
    for name, fit in sweep["time_fit"].items():
        m = sweep["memory_fit"][name]
        print(f"| {name} | {fit['gflops']:.1f} | {fit['ns_per_quadratic_element']:.2f} | "
              f"{fit['ns_per_embedding_element']:.2f} | {fit['t0_ms']:.2f} | {fit['max_rel_err']:.0%} | "
              f"{m['alpha']:.2f} / {m['beta']:.2f} / {m['gamma']:.2f} | {m['max_rel_err']:.0%} |")
    for d, n in sweep["crossover_n"].items():
        print(f"SMI (torch) is faster than Barlow Twins below N = {n:.0f} at D = {d}")
    w = sweep["world"]
    print(f"\ngather=True, n = {w['n']} rows per rank, D = {w['D']}: GFLOP per rank (counted) and ms per rank")
    print("| W | loss | local rows GFLOP | full matrix GFLOP | local ms | full ms |\n|---:|---|---:|---:|---:|---:|")
    for r in w["runs"]:
        for name, f in r["flops"].items():
            ms = r["ms"].get(name, {})
            print(f"| {r['W']} | {name} | {f['local'] / 1e9:.2f} | {f['full'] / 1e9:.2f} | "
                  f"{_fmt(ms.get('local'), 1)} | {_fmt(ms.get('full'), 1)} |")


def _world_worker(rank, world, port, n, d, timed, out_dir):
    import _cost_model as cm
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        fns = cm.loss_fns(SWEEP_LOSSES)
        from smi_timm.losses import barlow_twins_loss, gather_with_grad, simclr_loss, smi_loss

        local = {"smi (torch)": lambda a, b: smi_loss(a, b, backend="torch", gather=True),
                 "barlow": lambda a, b: barlow_twins_loss(a, b, gather=True),
                 "simclr": lambda a, b: simclr_loss(a, b, gather=True)}
        full = {name: (lambda a, b, f=fn: f(gather_with_grad(a), gather_with_grad(b))) for name, fn in fns.items()}
        res = {"flops": {}, "ms": {}}
        for name in SWEEP_LOSSES:
            za, zb = cm.inputs(n, d, seed=rank)
            kinds = (("local", local[name]), ("full", full[name]))
            res["flops"][name] = {kind: _product_flops(lambda f=f, a=za, b=zb: f(a, b).backward()) for kind, f in kinds}
            if timed:
                res["ms"][name] = {kind: 1e3 * _timed_world(f, za, zb) for kind, f in kinds}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def _timed_world(fn, za, zb, repeats=3):
    import statistics
    import time

    import torch.distributed as dist

    times = []
    for _ in range(repeats + 1):
        za.grad = zb.grad = None
        dist.barrier()
        t0 = time.perf_counter()
        fn(za, zb).backward()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _product_flops(fn) -> float:
    """FLOPs of the matrix products ``fn()`` dispatches (2 per multiply-add)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    total = [0.0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                a, b = (args[1], args[2]) if func == torch.ops.aten.addmm.default else (args[0], args[1])
                batch = a.shape[0] if a.ndim == 3 else 1
                total[0] += 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return total[0]


def run_world(args) -> dict:
    """gather=True on W gloo processes of this machine: per-rank FLOPs counted, times where W <= the cores."""
    import socket

    import torch.multiprocessing as mp

    from _common import cpu_count

    runs = []
    for w in WORLD_SIZES[:2] if args.quick else WORLD_SIZES:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        timed = w <= cpu_count()
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_world_worker, args=(w, port, WORLD_N, WORLD_D, timed, tmp), nprocs=w, join=True)
            per_rank = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(w)]
        runs.append({"W": w, "timed": timed, "flops": per_rank[0]["flops"],
                     "ms": {name: {k: max(r["ms"][name][k] for r in per_rank) for k in ("local", "full")}
                            for name in per_rank[0]["ms"]}})
        print(f"W={w}: " + ", ".join(f"{name} {f['local'] / 1e9:.2f} / {f['full'] / 1e9:.2f} GFLOP"
                                     for name, f in runs[-1]["flops"].items()), flush=True)
    return {"n": WORLD_N, "D": WORLD_D, "runs": runs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--host", action="store_true", help="host us and torch ops per call, launches stubbed")
    mode.add_argument("--gpu-check", action="store_true", help="the fused loss's GPU targets (CUDA, < 60 s)")
    mode.add_argument("--smoke", action="store_true", help="the --gpu-check code on the CPU at tiny sizes")
    mode.add_argument("--sweep", action="store_true", help="the cost model: time and memory vs N, D and W")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/bench_loss_<mode>.json)")
    p.add_argument("--baseline-ref", default=None, help="--host: also measure the kernels of this git revision")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="--host: tensors' device")
    p.add_argument("--calls", type=int, default=2000, help="--host: calls per timed run")
    p.add_argument("--quick", action="store_true", help="grid: one or two sizes, bf16 only")
    p.add_argument("--cpu", action="store_true", help="grid: benchmark on CPU even when CUDA is available")
    p.add_argument("--no-compile", action="store_true", help="grid: skip the torch.compile column")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (CPU) / --host runs")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: stable on a shared machine)")
    p.add_argument("--n", type=int, nargs="+", default=None, help="batch sizes N (--host: the first; default 64)")
    p.add_argument("--d", type=int, nargs="+", default=None, help="widths D (--host: the first; default 64)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES), help="dtypes (--host: the first)")
    p.add_argument("--kernels-from", default=None, help=argparse.SUPPRESS)  # the baseline subprocess
    p.add_argument("--json-stdout", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.command = " ".join(["python", "benchmarks/bench_loss.py"] + list(sys.argv[1:] if argv is None else argv))
    if args.host:
        args.n, args.d, args.dtypes = args.n or [64], args.d or [64], args.dtypes or ["fp32"]
        return run_host(args)
    if args.gpu_check or args.smoke:
        return run_check(args, smoke=args.smoke)
    if args.sweep:
        return run_sweep(args)
    return run_grid(args)


if __name__ == "__main__":
    raise SystemExit(main())
