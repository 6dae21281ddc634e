"""Fused Triton kernels of smi-timm (installed as ``smi_timm.kernels``).

``smi_loss_triton`` and ``precompile`` need Triton (Linux) and a CUDA device, or CPU tensors with
``TRITON_INTERPRET=1`` set before Triton is first imported. The memory model (``smi_dense_peak_bytes``,
``smi_streaming_peak_bytes``) and the tile heuristic (``heuristic_config``) are pure Python.
"""
from ..errors import ConfigError
from ._memory import smi_dense_peak_bytes, smi_streaming_peak_bytes
from ._plan import TRANSFORMS, KernelConfig, TileConfig, heuristic_config

try:
    from .smi import INTERPRET, precompile, smi_loss_triton
    HAS_TRITON = True
except ImportError as _err:  # Triton missing (e.g. macOS / Windows wheels of torch)
    HAS_TRITON = False
    INTERPRET = False
    _IMPORT_ERROR = _err

    def smi_loss_triton(*args, **kwargs):
        raise ConfigError(f"smi_loss_triton needs Triton, which could not be imported: {_IMPORT_ERROR}; use the "
                          f"torch backend of the SMI loss (backend='torch')")

    def precompile(*args, **kwargs):
        raise ConfigError(f"precompile needs Triton, which could not be imported: {_IMPORT_ERROR}")

__all__ = ["HAS_TRITON", "INTERPRET", "TRANSFORMS", "KernelConfig", "TileConfig", "heuristic_config", "precompile",
           "smi_loss_triton", "smi_streaming_peak_bytes", "smi_dense_peak_bytes"]
