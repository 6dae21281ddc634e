"""Instruments for the host overhead of the fused loss (``benchmarks/bench_loss.py --host`` and the tests).

* :func:`stub_launches` replaces every Triton kernel launch of the loss with a no-op, so that what remains of a call
  is the Python, autograd and torch-dispatch work around the kernels (results are then meaningless).
* :func:`dispatched_ops` lists the torch operators a function dispatches, as a ``TorchDispatchMode`` sees them:
  every tensor allocation or torch kernel the loss runs besides its own Triton kernels.
* :func:`aten_ops` lists the outermost ``aten::`` operators the autograd profiler records, which also sees inside
  custom operators (a ``TorchDispatchMode`` sees a custom op as one call).
* :func:`host_time_us` times a function in wall and CPU microseconds per call.

The module imports nothing from the package at import time, so it also instruments another build of the kernels
loaded under the same name (the benchmark's ``--baseline-ref``).
"""
from __future__ import annotations

import contextlib
import importlib
import statistics
import time
import warnings
from types import ModuleType
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["stub_launches", "dispatched_ops", "aten_ops", "host_time_us"]

_KERNEL_TYPES = ("JITFunction", "InterpretedFunction", "Autotuner", "Heuristics")


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **meta)`` does nothing."""

    def __getitem__(self, grid):
        return _noop

    def warmup(self, *args, **kwargs):
        return None


def _noop(*args, **kwargs):
    return None


@contextlib.contextmanager
def stub_launches(module: Optional[ModuleType] = None) -> Iterator[None]:
    """Within the block the loss launches no Triton kernel (its buffers keep whatever they held). ``module``: the
    module holding the kernels (default ``smi_timm.kernels._smi_kernels``); every Triton kernel object in it is
    replaced."""
    k = module if module is not None else importlib.import_module("smi_timm.kernels._smi_kernels")
    saved = {name: obj for name, obj in vars(k).items() if type(obj).__name__ in _KERNEL_TYPES}
    try:
        for name in saved:
            setattr(k, name, _NoLaunch())
        yield
    finally:
        for name, obj in saved.items():
            setattr(k, name, obj)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn: Callable[[], object]) -> List[str]:
    """Names of the torch operators (``aten.new_empty.default``, ...) that ``fn()`` dispatches, in order."""
    with _Recorder() as rec:
        fn()
    return rec.ops


def aten_ops(fn: Callable[[], object]) -> List[str]:
    """Names of the outermost ``aten::`` operators the autograd profiler records during ``fn()`` (operators called
    inside custom operators included; the ones an aten operator calls itself excluded)."""
    from torch.autograd.profiler import profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile() as prof:
            fn()

    def outermost(event):
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    return [e.name for e in prof.function_events if e.name.startswith("aten::") and outermost(e)]


def host_time_us(fn: Callable[[], object], calls: int = 1000, repeats: int = 5, warmup: int = 20
                 ) -> Dict[str, float]:
    """Median over ``repeats`` runs of ``calls`` calls of ``fn()``: wall and process-CPU microseconds per call
    (CPU time is the steadier number on a shared machine), and the fastest run of each."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        wall.append((time.perf_counter() - w0) / calls * 1e6)
        cpu.append((time.process_time() - c0) / calls * 1e6)
    return {"wall_us": statistics.median(wall), "cpu_us": statistics.median(cpu), "wall_us_min": min(wall),
            "cpu_us_min": min(cpu)}
