"""Helpers that build small synthetic datasets (image folders, good and broken shards) for tests and benchmarks."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .shards import ShardSink, split_name, write_index


def level_of(i: int) -> int:
    """Grey level that identifies image ``i`` in :func:`make_image_folder` (distinct for i < 48)."""
    return 8 + 5 * (i % 48)


def encode_image(arr: np.ndarray, fmt: str = "JPEG", mode: Optional[str] = None, quality: int = 95) -> bytes:
    """Encode an HxWx3 uint8 array (converted to ``mode`` first if given) as image bytes."""
    from PIL import Image

    im = Image.fromarray(arr, "RGB")
    if mode is not None and mode != "RGB":
        im = im.convert(mode)
    out = io.BytesIO()
    kw = {"quality": quality} if fmt == "JPEG" else {}
    im.save(out, format=fmt, **kw)
    return out.getvalue()


def flat_image(level: int, size: Tuple[int, int] = (32, 32)) -> np.ndarray:
    """A uniform grey HxWx3 image (survives JPEG round trips within +-1)."""
    return np.full((size[0], size[1], 3), level, dtype=np.uint8)


def noise_image(rng: np.random.Generator, size: Tuple[int, int] = (32, 32)) -> np.ndarray:
    return rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)


def make_image_folder(root: os.PathLike, classes: Sequence[str] = ("a", "b", "c"), per_class: int = 5,
                      size: Tuple[int, int] = (32, 32)) -> Dict[str, int]:
    """ImageFolder-style tree of flat grey JPEGs; image ``i`` (counting over classes in order) has grey level
    :func:`level_of` (i). Returns ``{relative path: i}``."""
    root = Path(root)
    out = {}
    i = 0
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            rel = f"{c}/img{j:03d}.jpg"
            (root / rel).write_bytes(encode_image(flat_image(level_of(i), size)))
            out[rel] = i
            i += 1
    return out


def write_samples(pattern: os.PathLike, samples: Sequence[Tuple[str, dict]], maxcount: int = 10_000,
                  split: Optional[str] = None, classes: Optional[Sequence[str]] = None,
                  index: bool = True) -> List[str]:
    """Write ``(key, {ext: bytes})`` samples into shards (and a JSON index unless ``index=False``)."""
    with ShardSink(pattern, maxcount=maxcount) as sink:
        for key, entries in samples:
            sink.write(key, entries)
    if index:
        split = split or split_name(pattern)
        write_index(Path(os.fspath(pattern)).parent / f"{split}.json", split, sink.paths, sink.counts, classes,
                    num_classes=len(classes) if classes else 0)
    return sink.paths


def broken_samples(seed: int = 0, size: Tuple[int, int] = (32, 32)) -> Tuple[List[Tuple[str, dict]], Dict[str, int]]:
    """One sample of every kind of bad or unusual data, plus the counters the eval loader should report for them.

    Contents: 4 good RGB JPEGs, a truncated JPEG, random bytes under ``jpg``, a sample without an image, one without
    ``cls``, one with a non-integer ``cls``, a grayscale JPEG, a CMYK JPEG, an RGBA PNG stored under ``png``, a
    palette PNG stored under ``jpg``.
    """
    rng = np.random.default_rng(seed)
    good = [encode_image(noise_image(rng, size)) for _ in range(4)]
    cls = b"1"
    samples = [(f"good{i}", {"jpg": g, "cls": cls}) for i, g in enumerate(good)]
    samples += [
        ("truncated", {"jpg": good[0][: len(good[0]) // 2], "cls": cls}),
        ("garbage", {"jpg": bytes(rng.integers(0, 256, 500, dtype=np.uint8)), "cls": cls}),
        ("noimage", {"cls": cls}),
        ("nolabel", {"jpg": good[1]}),
        ("badlabel", {"jpg": good[2], "cls": b"cat"}),
        ("gray", {"jpg": encode_image(noise_image(rng, size), mode="L"), "cls": cls}),
        ("cmyk", {"jpg": encode_image(noise_image(rng, size), mode="CMYK"), "cls": cls}),
        ("rgba", {"png": encode_image(noise_image(rng, size), fmt="PNG", mode="RGBA"), "cls": cls}),
        ("palette", {"jpg": encode_image(noise_image(rng, size), fmt="PNG", mode="P"), "cls": cls}),
    ]
    expected_eval = {
        "undecodable": 2, "missing_image": 1, "missing_label": 1, "bad_label": 1,
        "converted_grayscale": 1, "converted_cmyk": 1, "converted_alpha": 1, "converted_other": 1, "non_jpeg": 2,
        "samples": 8,  # 4 good + gray + cmyk + rgba + palette
    }
    return samples, expected_eval


def truncate_file(path: os.PathLike, keep_fraction: float = 0.5) -> None:
    """Cut a file (e.g. a shard) to a fraction of its size."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep_fraction)])
