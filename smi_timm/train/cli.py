"""``smi-pretrain`` and the shared entry point of the scripts in ``recipes/``."""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

from .config import build_parser, config_from_args

__all__ = ["main", "run_recipe"]


def run_recipe(defaults: Optional[Dict[str, Any]] = None, argv: Optional[List[str]] = None,
               description: str = "", prog: Optional[str] = None) -> int:
    """Parse ``argv`` over the recipe ``defaults``, train, and print where the results are. Returns an exit code."""
    from .loop import NonFiniteLossError, train

    parser = build_parser(defaults, description=description, prog=prog)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        result = train(cfg)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
    state.wait_for_everyone()
    state.destroy_process_group()  # a clean shutdown of the (gloo/NCCL) process group before exit
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``smi-pretrain``: the generic recipe (every option is a flag; see ``--help``)."""
    return run_recipe(argv=argv, description="SMI / Barlow Twins / VICReg pretraining of any timm backbone.",
                      prog="smi-pretrain")


if __name__ == "__main__":
    raise SystemExit(main())
