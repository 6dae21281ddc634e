"""Write image datasets as WebDataset shards: ``smi-make-shards SRC OUT_PATTERN``.

SRC is an ImageFolder-style directory (one sub-folder per class; sorted folder names give the class indices), a
folder of unlabeled images (no sub-folders, or ``--unlabeled``: every image under SRC, recursively), or a text file
of ``path<TAB>label`` lines (paths relative to the text file; labels are integers or class names). Each sample is
stored as ``<key>.jpg`` (the original bytes of JPEG files; other formats are re-encoded to JPEG) and, when labelled,
``<key>.cls`` (class index as ASCII). A JSON index ``OUT_DIR/<split>.json`` records the shard names, the number of
samples per shard, the classes (or ``"labeled": false``) and the total; the loaders read it for the epoch length,
and the eval loader refuses unlabeled shards.

Output is deterministic: for the same inputs and ``--shuffle-seed`` the shards are byte-identical (tar headers
carry mtime 0, uid/gid 0, no user names; gzip headers carry no name or time).
"""
from __future__ import annotations

import gzip
import io
import json
import os
import random
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from ..errors import DataError, NotFoundError
from .reading import INDEX_FORMAT, SHARD_SUFFIXES
from .sources.folder import list_image_folder

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------------------------------
# Deterministic tar writing
# ---------------------------------------------------------------------------------------------------------------------


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def _member_bytes(size: int) -> int:
    return 512 + (size + 511) // 512 * 512


def split_name(pattern: PathLike) -> str:
    """Split name of a shard pattern: the basename before the ``%`` field, e.g. ``train`` for ``train-%06d.tar``."""
    base = os.path.basename(os.fspath(pattern))
    prefix = base.split("%", 1)[0].rstrip("-_.")
    return prefix or "shards"


def _check_pattern(pattern: str) -> None:
    try:
        a, b = pattern % 0, pattern % 1
    except (TypeError, ValueError):
        raise DataError(f"output pattern {pattern!r} needs one integer field such as %06d, "
                         "e.g. out/train-%06d.tar") from None
    if a == b:
        raise DataError(f"output pattern {pattern!r} needs one integer field such as %06d")
    if not any(a.endswith(s) for s in SHARD_SUFFIXES):
        raise DataError(f"output pattern {pattern!r} must end in one of {', '.join(SHARD_SUFFIXES)}")


class ShardSink:
    """Write samples into numbered shards (``pattern % i``), starting a new shard at ``maxcount`` samples or when
    the next sample would pass ``maxsize`` bytes of tar data. ``.tar.gz`` / ``.tgz`` patterns are gzip-compressed.

    Use as a context manager; :meth:`write` takes ``(key, {ext: bytes})``. Deterministic output.
    """

    def __init__(self, pattern: PathLike, maxcount: int = 10000, maxsize: int = 1 << 30, compresslevel: int = 9):
        self.pattern = os.fspath(pattern)
        _check_pattern(self.pattern)
        if maxcount < 1 or maxsize < 1024:
            raise DataError(f"maxcount must be >= 1 and maxsize >= 1024, got {maxcount}, {maxsize}")
        self.maxcount = int(maxcount)
        self.maxsize = int(maxsize)
        self.compresslevel = int(compresslevel)
        self.gzip = self.pattern.endswith((".tar.gz", ".tgz"))
        self.paths: List[str] = []
        self.counts: List[int] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._files: List = []
        self._count = 0
        self._bytes = 0

    def _open_next(self) -> None:
        self._close_current()
        path = self.pattern % len(self.paths)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        raw = open(path, "wb")
        self._files = [raw]
        fobj = raw
        if self.gzip:
            fobj = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=self.compresslevel)
            self._files.insert(0, fobj)
        self._tar = tarfile.open(fileobj=fobj, mode="w", format=tarfile.USTAR_FORMAT)
        self.paths.append(path)
        self.counts.append(0)
        self._count = 0
        self._bytes = 0

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            for f in self._files:
                f.close()
            self._tar, self._files = None, []

    def write(self, key: str, entries: dict) -> None:
        if "." in key.rsplit("/", 1)[-1]:
            raise DataError(f"sample key {key!r} must not contain a dot")
        size = sum(_member_bytes(len(v)) for v in entries.values())
        if self._tar is None or self._count >= self.maxcount or (self._count > 0 and self._bytes + size > self.maxsize):
            self._open_next()
        for ext, data in entries.items():
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self._count += 1
        self._bytes += size
        self.counts[-1] += 1

    def close(self) -> None:
        self._close_current()

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_index(path: PathLike, split: str, shard_paths: Sequence[str], counts: Sequence[int],
                classes: Optional[Sequence[str]], num_classes: Optional[int] = None, extra: Optional[dict] = None,
                labeled: bool = True) -> str:
    """Write the JSON index the loaders use for the epoch length (shard names relative to the index's folder);
    ``labeled=False`` marks shards without ``cls`` entries (pretraining only)."""
    index = {
        "format": INDEX_FORMAT,
        "split": split,
        "labeled": bool(labeled),
        "num_samples": int(sum(counts)),
        "num_classes": int(num_classes if num_classes is not None else (len(classes) if classes else 0)),
        "classes": list(classes) if classes is not None else None,
        "shards": [{"name": os.path.basename(p), "samples": int(c)} for p, c in zip(shard_paths, counts)],
    }
    if extra:
        index.update(extra)
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    items: List[Tuple[str, int]]  # (path, class index; -1 = unlabeled)
    classes: Optional[List[str]]
    num_classes: int
    skipped: List[Tuple[str, str]]
    labeled: bool = True


