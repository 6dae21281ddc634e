"""Data pipeline: WebDataset shard writer, two-view SSL loader, eval loader, bundled CIFAR-10 sample.

The SSL loader augments either in its CPU workers or, when batches go to a CUDA device, on the device itself
(workers only read shards; nvJPEG decodes; batched tensor ops augment; see :mod:`smi_timm.data.loaders`). Modules:
``augment`` (recipes, random parameters, the torchvision reference), ``ops`` (batched image ops), ``pipeline`` (the
CPU and device two-view pipelines), ``stream`` (what each worker reads), ``feed`` (the training-process stage),
``workers`` (worker lifecycle), ``reading`` / ``shards`` / ``stats`` (shards and counters).

``import smi_timm`` does not import this package. Names are loaded on first use, so the shard writer
(``smi-make-shards``) starts without importing torch.
"""
from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "IMAGENET_MEAN": "augment",
    "IMAGENET_STD": "augment",
    "PRESETS": "augment",
    "AugmentConfig": "augment",
    "get_augment_config": "augment",
    "SAMPLE_DIR": "bundled",
    "sample_shards": "bundled",
    "sample_classes": "bundled",
    "SSLLoader": "loaders",
    "EvalLoader": "loaders",
    "make_ssl_loader": "loaders",
    "make_eval_loader": "loaders",
    "default_num_workers": "loaders",
    "expand_urls": "reading",
    "count_samples": "reading",
    "write_shards": "shards",
    "ShardWriteSummary": "shards",
    "DataStats": "stats",
    "STAT_KINDS": "stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod = import_module(f".{module}", __name__)
    value = getattr(mod, "KINDS" if name == "STAT_KINDS" else name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .augment import IMAGENET_MEAN, IMAGENET_STD, PRESETS, AugmentConfig, get_augment_config  # noqa: F401
    from .bundled import SAMPLE_DIR, sample_classes, sample_shards  # noqa: F401
    from .loaders import EvalLoader, SSLLoader, default_num_workers, make_eval_loader, make_ssl_loader  # noqa: F401
    from .reading import count_samples, expand_urls  # noqa: F401
    from .shards import ShardWriteSummary, write_shards  # noqa: F401
    from .stats import KINDS as STAT_KINDS  # noqa: F401
    from .stats import DataStats  # noqa: F401
