"""Evaluation of frozen backbones: feature extraction, weighted kNN, linear probe, transfer.

Submodules are imported on first use, so ``import smi_timm.eval`` stays light (no data-loading stack).

* :class:`EvalSettings` (``smi_timm.eval.settings``): every evaluation setting, one frozen object
* :func:`run_knn`, :func:`run_linear`, :func:`evaluate` (both from one extraction) and :class:`Evaluation`
  (resolve once, extract once per size, then kNN and the probe) (``smi_timm.eval.run``)
* :func:`run_transfer`: kNN at several k and the linear probe at several input sizes (``smi_timm.eval.transfer``)
* :func:`extract_features`, :func:`extract_pair`, :func:`eval_loader` and the on-disk feature cache
  (``smi_timm.eval.features``)
* :func:`knn_evaluate` (backbone + bank + queries -> kNN accuracy), :func:`knn_classify`, :func:`knn_classify_multi`
  (``smi_timm.eval.knn``); :func:`train_linear_probe` (``smi_timm.eval.linear``)
* the markdown tables of the results (``smi_timm.eval.report``)
"""
from importlib import import_module as _import_module

_LAZY = {
    "EvalSettings": "settings",
    "Evaluation": "run",
    "run_knn": "run",
    "run_linear": "run",
    "evaluate": "run",
    "run_transfer": "transfer",
    "extract_features": "features",
    "extract_pair": "features",
    "eval_loader": "features",
    "FeaturePair": "features",
    "resolve_amp_dtype": "features",
    "feature_cache_key": "features",
    "load_cached_features": "features",
    "save_cached_features": "features",
    "knn_classify": "knn",
    "knn_classify_multi": "knn",
    "knn_evaluate": "knn",
    "KnnResult": "knn",
    "train_linear_probe": "linear",
    "standardize": "linear",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(_import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'smi_timm.eval' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
