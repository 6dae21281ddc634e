"""The SSL loader's sample stream, as each loader worker (or the training process, with ``num_workers=0``) runs it.

Order of an epoch on one rank. Batch ``k`` (0 <= k < len(loader)) comes from *stream slot* ``k % num_workers``.
The slots read the source (:class:`~smi_timm.data.sources.Source`) in *passes*: pass ``p`` shuffles the units with a
permutation of (seed, epoch, p) that every rank draws alike, and each sample of a pass is read by exactly one slot:

* **many units** (at least one per slot of all ranks): slot ``g = rank * num_workers + s`` reads the units
  ``g, g + G, g + 2G, ...`` of the permutation (``G`` = slots over all ranks);
* **few units** (a small dataset): every worker of a rank reads every unit and keeps the samples ``j`` of the pass
  with ``j % world_size == rank``; the rank's workers shuffle and batch them alike and each keeps its own batches.

A slot's samples go through a shuffle buffer and are grouped into *raw batches* of ``batch_size`` samples that have
image bytes. The buffer never holds two copies of a sample: it is capped at the slot's share of a pass when the
sizes are known, and emptied at the end of every pass before the next pass starts; a sample whose image is already
in the batch being filled (possible only where a batch spans two passes) waits for the next batch. So an epoch that
fits in one pass reads every sample once and no batch holds an image twice. Batch ``k`` is augmented with parameters
drawn from :func:`~smi_timm.data.augment.batch_seed` (seed, epoch, rank, k): it depends on the bytes read before it,
never on the decoding or augmentation of earlier batches.

Resuming at batch ``start`` (``loader.set_epoch(epoch, start)``): worker ``w`` plays slot ``(w + start) %
num_workers`` (so ``DataLoader``'s round robin still yields batches in order), replays its slot's first raw batches
by reading and checking bytes only (no decoding, no augmentation: ~50 us per sample instead of milliseconds) and
continues from there with exactly the batches an uninterrupted run would have produced.

Bad samples. Each sample is checked without decoding (:func:`~smi_timm.data.reading.probe_image`); one that cannot be
an image (truncated JPEG, random bytes) counts as ``undecodable`` and stays in its raw batch as a hole; a raw batch
made of holes only is dropped. A hole, or an image that fails to decode, takes the image of another sample of the
same batch (slot ``i`` -> ``valid[i % len(valid)]``; its two views are drawn independently), so every batch has
exactly ``batch_size`` samples (the loss and DDP need equal batches) and batch boundaries depend on bytes only.

Workers hand over :class:`AugmentedItem` (CPU path) or :class:`RawItem` (accelerator path) named tuples.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataStallError
from .augment import AugmentConfig, V2TwoViewAugment, batch_seed
from .pipeline import CPUTwoView
from .reading import ImageProbe, decode_image, probe_image, sample_image_bytes
from .sources import Source
from .stats import DataStats
from .workers import check_worker

__all__ = ["SSLStream", "StreamOptions", "AugmentedItem", "RawItem", "fill_slots", "mix_seed", "single_thread"]

#: one sample on its way into a raw batch: (identity: unit and key, image bytes)
Tagged = Tuple[Tuple[str, str], bytes]
RawBatch = List[Tuple[bytes, ImageProbe]]


class AugmentedItem(NamedTuple):
    """A batch augmented by a worker (CPU path): uint8 views ``(2, B, 3, S, S)`` and the worker's new counts."""

    batch: int
    views: torch.Tensor
    stats: dict


class RawItem(NamedTuple):
    """A batch read by a worker (accelerator path): the device decodes and augments it."""

    batch: int
    enc: torch.Tensor           #: the batch's device-decodable JPEGs, concatenated (uint8)
    enc_sizes: List[int]        #: bytes of each JPEG in ``enc``
    enc_hw: List[Tuple[int, int]]
    pix: torch.Tensor           #: the images decoded by the worker (other formats), concatenated (uint8 CHW)
    pix_hw: List[Tuple[int, int]]
    slot_image: List[int]       #: per sample of the batch: its image, numbered ``enc`` first, then ``pix``
    stats: dict


