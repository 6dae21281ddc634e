"""WebDataset tar shards as a source: local files, ``file://`` and ``pipe:`` URLs (and any URL webdataset opens).

The number of samples per shard is taken from what lies next to the shards, in this order:

1. our JSON index (``train.json``, written by ``smi-make-shards``: ``{"shards": [{"name", "samples"}, ...]}``);
2. timm's ``_info.json`` / ``info.json`` (``splits -> NAME -> filenames / shard_lengths``, the Hugging Face layout);
3. OpenCLIP's ``sizes.json`` (``{"shard-000000.tar": samples, ...}``);
4. img2dataset's ``*_stats.json`` beside each tar (``00000.tar`` + ``00000_stats.json``: ``successes``);
5. for local shards: counted by reading the tar headers only (no image data is read for plain ``.tar``);

``pipe:`` and remote shards without metadata have no known length (the loaders then need ``--epoch-samples`` or
``--max-steps``). :attr:`Source.how` says which rule applied.
"""
from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from ...errors import DataError
from ..reading import (
    IMAGE_KEYS,
    SHARD_SUFFIXES,
    TarFormatError,
    check_local_shards,
    decompressed,
    index_info,
    is_local,
    iter_shard,
    iter_tar_members,
    local_path,
    sample_key,
)
from ..stats import DataStats
from .base import Sample, Source

__all__ = ["ShardReader", "open_shards", "shard_counts", "count_tar_samples", "is_shard_name"]


def is_shard_name(name: str) -> bool:
    """A file name that is a shard (``.tar``, ``.tar.gz``, ``.tgz``)."""
    return name.lower().endswith(SHARD_SUFFIXES)


@dataclass(frozen=True)
class ShardReader:
    """Reads one shard (:func:`smi_timm.data.reading.iter_shard`)."""

    def read(self, unit: str, stats: DataStats) -> Iterator[Sample]:
        return iter_shard(unit, stats)


# ---------------------------------------------------------------------------------------------------------------------
# sample counts from metadata next to the shards
# ---------------------------------------------------------------------------------------------------------------------

def _read_json(path: str):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _timm_info(folder: str) -> Dict[str, int]:
    """``{shard name: samples}`` from timm's ``_info.json`` / ``info.json`` (every split)."""
    for name in ("_info.json", "info.json"):
        info = _read_json(os.path.join(folder, name))
        if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
            continue
        table: Dict[str, int] = {}
        for split in info["splits"].values():
            names, lengths = split.get("filenames") or [], split.get("shard_lengths") or []
            if isinstance(names, (list, tuple)) and len(names) == len(lengths):
                table.update({os.path.basename(str(n)): int(c) for n, c in zip(names, lengths)})
        if table:
            return table
    return {}


def _sizes_json(folder: str) -> Dict[str, int]:
    sizes = _read_json(os.path.join(folder, "sizes.json"))
    if not isinstance(sizes, dict):
        return {}
    try:
        return {os.path.basename(str(k)): int(v) for k, v in sizes.items()}
    except (TypeError, ValueError):
        return {}


def _img2dataset_stats(path: str) -> Optional[int]:
    stem = os.path.basename(path)
    for suffix in SHARD_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    stats = _read_json(os.path.join(os.path.dirname(path), f"{stem}_stats.json"))
    if isinstance(stats, dict) and isinstance(stats.get("successes"), int):
        return int(stats["successes"])
    return None


_TABLE_RULES = (("timm's _info.json", _timm_info), ("sizes.json", _sizes_json))


