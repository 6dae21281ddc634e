"""Transfer evaluation: frozen backbones on a labelled data set, by kNN and a linear probe, at several input sizes.

:func:`run_transfer` is what ``smi-eval transfer`` runs and what the comparison harness calls for its transfer phase:
for each image size (``None`` = the backbone's own, e.g. the pretraining resolution recorded in an export) the
features of the training and test images are extracted once, then classified by weighted kNN (every ``k``,
temperature ``T``) and by the linear probe of :mod:`smi_timm.eval.linear`. Low-resource sets (tens of images per
class) are the intended use; the random-init floor (``weights="random"`` with ``model``) is the reference any
pretraining must beat.

::

    smi-eval transfer --weights EXPORT --weights random --model resnet18 \\
        --train ../shared/data/flowers12/train-000000.tar --test ../shared/data/flowers12/test-000000.tar \\
        --image-sizes native 64 --k 20 5 --out transfer.json --table transfer.md
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .features import DataSpec, data_label, data_list

__all__ = ["run_transfer", "transfer_rows", "TRANSFER_HEADER", "parse_image_sizes", "architecture_args"]

TRANSFER_HEADER = "| model | weights | data | size | eval | top-1 | top-5 |\n|---|---|---|---:|---|---:|---:|\n"


def parse_image_sizes(items: Optional[Sequence[Any]]) -> List[Optional[int]]:
    """``["native", "64"]`` -> ``[None, 64]`` (``native``/``none``/``None`` = the backbone's own input size)."""
    sizes: List[Optional[int]] = []
    for item in items if items else [None]:
        text = str(item).strip().lower()
        if text in ("native", "none", "default"):
            sizes.append(None)
            continue
        try:
            size = int(text)
        except ValueError:
            raise ValueError(f"image size {item!r}: expected a number of pixels or 'native'") from None
        if size < 1:
            raise ValueError(f"image size must be positive, got {size}")
        sizes.append(size)
    return sizes


def architecture_args(source: Any, model: Optional[str] = None, cifar_stem: bool = False,
                      timm_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The architecture arguments of :func:`~smi_timm.resolve.resolve_backbone` that apply to ``source``: ``model``,
    ``cifar_stem`` and ``timm_kwargs`` for ``random``, ``timm:NAME`` and bare ``.safetensors`` files; none for exports
    and runs, which record their own (so one command can mix them)."""
    text = str(source)
    if text == "random" or text.startswith("timm:") or text.endswith(".safetensors"):
        return dict(model=model, cifar_stem=cifar_stem, timm_kwargs=timm_kwargs)
    return dict(model=None, cifar_stem=False, timm_kwargs=None)


def run_transfer(weights: str = "random", train: DataSpec = (), test: DataSpec = (), *,
                 image_sizes: Sequence[Optional[int]] = (None, 64), ks: Sequence[int] = (20, 5), T: float = 0.1,
                 epochs: int = 100, lr: float = 0.1, wd: float = 1e-4, probe_batch_size: int = 256,
                 flip: bool = False, model: Optional[str] = None, cifar_stem: bool = False,
                 weights_file: Optional[str] = None, timm_kwargs: Optional[Dict[str, Any]] = None, seed: int = 0,
                 batch_size: int = 256, workers: int = 2, amp: str = "no", device: Optional[str] = None,
                 cache_dir: Optional[str] = None, max_batches: Optional[int] = None, out: Optional[str] = None,
                 table: Optional[str] = None, progress: bool = True, quiet: bool = False) -> Dict[str, Any]:
    """kNN (every ``k`` of ``ks``, temperature ``T``) and linear-probe accuracy of the frozen backbone ``weights``
    (any source of :func:`smi_timm.resolve.resolve_backbone`; ``model`` / ``cifar_stem`` / ``timm_kwargs`` are used
    only where the source needs them, see :func:`architecture_args`) trained on ``train`` and evaluated on ``test``,
    at every size of ``image_sizes``.

    Returns ``{"weights", "model", "weights_sha256", "train", "test", "ks", "T", "evals": [{"image_size",
    "knn": {"k=20": {"top1", "top5"}, ...}, "linear": {"top1", "top5", "train_top1"}, "num_train", "num_test",
    "num_classes"}, ...], "table_rows": [...], "seconds"}``; written as JSON to ``out`` and as markdown rows to
    ``table`` (header added when the file is new).
    """
    from ..layout import write_json_atomic
    from .cli import run_knn, run_linear

    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    t0 = time.perf_counter()
    common = dict(**architecture_args(weights, model, cifar_stem, timm_kwargs), weights_file=weights_file, seed=seed,
                  batch_size=batch_size, workers=workers, amp=amp, device=device, cache_dir=cache_dir,
                  max_batches=max_batches, progress=progress, quiet=True)
    evals, first = [], None
    for size in image_sizes:
        # the same extraction settings: kNN and the probe share one feature extraction (the feature cache)
        knn = run_knn(weights, train, test, image_size=size, k=ks[0], extra_k=ks[1:], T=T, **common)
        lin = run_linear(weights, train, test, image_size=size, epochs=epochs, lr=lr, wd=wd,
                         probe_batch_size=probe_batch_size, flip=flip, **common)
        first = first or knn
        evals.append(dict(image_size=knn["image_size"], knn=knn["results"],
                          linear=dict(top1=lin["top1"], top5=lin["top5"], train_top1=lin["train_top1"]),
                          num_train=knn["num_train"], num_test=knn["num_test"], num_classes=knn["num_classes"]))
    result = dict(task="transfer", weights=first["weights"], model=first["model"], cifar_stem=first["cifar_stem"],
                  weights_sha256=first["weights_sha256"], train=data_list(train), test=data_list(test),
                  train_label=data_label(train), test_label=data_label(test), ks=ks, T=float(T),
                  probe=dict(epochs=epochs, lr=lr, wd=wd, batch_size=probe_batch_size, flip=flip), evals=evals,
                  date=first["date"], versions=first["versions"], device=first["device"])
    result["table_rows"] = transfer_rows(result)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if out:
        write_json_atomic(out, result, sort_keys=False)
    if table:
        _append_rows(table, result["table_rows"])
    if not quiet:
        print(TRANSFER_HEADER + "\n".join(result["table_rows"]))
    return result


def transfer_rows(result: Dict[str, Any]) -> List[str]:
    """Markdown rows (``TRANSFER_HEADER`` columns) of a :func:`run_transfer` result: one per size and evaluation."""
    model = result["model"] + (" (CIFAR stem)" if result.get("cifar_stem") else "")
    weights = result["weights"] + (f" `{result['weights_sha256'][:8]}`" if result.get("weights_sha256") else "")
    rows = []
    for ev in result["evals"]:
        cells = [(f"kNN {k}, T={result['T']:g}", ev["knn"][k]) for k in ev["knn"]]
        cells.append((f"linear {result['probe']['epochs']} ep", ev["linear"]))
        for name, acc in cells:
            rows.append(f"| {model} | {weights} | {result['test_label']} | {ev['image_size']} | {name} | "
                        f"{acc['top1']:.2f} | {acc['top5']:.2f} |")
    return rows


def _append_rows(table: str, rows: List[str]) -> None:
    path = Path(table)
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write((TRANSFER_HEADER if new else "") + "\n".join(rows) + "\n")
