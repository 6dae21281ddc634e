"""``smi-pretrain`` and the shared entry point of the scripts in ``recipes/``."""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

from .config import build_parser, config_from_args

__all__ = ["main", "run_recipe", "format_throughput", "EXIT_BAD_INPUT", "EXIT_NON_FINITE", "EXIT_CHECKPOINT"]

# Exit codes of smi-pretrain and the recipes (any other error: 1, with its traceback).
EXIT_BAD_INPUT = 2  # a configuration, data or checkpoint problem the message names
EXIT_NON_FINITE = 3  # the loss became NaN / inf; nothing was written after the last good checkpoint
EXIT_CHECKPOINT = 4  # a checkpoint could not be written (full disk, permissions); the last good one is intact


def format_throughput(summary: Dict[str, Any]) -> str:
    """One line of the run's throughput summary (``TrainResult.throughput``)."""
    text = (f"{summary['images_per_s']:.1f} two-view images/s, {summary['step_time_ms']:.1f} ms/step, "
            f"{100 * summary['data_wait_frac']:.1f}% of the time waiting for data")
    if "peak_mem_mib" in summary:
        text += f", peak {summary['peak_mem_mib'] / 1024:.2f} GiB allocated"
    return text


def run_recipe(defaults: Optional[Dict[str, Any]] = None, argv: Optional[List[str]] = None,
               description: str = "", prog: Optional[str] = None) -> int:
    """Parse ``argv`` over the recipe ``defaults``, train, and print where the results are. Returns an exit code."""
    from .checkpoint import CheckpointWriteError, UnsafeCheckpointError
    from .loop import NonFiniteLossError, train

    parser = build_parser(defaults, description=description, prog=prog)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        result = train(cfg)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NON_FINITE
    except CheckpointWriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CHECKPOINT
    except (ValueError, FileNotFoundError, UnsafeCheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        print(f"{result.status}: step {result.step}/{result.total_steps}")
        print(f"  run directory: {result.run_dir}")
        print(f"  metrics:       {result.metrics_path}")
        if result.last_checkpoint:
            print(f"  checkpoint:    {result.last_checkpoint}")
        if result.export_dir:
            print(f"  weights:       {result.export_dir / 'model.safetensors'}")
        if result.curve_png:
            print(f"  curve:         {result.curve_png}")
        if result.final_knn:
            print(f"  kNN top-1:     {result.final_knn['knn_top1']:.2f}%")
        if result.throughput:
            print(f"  throughput:    {format_throughput(result.throughput)}")
    state.wait_for_everyone()
    state.destroy_process_group()  # a clean shutdown of the (gloo/NCCL) process group before exit
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``smi-pretrain``: the generic recipe (every option is a flag; see ``--help``)."""
    return run_recipe(argv=argv, description="SMI / Barlow Twins / VICReg pretraining of any timm backbone.",
                      prog="smi-pretrain")


if __name__ == "__main__":
    raise SystemExit(main())