def shard_counts(urls: Sequence[str]) -> Tuple[Optional[List[int]], str]:
    """``(samples per shard or None, how they are known)``: metadata first (rules 1–4 of the module doc), else the
    tar headers of local shards (rule 5)."""
    counts, _, _ = index_info(urls)
    if counts is not None:
        return [counts[u] for u in urls], "from the JSON shard index"
    if not all(is_local(u) for u in urls):
        return None, "not all shards are local files and no metadata gives their sizes"
    paths = [local_path(u) for u in urls]
    folders = sorted({os.path.dirname(os.path.abspath(p)) for p in paths})
    for label, rule in _TABLE_RULES:
        tables = {d: rule(d) for d in folders}
        got = [tables[os.path.dirname(os.path.abspath(p))].get(os.path.basename(p)) for p in paths]
        if all(c is not None for c in got):
            return [int(c) for c in got], f"from {label}"
    got = [_img2dataset_stats(p) for p in paths]
    if all(c is not None for c in got):
        return [int(c) for c in got], "from img2dataset's *_stats.json"
    t0 = time.perf_counter()
    counted = [count_tar_samples(p) for p in paths]
    return counted, f"counted by reading the tar headers of {len(paths)} shard(s) in {time.perf_counter() - t0:.2f} s"


def count_tar_samples(path: str) -> int:
    """Samples with an image in a local shard. A plain ``.tar`` is read header by header, skipping the member data
    (a few microseconds per sample); a compressed one is decompressed. A damaged shard counts up to the damage."""
    keys: set = set()
    try:
        with open(path, "rb") as f:
            members = iter_tar_members(f if path.lower().endswith(".tar") else decompressed(f),
                                       skip_data=path.lower().endswith(".tar"))
            for name, _ in members:
                key, ext = sample_key(name)
                if key is not None and ext in IMAGE_KEYS:
                    keys.add(key)
    except (OSError, EOFError, TarFormatError, ValueError):
        pass
    return len(keys)


# ---------------------------------------------------------------------------------------------------------------------
# the source
# ---------------------------------------------------------------------------------------------------------------------

def _classes_next_to(urls: Sequence[str]) -> Optional[Tuple[str, ...]]:
    """Class names from a ``classes.txt`` (one per line, line i = class i) next to the first local shard."""
    for u in urls:
        if is_local(u):
            path = os.path.join(os.path.dirname(os.path.abspath(local_path(u))), "classes.txt")
            if os.path.isfile(path):
                with open(path, "r", encoding="utf-8") as f:
                    names = [line.strip() for line in f if line.strip()]
                return tuple(names) or None
            return None
    return None


def open_shards(urls: Sequence[str], stats: Optional[DataStats] = None, *, ignored: Optional[Dict[str, int]] = None,
                what: str = "") -> Source:
    """The source of the shard URLs ``urls`` (already expanded); missing local shards are dropped and counted.

    Raises:
        NotFoundError: every shard is a missing local file.
        DataError: no shards at all.
    """
    if not urls:
        raise DataError("no shards given")
    urls = check_local_shards(list(urls), stats)
    counts, how = shard_counts(urls)
    _, index_classes, unlabeled = index_info(urls)
    classes = tuple(index_classes) if index_classes else _classes_next_to(urls)
    labeled = False if unlabeled and len(unlabeled) == len(urls) else None
    return Source("shards", tuple(urls), ShardReader(), tuple(counts) if counts is not None else None, classes,
                  labeled, (what + "; " if what else "") + "samples per shard " + how, dict(ignored or {}))


def glob_shards(folder: str) -> Tuple[List[str], Dict[str, int]]:
    """``(shards in the folder, other files by reason)``: the metadata the counts come from is not counted."""
    metadata = {"_info.json", "info.json", "sizes.json", "classes.txt"}
    shards, ignored = [], {}
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*"))):
        name = os.path.basename(path)
        if os.path.isdir(path) or name.startswith("."):
            continue
        if is_shard_name(name):
            shards.append(path)
        elif name in metadata or name.endswith("_stats.json") or _is_index(path):
            continue
        else:
            ext = os.path.splitext(name)[1].lower() or "(no extension)"
            ignored[f"{ext} file(s), not shards"] = ignored.get(f"{ext} file(s), not shards", 0) + 1
    return shards, ignored


def _is_index(path: str) -> bool:
    if not path.endswith(".json"):
        return False
    data = _read_json(path)
    return isinstance(data, dict) and "shards" in data