@dataclass(frozen=True)
class StreamOptions:
    """What an epoch's stream needs besides the source (frozen: the same object goes to every worker)."""

    batch_size: int
    batches: int                #: batches per epoch on this rank
    augment: AugmentConfig
    image_size: int
    seed: int
    rank: int
    world_size: int
    shuffle_buffer: int
    mode: str                   #: "augment" (CPU path) or "raw" (accelerator path)
    backend: str = "batched"    #: "batched" or "v2" (per-sample torchvision transforms, the reference)
    max_side: Optional[int] = None


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, rank, slot, ...)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def fill_slots(valid: Sequence[int], n: int) -> List[int]:
    """Source slot of each of ``n`` slots: itself when valid, else ``valid[i % len(valid)]``."""
    ok = set(valid)
    return [i if i in ok else valid[i % len(valid)] for i in range(n)]


@contextlib.contextmanager
def single_thread(active: bool = True):
    """Run torch ops on one thread: intra-op threads only add overhead on the many small tensors of augmentation,
    and badly so on a busy machine. (DataLoader workers already run single-threaded.)"""
    n = torch.get_num_threads()
    if not active or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _shared_flat(parts: Sequence, total: int, shared: bool) -> torch.Tensor:
    """Concatenate bytes objects or uint8 tensors into one flat uint8 tensor, allocated in shared memory when
    ``shared`` (in a worker: the ``DataLoader`` then sends it without another copy)."""
    out = torch.empty(total, dtype=torch.uint8)
    if shared and total:
        out.share_memory_()
    o = 0
    view = memoryview(out.numpy()) if total else None
    for p in parts:
        if isinstance(p, torch.Tensor):
            out[o:o + p.numel()].copy_(p.reshape(-1))
            o += p.numel()
        else:
            view[o:o + len(p)] = p
            o += len(p)
    return out


def _shuffled(items: Iterator[Tagged], size: int, rng: random.Random) -> Iterator[Tagged]:
    """A shuffle buffer of ``size`` over ``items``, emptied when they end (one pass)."""
    if size <= 1:
        yield from items
        return
    buf: List[Tagged] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


class _WorkerInfo(NamedTuple):
    id: int
    num_workers: int


