"""Reading WebDataset shards robustly: URL expansion, tar iteration, image decoding, the JSON shard index.

Nothing here raises on bad data: every problem is counted in a :class:`~smi_timm.data.stats.DataStats` and the
offending shard remainder or sample is skipped. Only start-up problems (no shards at all) raise.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import struct
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

from ..errors import DataError, NotFoundError
from .bundled import sample_shards
from .stats import DataStats

if TYPE_CHECKING:  # torch and numpy are imported where needed, so the shard writer starts fast
    import torch

UrlSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]

#: Sample entries tried, in order, for the image and the label.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "pbm", "tif", "tiff", "gif", "img", "image")
LABEL_KEYS = ("cls", "cls.txt", "label", "label.txt")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
INDEX_FORMAT = "smi-timm-shard-index/1"

GLOB_CHARS = re.compile(r"[*?\[]")
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # key = path up to the first dot of the basename


# ---------------------------------------------------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------------------------------------------------


def is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")  # drive letters on Windows


def local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


_BRACE = re.compile(r"\{([^{}]*)\}")


def braceexpand(pattern: str) -> List[str]:
    """Expand ``{a,b}`` alternatives and ``{000..009}`` ranges (the ``braceexpand`` package when installed; else
    the same rules for non-nested braces, enough for shard patterns)."""
    try:
        import braceexpand
    except ImportError:
        pass
    else:
        return list(braceexpand.braceexpand(pattern))
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?", body)
    if rng:
        a, b = int(rng.group(1)), int(rng.group(2))
        step = abs(int(rng.group(3) or 1)) * (1 if b >= a else -1)
        width = len(rng.group(1)) if rng.group(1).lstrip("-").startswith("0") else 0
        options = [str(i).zfill(width) for i in range(a, b + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        options = ["{" + body + "}"]
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [head + o + rest for o in options for rest in braceexpand(tail)]


#: Data specs that name the CIFAR-10 sample bundled with the package (``sample`` = ``sample:train``).
SAMPLE_SPECS = ("sample", "sample:train", "sample:test")


def sample_spec(part: str) -> Optional[List[str]]:
    """The bundled sample's shard paths when ``part`` is ``sample`` or ``sample:<split>``, else ``None``."""
    if part != "sample" and not part.startswith("sample:"):
        return None
    return sample_shards(part.partition(":")[2] or "train")


def expand_urls(urls: UrlSpec) -> List[str]:
    """Expand a shard specification into a list of URLs.

    Accepts a string or path, or a list of them. Each string may hold several specs separated by ``::``; brace
    patterns (``train-{000000..000004}.tar``) are expanded, then local glob patterns (``train-*.tar.gz``) are matched
    (sorted). ``pipe:`` and other URLs are passed through as in webdataset. ``sample``, ``sample:train`` and
    ``sample:test`` name the CIFAR-10 sample bundled with the package (:func:`smi_timm.data.sample_shards`); write
    ``./sample`` for a local file of that name.

    Raises:
        ValueError: nothing given (empty list or string), or ``sample:<split>`` with an unknown split.
        FileNotFoundError: a glob pattern matched no file.
    """
    if isinstance(urls, (str, os.PathLike)):
        specs = [os.fspath(urls)]
    elif urls is None:
        raise DataError("no shards given (urls is None)")
    else:
        specs = [os.fspath(u) for u in urls]
    out: List[str] = []
    for spec in specs:
        for part in spec.split("::") if "::" in spec and not spec.startswith("pipe:") else [spec]:
            part = part.strip()
            if not part:
                continue
            bundled = sample_spec(part)
            if bundled is not None:
                out.extend(bundled)
                continue
            for url in braceexpand(part):
                if is_local(url) and GLOB_CHARS.search(local_path(url)):
                    matches = sorted(glob.glob(os.path.expanduser(local_path(url))))
                    if not matches:
                        raise NotFoundError(f"shard pattern {url!r} matched no files")
                    out.extend(matches)
                else:
                    out.append(os.path.expanduser(url) if is_local(url) else url)
    if not out:
        raise DataError(f"no shards given: {urls!r} expands to an empty list")
    return out


