"""Training curves: the one reader, summary and plot of a run's ``metrics.jsonl``.

``metrics.jsonl`` (:data:`smi_timm.layout.METRICS`) holds one JSON object per line, each with a ``step``: training
records (``loss``, ``lr``, ``images_per_s``, ...) at log steps and kNN-monitor records (``knn_top1``, ``knn_top5``).
The training loop, ``smi-analyze`` and the comparison harness all read and plot it through this module.
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .layout import atomic_write_bytes

__all__ = ["read_metrics", "metric_series", "summarize_curves", "plot_curves", "save_figure", "CURVE_TITLES"]

Rows = Sequence[Dict[str, Any]]

#: Panel title of each plotted key (other keys are titled by their name).
CURVE_TITLES = {"loss": "training loss", "lr": "learning rate", "knn_top1": "kNN top-1 (%)"}


def read_metrics(path: Union[str, os.PathLike]) -> Tuple[List[Dict[str, Any]], int]:
    """Rows of a ``metrics.jsonl`` (JSON objects with a numeric ``step``) and the number of unreadable lines skipped
    (a line cut short by a crash, or anything else that is not such an object)."""
    rows, bad = [], 0
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def metric_series(rows: Iterable[Dict[str, Any]], key: str) -> Tuple[List[float], List[float]]:
    """``(steps, values)`` of ``key``, sorted by step; rows without a finite number for ``key`` are left out."""
    pts = sorted((float(r["step"]), float(r[key])) for r in rows
                 if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key])))
    return [p[0] for p in pts], [p[1] for p in pts]


def summarize_curves(rows: Rows) -> Dict[str, Any]:
    """``rows``, ``last_step``, ``final_loss``, ``best_knn_top1`` and ``final_knn_top1`` of a run's rows."""
    steps, losses = metric_series(rows, "loss")
    _, knn = metric_series(rows, "knn_top1")
    return {"rows": len(rows), "last_step": max(steps) if steps else None,
            "final_loss": losses[-1] if losses else None,
            "best_knn_top1": max(knn) if knn else None, "final_knn_top1": knn[-1] if knn else None}


def plot_curves(runs: Union[str, os.PathLike, Rows, Mapping[str, Rows]], out_png: Union[str, os.PathLike],
                keys: Sequence[str] = ("loss", "lr", "knn_top1"), *, title: Optional[str] = None,
                dpi: int = 110) -> Optional[Path]:
    """Plot ``keys`` against the step, one panel per key that has data, and write ``out_png`` atomically.

    Args:
        runs: a ``metrics.jsonl`` path, the rows of one run, or ``{label: rows}`` for several runs (one line each
            per panel, with a legend).
        keys: metrics to plot; panels without data are left out.
        title: figure title.

    Returns:
        ``out_png``, or None (nothing written) when no key has data.
    """
    from matplotlib.figure import Figure  # the object API: no pyplot state, no backend switch

    if isinstance(runs, (str, os.PathLike)):
        runs = read_metrics(runs)[0]
    labelled: Mapping[str, Rows] = runs if isinstance(runs, Mapping) else {"": runs}
    panels = [k for k in keys if any(metric_series(rows, k)[0] for rows in labelled.values())]
    if not panels:
        return None
    outside = len(labelled) > 4  # a long legend goes right of the panels instead of over the curves
    fig = Figure(figsize=(4.2 * len(panels) + (2.8 if outside else 0.0), 3.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, key in zip(axes, panels):
        for label, rows in labelled.items():
            xs, ys = metric_series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label or None)
        ax.set(xlabel="step", title=CURVE_TITLES.get(key, key))
        ax.grid(alpha=0.3)
        if len(labelled) > 1 and not outside:
            ax.legend(fontsize=7)
    if outside:
        axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_png, dpi)
    return Path(out_png)


def save_figure(fig, path: Union[str, os.PathLike], dpi: int = 110) -> None:
    """Write a matplotlib figure as PNG, atomically (a reader never sees half an image)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
