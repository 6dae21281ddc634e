"""Section a of ``benchmarks/gpu_check.sh``: the environment, then the one-time compile of the loss kernels.

Prints and saves (``--out``) the library versions and the hardware, then compiles, once, every SMI kernel the later
sections launch (into Triton's on-disk cache, ``TRITON_CACHE_DIR``), so that no timed section pays for compilation
and no two processes compile at once. ``--smoke`` runs the same code on the CPU under the Triton interpreter with
tiny shapes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

# (N, D) of the SMI losses the GPU check runs in bf16: the loss benchmark's shapes, the R50 recipe (batch 256,
# projector 8192) and the ViT recipe (batch 128); the CIFAR section runs fp32/bf16 at batch 256 and 2048 wide.
GPU_SHAPES = [(256, 8192), (128, 8192), (4096, 8192), (16384, 8192), (256, 2048)]
SMOKE_SHAPES = [(8, 32)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precompile", action="store_true", help="compile the loss kernels for the check's shapes")
    p.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    record = environment(device)
    for name in ("torchvision", "timm", "accelerate", "safetensors", "webdataset"):
        try:
            record[name] = __import__(name).__version__
        except ImportError:
            record[name] = "missing"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        record["gpu"] = f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2 ** 30:.0f} GiB"
    print(json.dumps(record, indent=1))
    if args.precompile:
        from smi_timm.kernels import precompile

        compiled = {}
        for n, d in (SMOKE_SHAPES if args.smoke else GPU_SHAPES):
            for dtype in ((torch.float32,) if args.smoke else (torch.bfloat16, torch.float32)):
                t0 = time.perf_counter()
                precompile(n, d, dtype, device)
                compiled[f"{n}x{d} {str(dtype).replace('torch.', '')}"] = round(time.perf_counter() - t0, 2)
                print(f"compiled SMI kernels for N={n}, D={d}, {dtype}: {compiled[f'{n}x{d} ' + str(dtype)[6:]]} s",
                      flush=True)
        record["precompile_seconds"] = compiled
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
