"""The CIFAR-10 sample bundled with the package (4,000 train + 1,000 test images; see ``sample/README.md``)."""
from __future__ import annotations

from pathlib import Path
from typing import List

from ..errors import DataError, NotFoundError

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
_SPLITS = ("train", "test")


def sample_shards(split: str = "train") -> List[str]:
    """Paths of the bundled sample's shards for ``split`` (``"train"``: 4 shards, 4,000 images, 400 per class;
    ``"test"``: 2 shards, 1,000 images, 100 per class). A JSON index lies next to them, so the loaders know the
    epoch length.

    Raises:
        ValueError: ``split`` is not ``"train"`` or ``"test"``.
        FileNotFoundError: the sample files are missing from the installation.
    """
    if split not in _SPLITS:
        raise DataError(f"unknown sample split {split!r}; choose 'train' or 'test'")
    paths = sorted(str(p) for p in SAMPLE_DIR.glob(f"{split}-*.tar.gz"))
    if not paths:
        raise NotFoundError(f"bundled sample shards for {split!r} are missing from {SAMPLE_DIR}")
    return paths


def sample_classes() -> List[str]:
    """Class names of the bundled sample (CIFAR-10), line i = class i."""
    return (SAMPLE_DIR / "classes.txt").read_text(encoding="utf-8").split()
