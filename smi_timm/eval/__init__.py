"""Evaluation of frozen backbones: feature extraction, weighted kNN, linear probe and the ``smi-eval`` command.

Submodules are imported on first use, so ``import smi_timm.eval`` stays light (no data-loading stack).

* :func:`extract_features`, :func:`extract_pair`, :func:`eval_loader` and the feature cache
  (``smi_timm.eval.features``)
* :func:`knn_evaluate` (backbone + bank + queries -> kNN accuracy), :func:`knn_classify`, :func:`knn_classify_multi`
  (``smi_timm.eval.knn``)
* :func:`train_linear_probe` (``smi_timm.eval.linear``)
* :func:`run_knn`, :func:`run_linear`, :func:`load_backbone` (``smi_timm.eval.cli``; they need ``smi_timm.data``)
* :func:`run_transfer`: kNN at several k and the linear probe at several input sizes (``smi_timm.eval.transfer``)
"""
from importlib import import_module as _import_module

_LAZY = {
    "extract_features": "features",
    "extract_pair": "features",
    "eval_loader": "features",
    "FeaturePair": "features",
    "resolve_amp_dtype": "features",
    "feature_cache_key": "features",
    "load_cached_features": "features",
    "save_cached_features": "features",
    "clear_memory_cache": "features",
    "knn_classify": "knn",
    "knn_classify_multi": "knn",
    "knn_evaluate": "knn",
    "KnnResult": "knn",
    "train_linear_probe": "linear",
    "standardize": "linear",
    "run_transfer": "transfer",
    "run_knn": "cli",
    "run_linear": "cli",
    "load_backbone": "cli",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(_import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'smi_timm.eval' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