def _list_folder(root: Path, unlabeled: Optional[bool] = None) -> _Source:
    """ImageFolder layout (``ROOT/<class>/...``), or unlabeled images (:func:`~smi_timm.data.sources.folder.
    list_image_folder`, the listing the loaders read through). Images directly in ``ROOT`` next to class folders
    are refused (their class is unknown) unless ``unlabeled``; files that are not images are listed as skipped."""
    listing = list_image_folder(root, unlabeled)
    skipped = [(path, "not an image (by its extension)") for path, _ in listing.ignored_files]
    if listing.loose:
        raise DataError(f"{root} holds {len(listing.loose)} image(s) directly in it (e.g. "
                        f"{os.path.basename(listing.loose[0])!r}) next to {len(listing.classes)} class folder(s): "
                        f"their class is unknown. Move them into a class folder, or pass --unlabeled to write every "
                        f"image under {root} without labels")
    if listing.classes is None:
        return _Source(list(listing.items), None, 0, skipped, labeled=False)
    return _Source(list(listing.items), listing.classes, len(listing.classes), skipped)


def _list_source(src: Path, unlabeled: Optional[bool]) -> _Source:
    if src.is_dir():
        return _list_folder(src, unlabeled)
    if src.is_file():
        if unlabeled:
            raise DataError(f"{os.fspath(src)!r} is a file; --unlabeled takes a folder of images")
        return _list_textfile(src)
    raise NotFoundError(f"source {os.fspath(src)!r} is neither a directory nor a text file")


def _list_textfile(path: Path) -> _Source:
    base = path.parent
    rows, skipped = [], []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0] or not parts[1].strip():
                skipped.append((f"{path.name}:{lineno}", "malformed line (expected path<TAB>label)"))
                continue
            p = parts[0]
            rows.append((p if os.path.isabs(p) else str(base / p), parts[1].strip()))
    labels = [lab for _, lab in rows]
    if all(lab.lstrip("-").isdigit() for lab in labels):
        ints = [int(lab) for lab in labels]
        items = []
        for (p, _), lab in zip(rows, ints):
            if lab < 0:
                skipped.append((p, f"negative label {lab}"))
            else:
                items.append((p, lab))
        return _Source(items, None, (max(i for _, i in items) + 1) if items else 0, skipped)
    classes = sorted(set(labels))
    lookup = {c: i for i, c in enumerate(classes)}
    return _Source([(p, lookup[lab]) for p, lab in rows], classes, len(classes), skipped)


# ---------------------------------------------------------------------------------------------------------------------
# Reading and checking one image
# ---------------------------------------------------------------------------------------------------------------------


