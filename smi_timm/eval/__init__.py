"""Evaluation of frozen backbones: feature extraction, weighted kNN, linear probe and the ``smi-eval`` command.

Submodules are imported on first use, so ``import smi_timm.eval`` stays light (no data-loading stack).

* :func:`extract_features` (``smi_timm.eval.features``)
* :func:`knn_classify`, :func:`knn_classify_multi` (``smi_timm.eval.knn``)
* :func:`train_linear_probe` (``smi_timm.eval.linear``)
* :func:`run_knn`, :func:`run_linear`, :func:`load_backbone` (``smi_timm.eval.cli``; they need ``smi_timm.data``)
"""
from importlib import import_module as _import_module

_LAZY = {
    "extract_features": "features",
    "resolve_amp_dtype": "features",
    "knn_classify": "knn",
    "knn_classify_multi": "knn",
    "train_linear_probe": "linear",
    "standardize": "linear",
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
