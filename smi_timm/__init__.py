"""smi-timm: SMI (Semantic Mutual Information) self-supervised pretraining for every timm backbone.

``import smi_timm`` is light: it imports torch and timm and registers the ``smi_*`` model names with timm's
registry. Triton, webdataset and accelerate are imported only by the modules that need them
(``smi_timm.kernels``, ``smi_timm.data``, ``smi_timm.train``).
"""
from importlib import import_module as _import_module

__version__ = "0.1.0"

from .models import SSLModel, create_ssl_model  # noqa: E402
from .models import registry as _registry  # noqa: E402,F401  (registers the smi_* names with timm)

_LAZY = {
    "SMILoss": "smi_timm.losses",
    "BarlowTwinsLoss": "smi_timm.losses",
    "VICRegLoss": "smi_timm.losses",
    "smi_loss": "smi_timm.losses",
    "create_loss": "smi_timm.losses",
}

__all__ = ["__version__", "SSLModel", "create_ssl_model", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(_import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'smi_timm' has no attribute {name!r}")
