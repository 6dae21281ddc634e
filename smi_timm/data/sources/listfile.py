"""A list file as a source: ``@list.txt`` names one shard, or one image file, per line.

Paths are relative to the list file (or absolute, or URLs such as ``pipe:...`` for shards); blank lines and lines
starting with ``#`` are skipped. A list of shards is read as :mod:`~smi_timm.data.sources.shards`; a list of images
as image files (:func:`~smi_timm.data.sources.folder.image_files_source`), each line optionally ``path<TAB>label``
(an integer, or a class name: the sorted names give the indices). A list that mixes shards and images is refused.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

from ...errors import DataError, NotFoundError
from ..stats import DataStats
from .base import Source
from .folder import image_files_source, is_image_name
from .shards import is_shard_name, open_shards

__all__ = ["read_list_file", "open_list_file"]


def read_list_file(path: str) -> List[Tuple[str, Optional[str]]]:
    """``(path or URL, label or None)`` per line of a list file, paths made absolute."""
    if not os.path.isfile(path):
        raise NotFoundError(f"list file {path!r} does not exist (@FILE names a text file with one shard or image "
                            f"path per line)")
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            entry, _, label = line.partition("\t")
            entry = entry.strip()
            if "://" not in entry and not entry.startswith("pipe:") and not os.path.isabs(entry):
                entry = os.path.join(base, entry)
            rows.append((entry, label.strip() or None))
    if not rows:
        raise DataError(f"list file {path!r} names no shard or image")
    return rows


def open_list_file(path: str, stats: Optional[DataStats] = None) -> Source:
    """The source of the list file ``path`` (shards or images, see the module doc)."""
    rows = read_list_file(path)
    kinds = {"shards" if is_shard_name(p) or p.startswith("pipe:") else "images" if is_image_name(p) else "?"
             for p, _ in rows}
    if kinds == {"shards"}:
        return open_shards([p for p, _ in rows], stats, what=f"shards listed in {os.path.basename(path)}")
    if kinds == {"images"}:
        labels = [lab for _, lab in rows]
        classes = None
        if any(lab is not None for lab in labels):
            if all(lab is not None and lab.lstrip("-").isdigit() for lab in labels):
                items = [(p, int(lab)) for p, lab in rows]
            else:
                classes = sorted({lab for lab in labels if lab is not None})
                items = [(p, classes.index(lab) if lab is not None else -1) for p, lab in rows]
        else:
            items = [(p, -1) for p, _ in rows]
        return image_files_source(os.path.dirname(os.path.abspath(path)), items, classes,
                                  f"images listed in {os.path.basename(path)}; samples counted from the list", {})
    bad = [p for p, _ in rows if not (is_shard_name(p) or p.startswith("pipe:") or is_image_name(p))][:3]
    raise DataError(f"list file {path!r} must name only shards (.tar, .tar.gz, .tgz, pipe:) or only image files; "
                    f"it mixes them" + (f" or names neither (e.g. {bad})" if bad else ""))