def check_local_shards(urls: Sequence[str], stats: Optional[DataStats] = None) -> List[str]:
    """Drop local shards that do not exist (counting them as ``missing_shard``); keep remote/pipe URLs.

    Raises:
        FileNotFoundError: every shard is a missing local file.
    """
    keep, missing = [], []
    for url in urls:
        if is_local(url) and not os.path.isfile(local_path(url)):
            missing.append(url)
        else:
            keep.append(url)
    if missing and stats is not None:
        stats.add("missing_shard", len(missing))
    if not keep:
        shown = ", ".join(repr(m) for m in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise NotFoundError(f"none of the {len(missing)} shard file(s) exist: {shown}")
    if missing:
        import warnings

        warnings.warn(f"{len(missing)} of {len(urls)} shard file(s) are missing and will be skipped, "
                      f"e.g. {missing[0]!r}",
                      stacklevel=3)
    return keep


# ---------------------------------------------------------------------------------------------------------------------
# Shard index
# ---------------------------------------------------------------------------------------------------------------------


def read_index(path: Union[str, os.PathLike]) -> dict:
    with open(path, "r", encoding="utf-8") as f:
        index = json.load(f)
    if not isinstance(index, dict) or "shards" not in index:
        raise DataError(f"{path}: not a shard index (no 'shards' entry)")
    return index


def _dir_index(d: str) -> Tuple[Dict[str, Tuple[int, bool]], Optional[List[str]]]:
    """``{shard name: (samples, labeled)}`` and the first class list of the JSON indexes in folder ``d``."""
    table: Dict[str, Tuple[int, bool]] = {}
    classes: Optional[List[str]] = None
    for jf in sorted(glob.glob(os.path.join(glob.escape(d), "*.json"))):
        try:
            index = read_index(jf)
            labeled = bool(index.get("labeled", True))
            for entry in index["shards"]:
                table.setdefault(entry["name"], (int(entry["samples"]), labeled))
            if classes is None and index.get("classes"):
                classes = list(index["classes"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return table, classes


def find_index(urls: Sequence[str]) -> Tuple[Optional[Dict[str, int]], Optional[List[str]]]:
    """Look for JSON shard indexes next to local shards.

    Returns ``(counts, classes)``: ``counts`` maps each URL to its sample count, or is ``None`` when some shard is not
    listed in any index (or is not local); ``classes`` is the class list of the first index that has one.
    """
    counts, classes, _ = index_info(urls)
    return counts, classes


def index_info(urls: Sequence[str]) -> Tuple[Optional[Dict[str, int]], Optional[List[str]], List[str]]:
    """:func:`find_index` plus the shards that an index marks as unlabeled (``"labeled": false``, written by
    ``smi-make-shards`` for a folder without class sub-folders)."""
    by_dir: Dict[str, Tuple[Dict[str, Tuple[int, bool]], Optional[List[str]]]] = {}
    classes: Optional[List[str]] = None
    counts: Optional[Dict[str, int]] = {}
    unlabeled: List[str] = []
    for url in urls:
        if not is_local(url):
            counts = None
            continue
        path = local_path(url)
        d = os.path.dirname(os.path.abspath(path))
        if d not in by_dir:
            by_dir[d] = _dir_index(d)
            if classes is None:
                classes = by_dir[d][1]
        entry = by_dir[d][0].get(os.path.basename(path))
        if entry is None:
            counts = None
            continue
        if counts is not None:
            counts[url] = entry[0]
        if not entry[1]:
            unlabeled.append(url)
    return counts, classes, unlabeled


def count_samples(urls: UrlSpec) -> Dict[str, int]:
    """Count the samples (entries with an image) of each shard by reading it; for shards without an index."""
    stats = DataStats()
    out = {}
    for url in expand_urls(urls):
        out[url] = sum(1 for s in iter_shard(url, stats) if _first(s, IMAGE_KEYS) is not None)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Tar iteration
# ---------------------------------------------------------------------------------------------------------------------


def _open(url: str):
    if is_local(url):
        return open(local_path(url), "rb", buffering=1 << 16)
    from webdataset.gopen import gopen

    return gopen(url, "rb")


class _ReadAdapter(io.RawIOBase):
    """Give a stream with only ``read`` (e.g. webdataset's ``Pipe``) the ``readinto`` that BufferedReader needs."""

    def __init__(self, stream):
        super().__init__()
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._stream.read(len(b))
        n = len(data)
        b[:n] = data
        return n

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            super().close()


class TruncatedShardError(DataError, EOFError):
    """A shard that ends in the middle of a tar member (an ``EOFError`` too)."""


class TarFormatError(DataError):
    """A tar header is damaged (bad checksum or number field)."""


def decompressed(stream):
    """Wrap ``stream`` in a decompressor chosen by its magic bytes (gzip, bzip2, xz); plain tar is returned as is."""
    if not hasattr(stream, "peek"):
        stream = io.BufferedReader(stream if hasattr(stream, "readinto") else _ReadAdapter(stream), 1 << 16)
    head = stream.peek(6)[:6]
    if head[:2] == b"\x1f\x8b":
        import gzip

        inner = gzip.GzipFile(fileobj=stream, mode="rb")
    elif head[:3] == b"BZh":
        import bz2

        inner = bz2.BZ2File(stream, "rb")
    elif head[:6] == b"\xfd7zXZ\x00":
        import lzma

        inner = lzma.LZMAFile(stream, "rb")
    else:
        return stream
    # A C-level buffer on top: the many small reads of tar parsing skip the decompressor's Python layer. Kept
    # small (64 KiB), because a truncated stream loses the buffered data before the damage.
    return io.BufferedReader(inner, buffer_size=1 << 16)


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            raise TruncatedShardError(f"unexpected end of data: wanted {n} bytes, got {got}")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _tar_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else n
    field = field.split(b"\0", 1)[0].strip()
    if not field:
        return 0
    try:
        return int(field, 8)
    except ValueError:
        raise TarFormatError(f"bad number field {field!r} in tar header") from None


def _pax_path(data: bytes) -> Optional[str]:
    path = None
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        length = int(data[pos:sp])
        record = data[sp + 1:pos + length - 1]
        k, _, v = record.partition(b"=")
        if k == b"path":
            path = v.decode("utf-8", "surrogateescape")
        pos += length
    return path


def sample_key(name: str) -> Tuple[Optional[str], Optional[str]]:
    """``(key, extension)`` of a member name as webdataset groups them: the key is the path up to the first dot of
    the basename, the extension the rest (lower case); ``(None, None)`` for names without one and for metadata
    members (``__key__``-style basenames)."""
    m = _KEY_RE.match(name)
    if m is None:
        return None, None
    key, ext = m.group(1), m.group(2).lower()
    base = key.rsplit("/", 1)[-1]
    if base.startswith("__") and base.endswith("__"):
        return None, None
    return key, ext


def iter_tar_members(f, skip_data: bool = False) -> Iterator[Tuple[str, Union[bytes, int]]]:
    """Yield ``(name, data)`` of the regular files of an uncompressed tar stream (ustar, GNU and pax headers); with
    ``skip_data``, ``(name, size)``, seeking over the data (``f`` must then be seekable).

    A lean replacement for ``tarfile``'s stream mode (several times faster on small members). Raises
    ``EOFError`` on truncation and :class:`TarFormatError` on a damaged header.
    """
    long_name: Optional[str] = None
    first = True
    while True:
        hdr = f.read(512)
        if len(hdr) < 512:
            if not hdr:
                if first:
                    raise TruncatedShardError("empty shard")
                return  # end of data without the end-of-archive blocks: accepted, like tar does
            hdr += _read_exact(f, 512 - len(hdr))
        first = False
        if hdr == _ZERO_BLOCK:
            return
        chksum = _tar_number(hdr[148:156])
        if chksum != sum(hdr[:148]) + 256 + sum(hdr[156:]):  # the checksum field counts as 8 spaces
            raise TarFormatError("tar header checksum mismatch")
        size = _tar_number(hdr[124:136])
        typeflag = hdr[156:157]
        padded = (size + 511) & ~511
        if typeflag in (b"0", b"\0", b"7"):
            if long_name is not None:
                name, long_name = long_name, None
            else:
                name = hdr[:100].split(b"\0", 1)[0]
                if hdr[257:262] == b"ustar":
                    prefix = hdr[345:500].split(b"\0", 1)[0]
                    if prefix:
                        name = prefix + b"/" + name
                name = name.decode("utf-8", "surrogateescape")
            if skip_data:
                f.seek(padded, 1)
                yield name, size
                continue
            data = _read_exact(f, size)
            if padded > size:
                _read_exact(f, padded - size)
            yield name, data
        elif typeflag in (b"L", b"x"):
            data = _read_exact(f, padded)[:size]
            if typeflag == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                long_name = _pax_path(data)
        else:  # directories, links, global pax headers, ...: skip the data
            if padded:
                _read_exact(f, padded)
            long_name = None


_ZERO_BLOCK = bytes(512)
_TAR_ERRORS = (EOFError, OSError, zlib.error, ValueError, struct.error, tarfile.TarError)


def iter_shard(url: str, stats: DataStats) -> Iterator[Dict[str, bytes]]:
    """Yield the samples of one shard as dicts ``{"__key__": key, "__url__": url, ext: bytes, ...}``.

    Entries are grouped by key (the member path up to the first dot of its basename), like webdataset; ``.tar``,
    ``.tar.gz`` (also ``.tar.bz2``/``.tar.xz``) and ``pipe:`` or other webdataset URLs work. A shard that cannot be
    opened counts as ``missing_shard``; a read error (truncated or corrupt tar or compression) counts as
    ``bad_shard`` and ends the shard (the sample being assembled is dropped, the ones before are kept).
    """
    try:
        raw = _open(url)
    except Exception:  # noqa: BLE001 - any failure to open is a missing shard
        stats.add("missing_shard")
        return
    stats.add("shards")
    current: Optional[Dict[str, bytes]] = None
    stream = raw
    try:
        stream = decompressed(raw)
        for name, data in iter_tar_members(stream):
            key, ext = sample_key(name)
            if key is None:
                continue
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current[ext] = data
        if current is not None:
            yield current
    except _TAR_ERRORS:
        stats.add("bad_shard")
    finally:
        for f in (stream, raw) if stream is not raw else (raw,):
            try:
                f.close()
            except Exception:  # noqa: BLE001 - e.g. a pipe: command that exited with an error after its data
                pass


def _first(sample: Dict[str, bytes], keys: Iterable[str]) -> Optional[bytes]:
    for k in keys:
        v = sample.get(k)
        if v is not None:
            return v
    return None


def sample_image_bytes(sample: Dict[str, bytes], stats: DataStats) -> Optional[bytes]:
    data = _first(sample, IMAGE_KEYS)
    if data is None:
        stats.add("missing_image")
    return data


@dataclass(frozen=True)
class LabelRule:
    """Where a sample's label is: its ``cls`` entry (integer text, or a class name of ``classes``), or, with another
    ``key``, that field of its ``json`` entry (an integer, or a class name of ``classes``; ``a.b`` for a nested
    field)."""

    key: str = "cls"
    classes: Optional[Tuple[str, ...]] = None

    def describe(self) -> str:
        where = "the 'cls' entry" if self.key == "cls" else f"the field {self.key!r} of the 'json' entry"
        return where + (f" (class names: {len(self.classes)} in classes.txt)" if self.classes else "")


def _json_field(sample: Dict[str, bytes], key: str):
    raw = sample.get("json")
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def sample_label(sample: Dict[str, bytes], stats: DataStats, rule: Optional[LabelRule] = None) -> Optional[int]:
    """Integer label of a sample by ``rule`` (default: ``cls`` as ASCII text), or ``None``, counted as
    ``missing_label`` (no such entry) or ``bad_label`` (not an integer >= 0 and not one of the class names)."""
    rule = rule or _DEFAULT_RULE
    if rule.key == "cls":
        data = _first(sample, LABEL_KEYS)
        try:
            value = None if data is None else data.decode("utf-8").strip()
        except UnicodeDecodeError:
            stats.add("bad_label")
            return None
    else:
        value = _json_field(sample, rule.key)
    if value is None:
        stats.add("missing_label")
        return None
    if isinstance(value, bool):
        value = None
    elif (isinstance(value, int) and value >= 0) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    elif isinstance(value, str) and rule.classes and value in rule.classes:
        return rule.classes.index(value)
    stats.add("bad_label")
    return None


_DEFAULT_RULE = LabelRule()


# ---------------------------------------------------------------------------------------------------------------------
# Image decoding
# ---------------------------------------------------------------------------------------------------------------------

_GRAY_MODES = {"L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _pil_to_rgb(data: bytes, stats: DataStats, is_jpeg: bool,
                max_side: Optional[int] = None) -> "Optional[torch.Tensor]":
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if max_side and max(im.size) > max_side:
                im = _reduced(im, max_side)
            im.load()  # full decode: a truncated file raises here
            mode = im.mode
            if mode != "RGB":
                if mode in _GRAY_MODES:
                    kind = "converted_grayscale"
                elif mode in ("CMYK", "YCCK"):
                    kind = "converted_cmyk"
                elif mode in _ALPHA_MODES or (mode == "P" and "transparency" in im.info):
                    kind = "converted_alpha"
                else:
                    kind = "converted_other"
                im = im.convert("RGB")
            arr = np.array(im, dtype=np.uint8, copy=True)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError, EOFError,
            TypeError, IndexError, MemoryError):
        stats.add("undecodable")
        return None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        stats.add("undecodable")
        return None
    if mode != "RGB":
        stats.add(kind)
    if not is_jpeg:
        stats.add("non_jpeg")
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# Cheap checks before decoding
# ---------------------------------------------------------------------------------------------------------------------

#: Start-of-frame markers (JPEG), and those of the baseline / extended sequential Huffman processes (8-bit) that
#: GPU decoders (nvJPEG) decode in hardware.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SEQUENTIAL_HUFFMAN = (0xC0, 0xC1)
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RST0-7: markers without a length field
_SAMPLING_OK = {(1, 1), (2, 1), (1, 2), (2, 2)}  # luma sampling of 4:4:4, 4:2:2, 4:4:0, 4:2:0 (chroma 1x1)
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"qoif", b"\x00\x00\x01\x00",
          b"\x00\x00\x00\x0cjP  ", b"\xffO\xffQ")


class ImageProbe(NamedTuple):
    """What the first bytes of an image say: ``kind`` is ``"jpeg"`` (a complete, baseline 8-bit 3-component JPEG
    that a GPU decoder takes), ``"other"`` (a JPEG of another kind: grayscale, CMYK, progressive, ...; or another
    image format: decoded on the CPU) or ``"bad"`` (empty, truncated, or not an image format we know)."""

    kind: str
    height: int = 0
    width: int = 0


_BAD = ImageProbe("bad")


def _probe_jpeg(data: bytes) -> ImageProbe:
    n = len(data)
    pos, sof, adobe_rgb = 2, None, False
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return _BAD
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE or marker == 0xD8:
            pos += 2
            continue
        if marker == 0xD9:  # end of image before any scan
            return _BAD
        seg = (data[pos + 2] << 8) | data[pos + 3]
        if seg < 2 or pos + 2 + seg > n:
            return _BAD
        if marker in _SOF_MARKERS and seg >= 8:
            ncomp = data[pos + 9]
            sampling = [(data[pos + 11 + 3 * i] >> 4, data[pos + 11 + 3 * i] & 15) for i in range(ncomp)
                        if pos + 12 + 3 * i <= n]
            sof = (marker, data[pos + 4], (data[pos + 5] << 8) | data[pos + 6], (data[pos + 7] << 8) | data[pos + 8],
                   ncomp, sampling)
        elif marker == 0xEE and data[pos + 4:pos + 9] == b"Adobe" and seg >= 12:
            adobe_rgb = data[pos + 15] == 0  # 3 components stored as RGB, not YCbCr
        elif marker == 0xDA:  # start of scan: the header is complete; the data must end with an end-of-image marker
            if sof is None or data.rfind(b"\xff\xd9", pos) < 0:
                return _BAD
            kind, precision, h, w, ncomp, sampling = sof
            if h == 0 or w == 0:
                return ImageProbe("other")
            hardware = (kind in _SEQUENTIAL_HUFFMAN and precision == 8 and ncomp == 3 and not adobe_rgb
                        and len(sampling) == 3 and sampling[0] in _SAMPLING_OK and sampling[1] == sampling[2] == (1, 1))
            return ImageProbe("jpeg" if hardware else "other", h, w)
        pos += 2 + seg
    return _BAD


def probe_image(data: Optional[bytes]) -> ImageProbe:
    """Classify image bytes without decoding them (a few microseconds: JPEG marker walk, magic numbers).

    A JPEG must have a frame header, a scan and an end-of-image marker after it (a truncated file has none); other
    formats are recognised by their magic numbers (PNG, GIF, BMP, WebP, TIFF, PNM, QOI, ICO, JPEG 2000).
    """
    if not data or len(data) < 4:
        return _BAD
    if data[:2] == b"\xff\xd8":
        return _probe_jpeg(data)
    if data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP") or \
            (data[:1] == b"P" and data[1:2] in b"1234567" and data[2:3] in b" \t\r\n#"):
        return ImageProbe("other")
    return _BAD


# ---------------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------------

_JPEG: Optional[tuple] = None


def _jpeg_decoder():
    """``(torchvision.io.decode_jpeg, ImageReadMode)``, or ``None`` where torchvision no longer has them (PIL then)."""
    global _JPEG
    if _JPEG is None:
        try:
            from torchvision.io import ImageReadMode, decode_jpeg

            _JPEG = (decode_jpeg, ImageReadMode)
        except ImportError:
            _JPEG = ()
    return _JPEG or None


def _reduced(im, max_side: int):
    """``im`` decoded at a reduced size with its long side in [max_side / 2, max_side]: JPEG DCT scaling (1/2, 1/4,
    1/8, nearly free) where the format allows, then an integer box reduction if still too large."""
    w, h = im.size
    target = max(1, -(-max_side // 2))
    if im.format == "JPEG":
        im.draft(im.mode if im.mode in ("RGB", "L") else None, (max(1, w * target // max(w, h)),
                                                              max(1, h * target // max(w, h))))
    im.load()
    factor = -(-max(im.size) // max_side)
    return im.reduce(factor) if factor > 1 else im


def decode_image(data: bytes, stats: DataStats, max_side: Optional[int] = None) -> "Optional[torch.Tensor]":
    """Decode image bytes to a uint8 RGB tensor (3, H, W), or ``None`` (counted as ``undecodable``).

    RGB and grayscale JPEGs take the fast path (``torchvision.io.decode_jpeg``); everything else (CMYK JPEGs, PNG,
    WebP, palette or alpha images, ...) goes through PIL and is converted to RGB. Conversions are counted. With
    ``max_side``, larger images are decoded at a reduced size (long side between ``max_side / 2`` and ``max_side``;
    JPEGs by DCT scaling, which also makes them much cheaper to decode).
    """
    if not data:
        stats.add("undecodable")
        return None
    is_jpeg = data[:2] == b"\xff\xd8"
    if max_side and is_jpeg:
        probe = probe_image(data)
        if max(probe.height, probe.width) > max_side:
            return _pil_to_rgb(data, stats, is_jpeg, max_side)
    if is_jpeg and _jpeg_decoder() is not None:
        import torch

        decode_jpeg, ImageReadMode = _JPEG

        try:
            # torchvision 0.29 deprecates its image codecs (in favour of torchcodec) with a warning on every call;
            # they still work and are the fastest JPEG decoder at hand.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        except RuntimeError:
            img = None  # truncated, or a JPEG flavour libjpeg does not take: let PIL decide
        if img is not None and img.ndim == 3 and img.shape[1] > 0 and img.shape[2] > 0:
            c = img.shape[0]
            if c == 3:
                return img
            if c == 1:
                stats.add("converted_grayscale")
                return img.expand(3, -1, -1).contiguous()
    return _pil_to_rgb(data, stats, is_jpeg, max_side)
