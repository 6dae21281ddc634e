"""Transfer evaluation: frozen backbones on a labelled data set, by kNN and a linear probe, at several input sizes.

:func:`run_transfer` is what ``smi-eval transfer`` runs and what the comparison harness calls for its transfer phase:
the backbone is resolved once; for each image size (``None`` = the backbone's own, e.g. the pretraining resolution
recorded in an export) the features of the training and test images are extracted once, then classified by weighted
kNN (every ``k`` of the settings, temperature ``T``) and by the linear probe of :mod:`smi_timm.eval.linear`.
Low-resource sets (tens of images per class) are the intended use; the random-init floor
(``BackboneSource("random", model=...)``) is the reference any pretraining must beat.

::

    smi-eval transfer --weights EXPORT --weights random --model resnet18 \\
        --train ../shared/data/flowers12/train-000000.tar --test ../shared/data/flowers12/test-000000.tar \\
        --image-sizes native 64 --k 20 5 --out transfer.json --table transfer.md
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

from ..errors import ConfigError
from .features import DataSpec, data_label, data_list
from .report import transfer_rows
from .run import Evaluation, SourceLike, evaluate
from .settings import EvalSettings

__all__ = ["run_transfer", "parse_image_sizes"]


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
            raise ConfigError(f"image size {item!r}: expected a number of pixels or 'native'") from None
        if size < 1:
            raise ConfigError(f"image size must be positive, got {size}")
        sizes.append(size)
    return sizes


def run_transfer(source: SourceLike, train: DataSpec, test: DataSpec, settings: Optional[EvalSettings] = None, *,
                 image_sizes: Sequence[Optional[int]] = (None, 64)) -> Dict[str, Any]:
    """kNN (every ``k`` of ``settings.ks``, temperature ``settings.T``) and linear-probe accuracy of the frozen
    backbone ``source`` trained on ``train`` and evaluated on ``test``, at every size of ``image_sizes``.

    Returns ``{"weights", "model", "weights_sha256", "train", "test", "ks", "T", "probe", "evals": [{"image_size",
    "knn": {"k=20": {"top1", "top5"}, ...}, "linear": {"top1", "top5", "train_top1"}, "num_train", "num_test",
    "num_classes"}, ...], "table_rows": [...], "seconds"}``.
    """
    t0 = time.perf_counter()
    ev = Evaluation.prepare(source, settings)
    s = ev.settings
    evals, first = [], None
    for size in image_sizes:
        both = evaluate(ev, train, test, image_size=size)  # one extraction: kNN and the probe share it
        knn, lin = both["knn"], both["linear"]
        first = first or knn
        evals.append(dict(image_size=knn["image_size"], knn=knn["results"],
                          linear=dict(top1=lin["top1"], top5=lin["top5"], train_top1=lin["train_top1"]),
                          num_train=knn["num_train"], num_test=knn["num_test"], num_classes=knn["num_classes"]))
    if first is None:
        raise ConfigError("run_transfer needs at least one image size")
    result = dict(task="transfer", weights=first["weights"], model=first["model"], cifar_stem=first["cifar_stem"],
                  weights_sha256=first["weights_sha256"], train=data_list(train), test=data_list(test),
                  train_label=data_label(train), test_label=data_label(test), ks=list(s.ks), T=float(s.T),
                  probe=dict(epochs=s.probe_epochs, lr=s.probe_lr, wd=s.probe_wd, batch_size=s.probe_batch_size,
                             flip=s.flip), evals=evals, date=first["date"], versions=first["versions"],
                  device=first["device"], data=first.get("data", {}))
    result["table_rows"] = transfer_rows(result)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result
