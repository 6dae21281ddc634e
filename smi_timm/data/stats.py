"""Counters for bad or unusual data met while loading.

Every loader keeps a :class:`DataStats`. Worker processes count into their own copy and send the increments back
to the main process with each batch, so ``loader.stats()`` covers all workers.
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping

#: Problems: the sample or shard (or the rest of it) was skipped.
SKIP_KINDS = (
    "missing_shard",  # shard file missing or could not be opened: skipped
    "bad_shard",  # shard truncated or corrupt: samples before the damage are used, the rest is skipped
    "missing_image",  # sample without an image entry (jpg/jpeg/png/webp/...): skipped
    "missing_label",  # sample without `cls`: skipped by the eval loader (the SSL loader does not read labels)
    "bad_label",  # `cls` is not an integer: skipped by the eval loader (the SSL loader does not read labels)
    "undecodable",  # image bytes could not be decoded (truncated JPEG, not an image, ...): skipped
)
#: Repairs: the image was used after conversion to 8-bit RGB.
CONVERT_KINDS = (
    "converted_grayscale",  # L / 1 / I / I;16 / F images
    "converted_cmyk",  # CMYK (and YCCK) JPEGs
    "converted_alpha",  # RGBA / LA / PA / palette with transparency: alpha channel dropped
    "converted_other",  # palette or other modes
    "non_jpeg",  # PNG, WebP, BMP, ... decoded with PIL (counted in addition to a mode conversion)
)
#: Information: how much was read (``read``: samples the eval loader read; ``samples``: samples used).
INFO_KINDS = ("shards", "read", "samples")

KINDS = SKIP_KINDS + CONVERT_KINDS + INFO_KINDS


class DataStats:
    """A dict of integer counters with a fixed set of kinds (all present, zero by default)."""

    __slots__ = ("_counts", "_pending")

    def __init__(self, counts: Mapping[str, int] = ()):
        self._counts: Dict[str, int] = dict.fromkeys(KINDS, 0)
        self._pending: Dict[str, int] = {}
        if counts:
            self.update(counts)

    def add(self, kind: str, n: int = 1) -> None:
        self._counts[kind] = self._counts.get(kind, 0) + n
        self._pending[kind] = self._pending.get(kind, 0) + n

    def update(self, counts: Mapping[str, int]) -> None:
        for k, v in counts.items():
            if v:
                self.add(k, int(v))

    def pop_delta(self) -> Dict[str, int]:
        """The increments since the last call (what a worker attaches to a batch)."""
        delta, self._pending = self._pending, {}
        return delta

    def as_dict(self) -> Dict[str, int]:
        return dict(self._counts)

    def problems(self) -> Dict[str, int]:
        """Non-zero skip and convert counters only."""
        return {k: v for k, v in self._counts.items() if v and k not in INFO_KINDS}

    def reset(self) -> None:
        self._counts = dict.fromkeys(KINDS, 0)
        self._pending = {}

    def __getitem__(self, kind: str) -> int:
        return self._counts.get(kind, 0)

    def __repr__(self) -> str:
        nz = {k: v for k, v in self._counts.items() if v}
        return f"DataStats({nz})"


def merge(dicts: Iterable[Mapping[str, int]]) -> Dict[str, int]:
    """Sum several stats dicts (e.g. from several ranks)."""
    out = dict.fromkeys(KINDS, 0)
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + int(v)
    return out
