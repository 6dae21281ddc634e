"""The source seam: where samples come from, whatever the format.

A :class:`Source` is a list of *units* (shards, or groups of image files) with, when known, the number of samples in
each unit, the class names and whether the data is labelled; :meth:`Source.read` yields the samples of one unit as
WebDataset-style dicts (``{"__key__": key, "__url__": unit, "jpg": bytes, "cls": b"3", ...}``). The SSL loader and
the eval loader only ever call :meth:`Source.read`, so a new format is one module in :mod:`smi_timm.data.sources`
with a reader and an ``open_*`` function. A source is picklable: loader workers receive it whole.

``how`` says in words what was found and how the epoch length is known (shown when a run starts); ``ignored`` counts
the files next to the data that are neither shards nor images, by reason (never read, never silently dropped: the
loaders log it and the training summary shows it).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterator, Mapping, Optional, Protocol, Tuple

from ..stats import DataStats

__all__ = ["Sample", "Reader", "Source"]

#: one sample: ``__key__``, ``__url__`` (its unit) and one entry per extension (``jpg``, ``cls``, ``json``, ...)
Sample = Dict[str, Any]


class Reader(Protocol):
    """Reads one unit of a source (picklable, so that loader workers can run it)."""

    def read(self, unit: str, stats: DataStats) -> Iterator[Sample]:  # pragma: no cover - a protocol
        ...


@dataclass(frozen=True)
class Source:
    """Units of samples, how to read them, and what is known about them."""

    kind: str                                   #: "shards" or "images"
    units: Tuple[str, ...]                      #: shard URLs, or names of groups of image files
    reader: Reader
    counts: Optional[Tuple[int, ...]] = None    #: samples per unit, when known
    classes: Optional[Tuple[str, ...]] = None   #: class names (index = position), when known
    labeled: Optional[bool] = None              #: False when the data says it has no labels; None: unknown
    how: str = ""                               #: what was found and how the counts are known, in words
    ignored: Mapping[str, int] = field(default_factory=dict)  #: files neither read nor used, by reason

    def read(self, unit: str, stats: DataStats) -> Iterator[Sample]:
        """The samples of ``unit`` (an entry of :attr:`units`); problems are counted in ``stats``, never raised."""
        return self.reader.read(unit, stats)

    @property
    def num_samples(self) -> Optional[int]:
        """Samples over all units, when the counts are known."""
        return None if self.counts is None else int(sum(self.counts))

    def count_of(self) -> Optional[Dict[str, int]]:
        """``{unit: samples}`` when the counts are known."""
        return None if self.counts is None else dict(zip(self.units, self.counts))

    def subset(self, units) -> "Source":
        """The same source restricted to ``units`` (in their order), counts kept."""
        units = tuple(units)
        table = self.count_of()
        return replace(self, units=units, counts=None if table is None else tuple(table[u] for u in units))

    def describe(self) -> str:
        """One line for the user: kind, units, samples, how they are known, what is ignored."""
        n = self.num_samples
        text = f"{len(self.units)} {'shard' if self.kind == 'shards' else 'group'}(s) of " \
               f"{'images' if self.kind == 'images' else 'samples'}"
        text += f", {n} samples" if n is not None else ", number of samples unknown"
        if self.how:
            text += f" ({self.how})"
        if self.ignored:
            text += "; ignored: " + ", ".join(f"{v} {k}" for k, v in sorted(self.ignored.items()))
        return text
