"""A folder of image files as a source: labelled by class sub-folders (``ROOT/<class>/<image>``, sorted folder names
give the class indices, as torchvision's ``ImageFolder``), or unlabelled (any images under ``ROOT``).

:func:`list_image_folder` is the one listing of an image folder: the loaders read through it and ``smi-make-shards``
writes from it. Image files are recognised by their extension (:data:`IMAGE_EXTENSIONS`); anything else is ignored
and counted, never read. Images lying directly in ``ROOT`` next to class folders have no class: they are listed as
``loose`` (a pretraining source takes them, unlabelled; an evaluation counts them as ``missing_label``;
``smi-make-shards`` refuses them unless told ``--unlabeled``).

The files are grouped into units of :data:`UNIT_SIZE` (in sorted order), so that a folder shuffles, splits between
ranks and workers, and resumes exactly like shards of that size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from ...errors import DataError, NotFoundError
from ..reading import IMAGE_KEYS
from ..stats import DataStats
from .base import Sample, Source

__all__ = ["IMAGE_EXTENSIONS", "UNIT_SIZE", "FolderListing", "list_image_folder", "ImageFolderReader",
           "open_image_folder", "image_files_source", "is_image_name"]

#: extensions of the files taken as images (case-insensitive)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".pbm", ".tif",
                    ".tiff", ".gif")
#: image files per unit
UNIT_SIZE = 256


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass
class FolderListing:
    """What an image folder holds: ``(path, class index or -1)`` per image, the class names, the loose images next
    to class folders, and the other files (``ignored_files``: path and reason; ``ignored``: counts by reason)."""

    items: List[Tuple[str, int]]
    classes: Optional[List[str]]
    loose: List[str] = field(default_factory=list)
    ignored_files: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def ignored(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for _, reason in self.ignored_files:
            out[reason] = out.get(reason, 0) + 1
        return out


def _not_an_image(path: str) -> Tuple[str, str]:
    return path, f"{os.path.splitext(path)[1].lower() or '(no extension)'} file(s), not images"


def _walk(root: Path, ignored: List[Tuple[str, str]]) -> List[str]:
    """Every non-hidden image file under ``root``, recursively, in sorted order; other files go to ``ignored``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            path = os.path.join(dirpath, fn)
            if is_image_name(fn):
                out.append(path)
            else:
                ignored.append(_not_an_image(path))
    return out


def list_image_folder(root, unlabeled: Optional[bool] = None) -> FolderListing:
    """The images of ``root``: with class sub-folders, labelled by them (``unlabeled=None`` or ``False``), else (or
    with ``unlabeled=True``) every image under ``root``, unlabelled. ``unlabeled=False`` insists on class folders.

    Raises:
        NotFoundError: ``root`` is not a folder. DataError: ``unlabeled=False`` and no class sub-folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotFoundError(f"{root} is not a folder")
    ignored: List[Tuple[str, str]] = []
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if unlabeled or (unlabeled is None and not classes):
        return FolderListing([(p, -1) for p in _walk(root, ignored)], None, [], ignored)
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected ROOT/<class>/<image> with --labeled; "
                        f"without it, a folder of images is taken as unlabeled)")
    items = [(p, idx) for idx, name in enumerate(classes) for p in _walk(root / name, ignored)]
    loose = []
    for entry in sorted(root.iterdir()):
        if entry.is_file() and not entry.name.startswith("."):
            if is_image_name(entry.name):
                loose.append(str(entry))
            else:
                ignored.append(_not_an_image(str(entry)))
    return FolderListing(items, classes, loose, ignored)


@dataclass(frozen=True)
class ImageFolderReader:
    """Reads one unit: a group of image files, each a sample ``{"__key__", "__url__", <ext>: bytes[, "cls"]}``."""

    root: str
    groups: Tuple[Tuple[Tuple[str, int], ...], ...]  #: per unit: (path relative to root, class index or -1)

    def read(self, unit: str, stats: DataStats) -> Iterator[Sample]:
        index = int(unit.rsplit("#", 1)[1])
        stats.add("shards")
        for rel, label in self.groups[index]:
            key, ext = os.path.splitext(rel)
            try:
                with open(os.path.join(self.root, rel), "rb") as f:
                    data = f.read()
            except OSError:
                stats.add("missing_image")
                continue
            kind = ext[1:].lower()
            sample = {"__key__": key, "__url__": unit, kind if kind in IMAGE_KEYS else "img": data}
            if label >= 0:
                sample["cls"] = str(label).encode("ascii")
            yield sample


def image_files_source(root: str, items: List[Tuple[str, int]], classes: Optional[List[str]], how: str,
                       ignored: Dict[str, int]) -> Source:
    """A source of the image files ``items`` (absolute paths, or relative to ``root``), :data:`UNIT_SIZE` per unit."""
    if not items:
        raise DataError(f"no image files in {root} ({how}); images have one of the extensions "
                        f"{', '.join(IMAGE_EXTENSIONS)}" + (f"; ignored: {ignored}" if ignored else ""))
    rel = [(os.path.relpath(p, root), label) for p, label in items]
    groups = tuple(tuple(rel[i:i + UNIT_SIZE]) for i in range(0, len(rel), UNIT_SIZE))
    units = tuple(f"{root}#{i}" for i in range(len(groups)))
    labeled = any(label >= 0 for _, label in items)
    return Source("images", units, ImageFolderReader(root, groups), tuple(len(g) for g in groups),
                  tuple(classes) if classes else None, None if labeled else False, how, ignored)


def open_image_folder(root, unlabeled: Optional[bool] = None) -> Source:
    """The source of an image folder (:func:`list_image_folder`); loose images next to class folders are taken,
    unlabelled, and said so in :attr:`Source.how`."""
    listing = list_image_folder(root, unlabeled)
    root = os.path.abspath(os.fspath(root))
    if listing.classes:
        how = f"image folder with {len(listing.classes)} class sub-folder(s)"
        if listing.loose:
            how += f" and {len(listing.loose)} loose image(s) without a class"
    else:
        how = "image folder, unlabelled"
    items = listing.items + [(p, -1) for p in listing.loose]
    return image_files_source(root, items, listing.classes, how + "; samples counted from the file list",
                              listing.ignored)
