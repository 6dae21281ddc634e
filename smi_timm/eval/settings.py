"""How a frozen backbone is evaluated: one settings object, passed as it is from the command line to the last call.

:class:`EvalSettings` holds everything that is not the backbone or the data: input size, extraction batch, loader
workers, autocast, device, the kNN's ``k`` / temperature and the linear probe's schedule. ``smi-eval`` builds one
from its flags (:func:`smi_timm.cli.eval.settings_from_args`); the comparison harness, the quick start and Python
users build one directly and change fields with :meth:`EvalSettings.replace`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

from ..errors import ConfigError

__all__ = ["EvalSettings"]


@dataclass(frozen=True)
class EvalSettings:
    """Evaluation settings (frozen: a misspelt field fails at once, and one object can be shared safely)."""

    image_size: Optional[int] = None      #: input size; None: the backbone's own (export / run), see ResolvedBackbone
    batch_size: int = 256                 #: feature-extraction batch
    workers: int = 2                      #: data-loader workers of the extraction
    threads: Optional[int] = None         #: torch CPU threads (applied by the command line; None: torch's choice)
    amp: str = "no"                       #: autocast during extraction: no, bf16 or fp16
    device: Optional[str] = None          #: cuda / cpu (None: cuda when available)
    seed: int = 0                         #: seed of the linear probe (and of ``random`` backbones)
    cache_dir: Optional[str] = None       #: on-disk feature cache (safetensors keyed by weights + data + options)
    max_batches: Optional[int] = None     #: only the first N batches of each split (quick checks)
    progress: bool = True                 #: progress bars
    k: int = 200                          #: kNN neighbours
    extra_k: Tuple[int, ...] = (20,)      #: further neighbour counts reported from the same similarity pass
    T: float = 0.1                        #: kNN vote temperature
    probe_epochs: int = 100               #: linear-probe epochs
    probe_lr: float = 0.1                 #: linear-probe peak SGD learning rate (cosine to 0)
    probe_wd: float = 1e-4                #: linear-probe weight decay
    probe_batch_size: int = 256           #: linear-probe mini-batch
    flip: bool = False                    #: add the features of flipped training images to the probe
    label_key: Optional[str] = None       #: labels from this field of each sample's ``json`` (default: ``cls``)
    classes_file: Optional[str] = None    #: class names, one per line, for labels given as names

    def __post_init__(self):
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"image_size must be positive, got {self.image_size}")
        if self.batch_size < 1 or self.probe_batch_size < 1:
            raise ConfigError(f"batch sizes must be positive, got {self.batch_size} / {self.probe_batch_size}")
        if self.k < 1 or any(int(k) < 1 for k in self.extra_k):
            raise ConfigError(f"kNN k must be positive integers, got {self.k} and {tuple(self.extra_k)}")
        if self.T <= 0:
            raise ConfigError(f"kNN temperature T must be > 0, got {self.T}")
        if self.amp not in ("no", "bf16", "fp16"):
            raise ConfigError(f"amp must be 'no', 'bf16' or 'fp16', got {self.amp!r}")
        object.__setattr__(self, "extra_k", tuple(int(k) for k in self.extra_k))

    def replace(self, **changes) -> "EvalSettings":
        """A copy with ``changes`` (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)

    @property
    def ks(self) -> Tuple[int, ...]:
        """``k`` first, then every ``extra_k`` that differs from it."""
        return (int(self.k), *[k for k in self.extra_k if k != int(self.k)])
