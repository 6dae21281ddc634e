"""Benchmark of the SMI loss: fused Triton kernels vs the torch reference (eager and torch.compile), the Barlow Twins
loss, and a three-GEMM roofline. Forward + backward time and peak extra memory; prints a table and writes JSON.

    python benchmarks/bench_loss.py                 # full grid (CUDA) / reduced grid (CPU)
    python benchmarks/bench_loss.py --quick         # smoke run
    python benchmarks/bench_loss.py --out results.json

CUDA: times are the median of triton.testing.do_bench; memory is torch.cuda.max_memory_allocated() during one
forward + backward minus the memory allocated before it (inputs excluded, returned gradients included).
CPU: the Triton kernels only run under the Triton interpreter, whose speed means nothing, so only the torch paths
are timed (time.perf_counter median) at reduced sizes, and memory is reported as n/a (the CPU allocator has no peak
counter).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

# Targets of the fused kernels (CUDA only).
TARGETS = {
    "triton_over_3gemm_max": 1.25,  # N=4096, D=8192, bf16
    "eager_over_triton_min": 5.0,  # N in {256, 1024}
    "barlow_over_triton_min": 10.0,  # N=256, D=8192
}

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_tag(device):
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    return "cuda-" + "".join(c if c.isalnum() else "-" for c in name).strip("-")


# ------------------------------------------------------------------------------------------------------------------
# the measured functions: each returns a callable running forward + backward
# ------------------------------------------------------------------------------------------------------------------
def _inputs(n, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    za = torch.randn(n, d, generator=g, device=device, dtype=torch.float32)
    zb = za + 0.5 * torch.randn(n, d, generator=g, device=device, dtype=torch.float32)
    return za.to(dtype).requires_grad_(), zb.to(dtype).requires_grad_()


def _fwd_bwd(loss_fn, za, zb):
    def run():
        za.grad = None
        zb.grad = None
        loss_fn(za, zb).backward()

    return run


def make_cases(n, d, dtype, device, compile_ok):
    from smi_timm.losses import BarlowTwinsLoss, smi_loss_reference

    za, zb = _inputs(n, d, dtype, device)
    cases = {}
    if device == "cuda":
        from smi_timm.kernels import smi as smi_mod
        from smi_timm.kernels import smi_loss_triton

        cases["triton"] = _fwd_bwd(smi_loss_triton, za, zb)
        triton_run = _fwd_bwd(smi_loss_triton, za, zb)

        def triton_gemm():  # the gradient products run in the backward: switch the flag around fwd + bwd
            old = smi_mod.GRAD_GEMM
            smi_mod.GRAD_GEMM = "triton"
            try:
                triton_run()
            finally:
                smi_mod.GRAD_GEMM = old

        cases["triton_tgemm"] = triton_gemm
    cases["eager"] = _fwd_bwd(smi_loss_reference, za, zb)
    if compile_ok:
        cases["compile"] = _fwd_bwd(torch.compile(smi_loss_reference), za, zb)
    cases["barlow"] = _fwd_bwd(BarlowTwinsLoss(), za, zb)

    # roofline: the three GEMMs the loss cannot avoid (rho = ahat bhat^T, G bhat, G^T ahat) in the compute dtype
    ahat = torch.randn(n, d, device=device, dtype=dtype)
    bhat = torch.randn(n, d, device=device, dtype=dtype)
    gmat = torch.randn(n, n, device=device, dtype=dtype)

    def three_gemm():
        torch.mm(ahat, bhat.t())
        torch.mm(gmat, bhat)
        torch.mm(gmat.t(), ahat)

    cases["gemm3"] = three_gemm
    return cases, (za, zb)


def time_ms(fn, device, repeats):
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(100, 20 * repeats), return_mode="median"))
    fn()  # warm-up (and compilation)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_mib(fn, device):
    if device != "cuda":
        return None
    fn()  # warm-up (autotuning, compilation)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _fmt(x, digits=2):
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}f}"


def _ratio(a, b):
    if a is None or b is None or isinstance(a, str) or isinstance(b, str) or b == 0:
        return None
    return a / b


def run(args):
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    torch.manual_seed(0)
    if device == "cpu":
        torch.set_num_threads(args.threads)
        grid_n = [256] if args.quick else [256, 1024]
        grid_d = [512] if args.quick else [512, 2048]
    else:
        grid_n = [256, 1024] if args.quick else [256, 1024, 4096, 16384]
        grid_d = [2048] if args.quick else [2048, 8192]
    dtypes = ["bf16"] if args.quick else ["bf16", "fp32"]
    grid_n, grid_d, dtypes = args.n or grid_n, args.d or grid_d, args.dtypes or dtypes
    compile_ok = not args.no_compile
    repeats = 3 if args.quick else args.repeats

    rows = []
    for dname in dtypes:
        for n in grid_n:
            for d in grid_d:
                dtype = DTYPES[dname]
                row = {"N": n, "D": d, "dtype": dname}
                try:
                    cases, _ = make_cases(n, d, dtype, device, compile_ok)
                except Exception as err:  # noqa: BLE001
                    print(f"skip N={n} D={d} {dname}: {err}", file=sys.stderr)
                    continue
                for name, fn in cases.items():
                    try:
                        row[f"{name}_ms"] = time_ms(fn, device, repeats)
                        row[f"{name}_mib"] = peak_mib(fn, device)
                    except torch.cuda.OutOfMemoryError:
                        row[f"{name}_ms"] = row[f"{name}_mib"] = "OOM"
                        torch.cuda.empty_cache()
                    except Exception as err:  # noqa: BLE001 - e.g. no C++ compiler for torch.compile on CPU
                        row[f"{name}_ms"] = row[f"{name}_mib"] = None
                        row[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:200]}"
                del cases
                row["triton_over_3gemm"] = _ratio(row.get("triton_ms"), row.get("gemm3_ms"))
                row["eager_over_triton"] = _ratio(row.get("eager_ms"), row.get("triton_ms"))
                row["barlow_over_triton"] = _ratio(row.get("barlow_ms"), row.get("triton_ms"))
                row["eager_over_3gemm"] = _ratio(row.get("eager_ms"), row.get("gemm3_ms"))
                if device == "cuda":
                    row["triton_tgemm_faster"] = _ratio(row.get("triton_tgemm_ms"), row.get("triton_ms"))
                rows.append(row)
                print(_row_line(row, device), flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()

    streaming = None
    if device == "cuda" and not args.quick:
        streaming = streaming_check(16384, 8192)
    return device, rows, streaming


def streaming_check(n, d):
    from smi_timm.kernels import smi_loss_triton, smi_streaming_peak_bytes
    from smi_timm.kernels._memory import default_block_rows

    out = {}
    for dname in ("bf16", "fp32"):
        dtype = DTYPES[dname]
        za, zb = _inputs(n, d, dtype, "cuda")
        rows = default_block_rows(n, dtype)
        fn = _fwd_bwd(lambda a, b: smi_loss_triton(a, b, streaming=True, block_rows=rows), za, zb)
        try:
            peak = peak_mib(fn, "cuda") * 2**20
        except torch.cuda.OutOfMemoryError:
            peak = None
        bound = smi_streaming_peak_bytes(n, d, rows, dtype)
        out[dname] = {"N": n, "D": d, "block_rows": rows, "peak_bytes": peak, "formula_bytes": bound,
                      "within_formula": peak is not None and peak <= bound + 64 * 512}
        del za, zb, fn
        torch.cuda.empty_cache()
    return out


_COLS = ["triton", "eager", "compile", "barlow", "gemm3"]


def _header(device):
    cols = ["N", "D", "dtype"] + [f"{c} ms" for c in _COLS]
    if device == "cuda":
        cols += [f"{c} MiB" for c in _COLS] + ["triton/3gemm", "eager/triton", "barlow/triton", "tgemm/torchmm"]
    else:
        cols += ["eager/3gemm"]
    return cols


def _row_cells(row, device):
    cells = [str(row["N"]), str(row["D"]), row["dtype"]] + [_fmt(row.get(f"{c}_ms")) for c in _COLS]
    if device == "cuda":
        cells += [_fmt(row.get(f"{c}_mib"), 1) for c in _COLS]
        cells += [_fmt(row.get(k)) for k in ("triton_over_3gemm", "eager_over_triton", "barlow_over_triton",
                                               "triton_tgemm_faster")]
    else:
        cells += [_fmt(row.get("eager_over_3gemm"))]
    return cells


def _row_line(row, device):
    return "| " + " | ".join(_row_cells(row, device)) + " |"


def markdown_table(rows, device):
    head = _header(device)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += [_row_line(r, device) for r in rows]
    return "\n".join(lines)


def check_targets(rows, streaming):
    res = {}
    for r in rows:
        if r["N"] == 4096 and r["D"] == 8192 and r["dtype"] == "bf16" and r.get("triton_over_3gemm") is not None:
            res["triton_over_3gemm(N=4096,D=8192,bf16)"] = (r["triton_over_3gemm"],
                                                           r["triton_over_3gemm"] <= TARGETS["triton_over_3gemm_max"])
        if r["N"] in (256, 1024) and r.get("eager_over_triton") is not None:
            key = f"eager_over_triton(N={r['N']},D={r['D']},{r['dtype']})"
            res[key] = (r["eager_over_triton"], r["eager_over_triton"] >= TARGETS["eager_over_triton_min"])
        if r["N"] == 256 and r["D"] == 8192 and r.get("barlow_over_triton") is not None:
            key = f"barlow_over_triton(N=256,D=8192,{r['dtype']})"
            res[key] = (r["barlow_over_triton"], r["barlow_over_triton"] >= TARGETS["barlow_over_triton_min"])
    if streaming:
        for dname, s in streaming.items():
            res[f"streaming_peak_within_formula(N=16384,D=8192,{dname})"] = (s["peak_bytes"], s["within_formula"])
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_loss_<device>.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: one or two sizes, bf16 only")
    p.add_argument("--cpu", action="store_true", help="benchmark on CPU even when CUDA is available")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats on CPU (CUDA: do_bench)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: stable on a shared machine)")
    p.add_argument("--n", type=int, nargs="+", default=None, help="override the batch sizes N of the grid")
    p.add_argument("--d", type=int, nargs="+", default=None, help="override the embedding widths D of the grid")
    p.add_argument("--dtypes", nargs="+", default=None, choices=["bf16", "fp32"], help="override the dtypes")
    args = p.parse_args(argv)

    device, rows, streaming = run(args)
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
    }
    if device == "cpu":
        meta["note"] = ("CPU run: the Triton kernels need a GPU (the interpreter is a debugging tool), so only the "
                        f"torch paths were timed, at reduced sizes, with {args.threads} thread(s); memory n/a.")
    print()
    print(markdown_table(rows, device))
    targets = check_targets(rows, streaming) if device == "cuda" else {}
    for k, (v, ok) in targets.items():
        print(f"target {k}: {v} -> {'met' if ok else 'NOT met'}")
    if "note" in meta:
        print("\n" + meta["note"])
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"bench_loss_{_device_tag(device)}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "streaming": streaming,
                   "targets": {k: {"value": v, "met": ok} for k, (v, ok) in targets.items()}}, f, indent=2)
    print(f"wrote {out}")


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
