"""Tables of evaluation results: the markdown rows ``smi-eval`` prints and appends, and the model card shows.

Pure formatting of the result dicts :mod:`smi_timm.eval.run` returns; nothing here reads or writes files.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

__all__ = ["TABLE_HEADER", "TRANSFER_HEADER", "table_row", "transfer_rows"]

TABLE_HEADER = ("| model | weights | train | test | eval | top-1 | top-5 | notes |\n"
                "|---|---|---|---|---|---:|---:|---|\n")
TRANSFER_HEADER = "| model | weights | data | size | eval | top-1 | top-5 |\n|---|---|---|---:|---|---:|---:|\n"


def _fmt(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2f}"


def _model_and_weights(result: Dict[str, Any]) -> tuple:
    model = result["model"] + (" (CIFAR stem)" if result.get("cifar_stem") else "")
    weights = result["weights"] + (f" `{result['weights_sha256'][:8]}`" if result.get("weights_sha256") else "")
    return model, weights


def table_row(result: Dict[str, Any]) -> str:
    """The markdown row (``TABLE_HEADER`` columns) of a :func:`~smi_timm.eval.run.run_knn` /
    :func:`~smi_timm.eval.run.run_linear` result."""
    model, weights = _model_and_weights(result)
    return (f"| {model} | {weights} | {result['train_label']} | {result['test_label']} | {result['eval']} | "
            f"{_fmt(result['top1'])} | {_fmt(result['top5'])} | {result.get('notes', '')} |")


def transfer_rows(result: Dict[str, Any]) -> List[str]:
    """Markdown rows (``TRANSFER_HEADER`` columns) of a :func:`~smi_timm.eval.transfer.run_transfer` result: one per
    size and evaluation."""
    model, weights = _model_and_weights(result)
    rows = []
    for ev in result["evals"]:
        cells = [(f"kNN {k}, T={result['T']:g}", ev["knn"][k]) for k in ev["knn"]]
        cells.append((f"linear {result['probe']['epochs']} ep", ev["linear"]))
        for name, acc in cells:
            rows.append(f"| {model} | {weights} | {result['test_label']} | {ev['image_size']} | {name} | "
                        f"{acc['top1']:.2f} | {acc['top5']:.2f} |")
    return rows