def _prepare(job: Tuple[str, int, int]) -> Tuple[str, int, Optional[bytes], bool, str]:
    """Read and check one file: ``(path, label, jpeg_bytes or None, reencoded, reason)``. Never raises."""
    path, label, quality = job
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return path, label, None, False, f"unreadable: {e.strerror or e}"
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()  # full decode, so truncated files are caught here rather than in training
            if fmt == "JPEG":
                return path, label, data, False, ""
            if im.mode != "RGB":
                im = im.convert("RGB")
            out = io.BytesIO()
            im.save(out, format="JPEG", quality=quality)
            return path, label, out.getvalue(), True, ""
    except Exception as e:  # noqa: BLE001 - anything PIL raises means "not a usable image"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return path, label, None, False, f"not a readable image: {msg[:120]}"


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ShardWriteSummary:
    split: str
    index: str
    shards: List[str]
    samples_per_shard: List[int]
    num_samples: int
    num_classes: int
    classes: Optional[List[str]]
    reencoded: int
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    labeled: bool = True

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_skipped"] = self.num_skipped
        return d

    def format(self, max_skipped: int = 50) -> str:
        rate = self.num_samples / self.seconds if self.seconds > 0 else float("nan")
        out_dir = os.path.dirname(self.index) or "."
        what = f"{self.num_classes} classes" if self.labeled else "unlabeled"
        lines = [
            f"wrote {self.num_samples} samples ({what}) into {len(self.shards)} shard(s) in "
            f"{out_dir} in {self.seconds:.1f} s ({rate:.0f} images/s)",
            f"index: {self.index}",
            f"re-encoded to JPEG: {self.reencoded}",
            f"skipped: {self.num_skipped}",
        ]
        for path, reason in self.skipped[:max_skipped]:
            lines.append(f"  {path}: {reason}")
        if self.num_skipped > max_skipped:
            lines.append(f"  ... and {self.num_skipped - max_skipped} more")
        return "\n".join(lines)


def write_shards(
    src: PathLike,
    out_pattern: PathLike,
    maxcount: int = 10000,
    maxsize: int = 1 << 30,
    shuffle_seed: Optional[int] = 0,
    quality: int = 95,
    workers: int = 1,
    compresslevel: int = 9,
    progress: bool = True,
    unlabeled: Optional[bool] = None,
) -> ShardWriteSummary:
    """Write the images of ``src`` (ImageFolder directory, folder of unlabeled images, or ``path<TAB>label`` text
    file) as WebDataset shards.

    Args:
        src: dataset root or text file.
        out_pattern: shard file pattern with one integer field, e.g. ``out/train-%06d.tar`` (or ``.tar.gz``).
        maxcount: at most this many samples per shard.
        maxsize: at most this many bytes of (uncompressed) tar data per shard.
        shuffle_seed: samples are shuffled with ``random.Random(shuffle_seed)``; ``None`` keeps the listing order.
        quality: JPEG quality for re-encoded (non-JPEG) images.
        workers: processes reading and checking images (order and output do not depend on it).
        compresslevel: gzip level for ``.tar.gz`` output.
        progress: show a tqdm progress bar (images/s).
        unlabeled: ``True``: every image under ``src`` (recursively), no labels; ``False``: class sub-folders
            required; ``None`` (default): unlabeled when ``src`` has no sub-folders. Unlabeled shards hold ``jpg``
            only and their index says ``"labeled": false``.

    Unreadable or non-image files are skipped and listed in the summary; the run does not stop for them.
    """
    t0 = time.perf_counter()
    pattern = os.fspath(out_pattern)
    _check_pattern(pattern)
    source = _list_source(Path(src), unlabeled)
    items = list(source.items)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    split = split_name(pattern)
    skipped = list(source.skipped)
    reencoded = 0
    jobs = [(p, lab, int(quality)) for p, lab in items]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), unit="img", desc=f"shards {split}", disable=not progress, dynamic_ncols=True)
    pool = None
    try:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            pool = mp.get_context("spawn" if sys.platform == "win32" else None).Pool(workers)
            results: Iterable = pool.imap(_prepare, jobs, chunksize=16)
        else:
            results = map(_prepare, jobs)
        with ShardSink(pattern, maxcount=maxcount, maxsize=maxsize, compresslevel=compresslevel) as sink:
            n = 0
            for path, label, data, was_reencoded, reason in results:
                bar.update(1)
                if data is None:
                    skipped.append((path, reason))
                    continue
                entries = {"jpg": data} if label < 0 else {"jpg": data, "cls": str(label).encode("ascii")}
                sink.write(f"{n:08d}", entries)
                n += 1
                reencoded += int(was_reencoded)
        shard_paths, counts = sink.paths, sink.counts
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    index_path = os.path.join(os.path.dirname(pattern) or ".", f"{split}.json")
    if shard_paths:
        write_index(index_path, split, shard_paths, counts, source.classes, source.num_classes,
                    labeled=source.labeled)
    return ShardWriteSummary(
        split=split, index=index_path if shard_paths else "", shards=shard_paths, samples_per_shard=counts,
        num_samples=sum(counts), num_classes=source.num_classes, classes=source.classes, reencoded=reencoded,
        skipped=skipped, seconds=time.perf_counter() - t0, labeled=source.labeled,
    )
