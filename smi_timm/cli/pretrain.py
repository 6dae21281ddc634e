"""``smi-pretrain`` and the shared entry point of the scripts in ``recipes/``.

Every :class:`~smi_timm.train.TrainConfig` field is a flag; a recipe only changes defaults
(``run_recipe(DEFAULTS)``). Exit codes (:data:`smi_timm.cli.common.EXIT_CODES`): 0 finished or interrupted with a
checkpoint, 2 a configuration, data or checkpoint problem the message names, 3 a non-finite loss (nothing written
after the last good checkpoint), 4 a checkpoint that could not be written (the last good one is intact).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..layout import WEIGHTS_NAME
from ..train import TrainResult, build_parser, config_from_args, train
from .common import run_cli

__all__ = ["main", "run_recipe", "format_throughput", "format_data"]


def format_throughput(summary: Dict[str, Any]) -> str:
    """One line of the run's throughput summary (``TrainResult.throughput``)."""
    text = (f"{summary['images_per_s']:.1f} two-view images/s, {summary['step_time_ms']:.1f} ms/step, "
            f"{100 * summary['data_wait_frac']:.1f}% of the time waiting for data")
    if "peak_mem_mib" in summary:
        text += f", peak {summary['peak_mem_mib'] / 1024:.2f} GiB allocated"
    return text


def format_data(data: Dict[str, Any]) -> str:
    """One line of what the loader read and what it did not use (``TrainResult.data``)."""
    unused = {k: v for k, v in data.items() if k != "samples" and v}
    text = f"{data.get('samples', 0)} samples read"
    return text + ("; not used: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in unused.items())
                   if unused else "; none skipped")


def _report(result: TrainResult) -> None:
    print(f"{result.status}: step {result.step}/{result.total_steps}")
    lines = [("run directory", result.run_dir), ("metrics", result.metrics_path),
             ("checkpoint", result.last_checkpoint),
             ("weights", result.export_dir and result.export_dir / WEIGHTS_NAME), ("curve", result.curve_png),
             ("kNN top-1", result.final_knn and f"{result.final_knn['knn_top1']:.2f}%"),
             ("throughput", result.throughput and format_throughput(result.throughput)),
             ("data", result.data and format_data(result.data))]
    for label, value in lines:
        if value:
            print(f"  {label + ':':<15}{value}")


def run_recipe(defaults: Optional[Dict[str, Any]] = None, argv: Optional[List[str]] = None,
               description: str = "", prog: Optional[str] = None) -> int:
    """Parse ``argv`` over the recipe ``defaults``, train, and print where the results are. Returns an exit code."""
    parser = build_parser(defaults, description=description, prog=prog)
    args = parser.parse_args(argv)

    def body() -> int:
        result = train(config_from_args(args))
        from accelerate import PartialState  # the process layout train() set up

        state = PartialState()
        if state.is_main_process:
            _report(result)
        state.wait_for_everyone()
        state.destroy_process_group()  # a clean shutdown of the (gloo/NCCL) process group before exit
        return 0

    return run_cli(prog or "smi-pretrain", body)


def main(argv: Optional[List[str]] = None) -> int:
    """``smi-pretrain``: the generic recipe (every option is a flag; see ``--help``)."""
    return run_recipe(argv=argv, description="Self-supervised pretraining (SMI, Barlow Twins, VICReg, SimCLR, or any "
                                             "registered loss) of any timm backbone.", prog="smi-pretrain")


if __name__ == "__main__":
    raise SystemExit(main())