class SSLStream(IterableDataset):
    """One epoch of batches for one rank: the dataset given to ``DataLoader`` by :class:`~smi_timm.data.SSLLoader`.

    ``mode="augment"``: workers decode and augment (CPU path) and yield :class:`AugmentedItem`. ``mode="raw"``:
    workers only read and check (accelerator path) and yield :class:`RawItem`: the encoded JPEG bytes of the batch in
    one buffer, the few images the device decoder does not take decoded here, the image of each slot and the
    counters; the training process decodes and augments on the device.
    """

    def __init__(self, source: Source, options: StreamOptions, epoch: int, start_batch: int):
        super().__init__()
        self.source = source
        self.options = options
        self.epoch = epoch
        self.start_batch = start_batch
        self.bad_limit = 10_000 + 2 * options.shuffle_buffer

    # -- passes over the source ---------------------------------------------------------------------------------------
    def _permutation(self, p: int) -> List[int]:
        perm = list(range(len(self.source.units)))
        random.Random(mix_seed(self.options.seed, self.epoch, p, 0x5EED)).shuffle(perm)
        return perm

    def _pass_units(self, p: int, g: int, nslots: int, split: bool) -> List[int]:
        perm = self._permutation(p)
        return perm if split else perm[g::nslots]

    def _pass_size(self, units: List[int], split: bool) -> Optional[int]:
        counts = self.source.counts
        if counts is None:
            return None
        n = sum(counts[u] for u in units)
        o = self.options
        return -(-(n - o.rank) // o.world_size) if split else n

    def _samples(self, units: List[int], split: bool, stats: DataStats, state: dict) -> Iterator[Tagged]:
        """The samples of one pass over ``units`` (with ``split``: only this rank's share of them)."""
        o = self.options
        j = 0
        for u in units:
            check_worker()
            unit = self.source.units[u]
            got = False
            for sample in self.source.read(unit, stats):
                check_worker()
                data = sample_image_bytes(sample, stats)
                if data is None:
                    continue
                got = True
                mine = not split or j % o.world_size == o.rank
                j += 1
                if mine:
                    yield (unit, sample["__key__"]), data
            state["empty"] = 0 if got else state["empty"] + 1
            if state["empty"] > 2 * len(self.source.units) + 2:
                what = "shards" if self.source.kind == "shards" else "groups of image files"
                raise DataStallError(f"SSL loader: {state['empty']} {what} in a row gave no sample with an image (the "
                                     f"last: {unit!r}); are these WebDataset tar shards of images? counters: "
                                     f"{stats!r}")

    def _stream(self, g: int, nslots: int, split: bool, seed: int, stats: DataStats) -> Iterator[Tagged]:
        """Passes 0, 1, 2, ... of slot ``g`` (of ``nslots``), each shuffled and emptied before the next."""
        state = {"empty": 0}
        rng = random.Random(seed)
        p = 0
        while True:
            units = self._pass_units(p, g, nslots, split)
            size = self._pass_size(units, split)
            cap = self.options.shuffle_buffer if size is None else min(self.options.shuffle_buffer, size)
            yield from _shuffled(self._samples(units, split, stats, state), cap, rng)
            p += 1

    def _raw_batches(self, samples: Iterator[Tagged], stats: DataStats) -> Iterator[RawBatch]:
        """Raw batches of ``batch_size`` samples without two copies of one image: a sample whose image the batch
        being filled already has waits for the next batch (only a slot with fewer images than a batch, which the
        loader warns about, then repeats one)."""
        b = self.options.batch_size
        batch: RawBatch = []
        keys: set = set()
        waiting: List[Tagged] = []
        usable, bad_run = False, 0
        while True:
            tagged = next((w for w in waiting if w[0] not in keys), None)
            if tagged is not None:
                waiting.remove(tagged)
            elif len(waiting) >= b:  # fewer distinct images than a batch: a repeat is unavoidable
                tagged = waiting.pop(0)
            else:
                tagged = next(samples, None)
                if tagged is None:
                    return
                if tagged[0] in keys:
                    waiting.append(tagged)
                    continue
            key, data = tagged
            probe = probe_image(data)
            if probe.kind == "bad":
                stats.add("undecodable")
                bad_run += 1
                if bad_run > self.bad_limit:
                    raise DataStallError(f"SSL loader: {bad_run} undecodable samples in a row; counters: {stats!r}")
            else:
                bad_run = 0
                usable = True
            batch.append((data, probe))
            keys.add(key)
            if len(batch) == b:
                if usable:
                    yield batch
                batch, keys, usable = [], set(), False

    # -- iteration ----------------------------------------------------------------------------------------------------
    def _plan(self, info) -> Tuple[int, int, range, Iterator[RawBatch], DataStats, DataStats]:
        """(worker slot, workers, this worker's batches, its raw batches, the counters of reading them, the
        counters of decoding and augmenting its batches)."""
        o = self.options
        worker, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot = (worker + self.start_batch) % nworkers
        first = self.start_batch + (slot - self.start_batch) % nworkers
        batches = range(first, o.batches, nworkers)
        stats = DataStats()
        nslots = o.world_size * nworkers
        if len(self.source.units) < nslots:  # few units: a sample-level split (see the module doc)
            # every worker of the rank reads and batches the rank's samples alike and keeps its own batches; the
            # reading is counted by one of them only, so that each sample counts once
            read_stats = stats if slot == 0 else DataStats()
            seed = mix_seed(o.seed, self.epoch, o.rank, 0, 1, 0x5AFE)
            raw = self._every(self._raw_batches(self._stream(0, 1, True, seed, read_stats), read_stats), slot,
                              nworkers)
            return slot, nworkers, batches, raw, read_stats, stats
        seed = mix_seed(o.seed, self.epoch, o.rank, slot, nworkers, 0x5AFE)
        raw = self._raw_batches(self._stream(o.rank * nworkers + slot, nslots, False, seed, stats), stats)
        return slot, nworkers, batches, raw, stats, stats

    def batch_bytes(self, worker: int = 0, num_workers: int = 1) -> Iterator[Tuple[int, List[bytes]]]:
        """``(batch index, the image bytes of its samples)`` of every batch worker ``worker`` of ``num_workers``
        yields this epoch, without decoding: what the batches are made of (for inspection and tests)."""
        info = _WorkerInfo(worker, num_workers)
        slot, nworkers, batches, raw, _, _ = self._plan(info)
        for _ in range((batches[0] - slot) // nworkers if len(batches) else 0):
            next(raw)
        for k in batches:
            yield k, [data for data, probe in next(raw) if probe.kind != "bad"]

    @staticmethod
    def _every(raw: Iterator[RawBatch], slot: int, n: int) -> Iterator[RawBatch]:
        for j, batch in enumerate(raw):
            if j % n == slot:
                yield batch

    def __iter__(self):
        info = get_worker_info()
        slot, nworkers, batches, raw, read_stats, stats = self._plan(info)
        if len(batches) == 0:
            return
        try:
            for _ in range((batches[0] - slot) // nworkers):  # resume: the consumed batches, as bytes only
                next(raw)
            read_stats.reset()
            stats.reset()
            in_worker = info is not None
            if self.options.mode == "raw":
                for k in batches:
                    yield self._raw_item(raw, k, stats, in_worker)
                return
            aug = CPUTwoView(self.options.augment, self.options.image_size) if self.options.backend == "batched" \
                else V2TwoViewAugment(self.options.augment, self.options.image_size, normalize=False)
            for k in batches:
                with single_thread(not in_worker):
                    item = self._augmented_item(raw, k, stats, aug, in_worker)
                yield item
        finally:
            raw.close()

    def _decoded(self, raw: Iterator[RawBatch], stats: DataStats) -> List[torch.Tensor]:
        """The next raw batch decoded on the CPU, holes filled (a batch whose every image fails is skipped)."""
        while True:
            batch = next(raw)
            images: List[Optional[torch.Tensor]] = [None] * len(batch)
            for i, (data, probe) in enumerate(batch):
                if probe.kind != "bad":
                    images[i] = decode_image(data, stats, self.options.max_side)
            valid = [i for i, im in enumerate(images) if im is not None]
            if valid:
                return [images[j] for j in fill_slots(valid, len(images))]

    def _augmented_item(self, raw, k: int, stats: DataStats, aug, in_worker: bool) -> AugmentedItem:
        o = self.options
        images = self._decoded(raw, stats)
        seed = batch_seed(o.seed, self.epoch, o.rank, k)
        b, s = o.batch_size, o.image_size
        out = torch.empty(2, b, 3, s, s, dtype=torch.uint8)
        if in_worker:
            out.share_memory_()
        if isinstance(aug, CPUTwoView):
            aug(images, seed, out=out.view(2 * b, 3, s, s))
        else:  # per-sample v2 transforms draw from torch's global generator
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                va, vb = aug(images)
            out[0].copy_(va)
            out[1].copy_(vb)
        stats.add("samples", b)
        return AugmentedItem(k, out, stats.pop_delta())

    def _raw_item(self, raw, k: int, stats: DataStats, in_worker: bool) -> RawItem:
        max_side = self.options.max_side
        while True:
            batch = next(raw)
            enc: List[bytes] = []
            enc_hw: List[Tuple[int, int]] = []
            pix: List[torch.Tensor] = []
            where: List[Optional[Tuple[str, int]]] = [None] * len(batch)
            for i, (data, probe) in enumerate(batch):
                if probe.kind == "jpeg" and (not max_side or max(probe.height, probe.width) <= max_side):
                    where[i] = ("dev", len(enc))
                    enc.append(data)
                    enc_hw.append((probe.height, probe.width))
                elif probe.kind != "bad":
                    img = decode_image(data, stats, max_side)
                    if img is not None:
                        where[i] = ("cpu", len(pix))
                        pix.append(img)
            valid = [i for i, w in enumerate(where) if w is not None]
            if valid:
                break
        index = [-1 if w is None else w[1] if w[0] == "dev" else len(enc) + w[1] for w in where]
        slot_image = [index[j] for j in fill_slots(valid, len(batch))]
        stats.add("samples", self.options.batch_size)
        return RawItem(k, _shared_flat(enc, sum(len(e) for e in enc), in_worker), [len(e) for e in enc], enc_hw,
                       _shared_flat(pix, sum(p.numel() for p in pix), in_worker),
                       [tuple(p.shape[-2:]) for p in pix], slot_image, stats.pop_delta())
