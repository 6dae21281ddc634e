"""Sources: where samples come from, one module per format (the seam the SSL and eval loaders read through).

==========================  =======================================================================================
module                      format
==========================  =======================================================================================
:mod:`.shards`              WebDataset tar shards (local, ``file://``, ``pipe:``), with their sample counts
:mod:`.folder`              a folder of images (class sub-folders, or unlabelled)
:mod:`.listfile`            ``@list.txt``: one shard or image path per line
==========================  =======================================================================================

:func:`open_data` turns what a user passes (``--data``, ``--train``, ``make_ssl_loader(urls)``) into a
:class:`~smi_timm.data.sources.base.Source`: a folder is looked into (shards if it holds any, else images, and the
source says which); a glob keeps only shards (or only images) and counts the other files it matched; ``sample`` /
``sample:train`` / ``sample:test`` are the bundled CIFAR-10 sample; anything else is a shard pattern or URL.

A new format is one module here with a reader (a picklable object with ``read(unit, stats)``) and an ``open_*``
function returning a :class:`Source`, and one branch of :func:`open_data`.
"""
from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional, Sequence, Union

from ...errors import DataError, NotFoundError
from ..reading import GLOB_CHARS, braceexpand, is_local, local_path, sample_spec
from ..stats import DataStats
from .base import Reader, Sample, Source
from .folder import image_files_source, is_image_name, list_image_folder, open_image_folder
from .listfile import open_list_file
from .shards import glob_shards, is_shard_name, open_shards

__all__ = ["Source", "Sample", "Reader", "open_data", "open_folder", "open_shards", "open_image_folder",
           "open_list_file", "list_image_folder", "DataSpec"]

#: what the loaders take: a path, pattern, URL, ``@list.txt``, folder or ``sample[:split]``, or a list of them
DataSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def open_folder(folder: str, stats: Optional[DataStats] = None) -> Source:
    """A folder: its shards when it holds any (other files ignored and counted), else its images."""
    shards, ignored = glob_shards(folder)
    if shards:  # images next to shards are counted with the other files that are not shards
        return open_shards(shards, stats, ignored=ignored, what=f"{len(shards)} shard(s) in folder {folder}")
    try:
        return open_image_folder(folder)
    except DataError:
        found = ", ".join(f"{v} {k}" for k, v in sorted(ignored.items())) or "it is empty"
        raise DataError(f"{folder} holds no shards (.tar, .tar.gz, .tgz) and no images ({found}); pass a folder of "
                        f"shards or of images, shard files or a pattern such as 'DIR/train-*.tar', or @list.txt") \
            from None


def _expand(part: str, ignored: Dict[str, int]) -> List[str]:
    """One spec: ``sample[:split]``, then brace alternatives, then local globs (keeping shards or images; other
    matches counted in ``ignored``)."""
    bundled = sample_spec(part)
    if bundled is not None:
        return bundled
    out: List[str] = []
    for url in braceexpand(part):
        if not (is_local(url) and GLOB_CHARS.search(local_path(url))):
            out.append(os.path.expanduser(url) if is_local(url) else url)
            continue
        matches = sorted(glob.glob(os.path.expanduser(local_path(url))))
        if not matches:
            raise NotFoundError(f"pattern {url!r} matched no files")
        for m in matches:
            if is_shard_name(m) or is_image_name(m):
                out.append(m)
            elif not os.path.isdir(m):
                key = f"{os.path.splitext(m)[1].lower() or '(no extension)'} file(s) matched by {url!r}, not shards"
                ignored[key] = ignored.get(key, 0) + 1
    return out


def open_data(spec: DataSpec, stats: Optional[DataStats] = None) -> Source:
    """The :class:`Source` of ``spec`` (see the module doc).

    Raises:
        DataError: nothing given, a folder with neither shards nor images, shards mixed with images.
        NotFoundError: a pattern that matches nothing, a missing list file or folder, only missing shards.
    """
    if spec is None:
        raise DataError("no data given: pass shards, a folder of shards or images, @list.txt, or 'sample'")
    items = [os.fspath(spec)] if isinstance(spec, (str, os.PathLike)) else [os.fspath(s) for s in spec]
    items = [p for item in items for p in (item.split("::") if "::" in item and not item.startswith("pipe:")
                                            else [item]) if p.strip()]
    if not items:
        raise DataError(f"no data given: {spec!r} is empty")
    if len(items) == 1 and items[0].startswith("@"):
        return open_list_file(items[0][1:], stats)
    if len(items) == 1 and os.path.isdir(os.path.expanduser(items[0])):
        return open_folder(os.path.expanduser(items[0]), stats)
    ignored: Dict[str, int] = {}
    urls = [u for part in items for u in _expand(part.strip(), ignored)]
    dirs = [u for u in urls if is_local(u) and os.path.isdir(local_path(u))]
    if dirs:
        raise DataError(f"{dirs[0]!r} is a folder among other data; pass one folder alone, or its shards "
                        f"(e.g. '{dirs[0].rstrip('/')}/*.tar')")
    images = [u for u in urls if is_image_name(u)]
    if images and len(images) == len(urls):
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in images])
        return image_files_source(root, [(os.path.abspath(p), -1) for p in images], None,
                                  "image files; samples counted from the file list", ignored)
    if images:
        raise DataError(f"{spec!r} mixes shards and image files ({len(images)} images, e.g. {images[0]!r}); pass "
                        f"one kind (a folder of images, or shards)")
    if not urls:
        raise DataError(f"{spec!r} names no shards" + (f" (ignored: {ignored})" if ignored else ""))
    return open_shards(urls, stats, ignored=ignored)
