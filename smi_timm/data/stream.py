"""The SSL loader's sample stream, as each loader worker (or the training process, with ``num_workers=0``) runs it.

Order of an epoch on one rank. Batch ``k`` (0 <= k < len(loader)) comes from *stream slot* ``k % num_workers``;
slot ``s`` reads an endless stream of shards (the shard list shuffled per (seed, epoch, cycle) the same way on every
rank, slot ``rank * num_workers + s`` taking every ``world_size * num_workers``-th shard), passes the samples through
a shuffle buffer and groups them into *raw batches* of ``batch_size`` samples that have image bytes. Its j-th raw
batch becomes batch ``k = s + j * num_workers``, augmented with parameters drawn from
:func:`~smi_timm.data.augment.batch_seed` (seed, epoch, rank, k). So a batch depends on the bytes read before it
(shuffle buffer), never on the decoding or augmentation of earlier batches.

Resuming at batch ``start`` (``loader.set_epoch(epoch, start)``): worker ``w`` plays slot ``(w + start) %
num_workers`` (so ``DataLoader``'s round robin still yields batches in order), replays its slot's first raw batches
by reading and checking bytes only (no decoding, no augmentation: ~50 us per sample instead of milliseconds) and
continues from there with exactly the batches an uninterrupted run would have produced.

Bad samples. Each sample is checked without decoding (:func:`~smi_timm.data.reading.probe_image`); one that cannot be
an image (truncated JPEG, random bytes) counts as ``undecodable`` and stays in its raw batch as a hole; a raw batch
made of holes only is dropped. A hole, or an image that fails to decode, takes the image of another sample of the
same batch (slot ``i`` -> ``valid[i % len(valid)]``; its two views are drawn independently), so every batch has
exactly ``batch_size`` samples (the loss and DDP need equal batches) and batch boundaries depend on bytes only.
"""
from __future__ import annotations

import contextlib
import random
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataStallError
from .augment import AugmentConfig, V2TwoViewAugment, batch_seed
from .pipeline import CPUTwoView
from .reading import ImageProbe, decode_image, iter_shard, probe_image, sample_image_bytes
from .stats import DataStats
from .workers import check_worker

__all__ = ["SSLStream", "fill_slots", "mix_seed"]

RawBatch = List[Tuple[bytes, ImageProbe]]


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


class SSLStream(IterableDataset):
    """One epoch of batches for one rank: the dataset given to ``DataLoader`` by :class:`~smi_timm.data.SSLLoader`.

    ``mode="augment"``: workers decode and augment (CPU path) and yield ``{"batch", "views", "stats"}`` with uint8
    views (2, B, 3, S, S). ``mode="raw"``: workers only read and check (accelerator path) and yield the encoded JPEG
    bytes of the batch in one buffer, the few images the device decoder does not take decoded here (``pix``), the
    image of each slot and the counters; the training process decodes and augments on the device.
    """

    def __init__(self, urls: List[str], batch_size: int, batches: int, augment: AugmentConfig, image_size: int,
                 seed: int, rank: int, world_size: int, shuffle_buffer: int, epoch: int, start_batch: int, mode: str,
                 backend: str = "batched", max_side: Optional[int] = None):
        super().__init__()
        self.urls = urls
        self.batch_size = batch_size
        self.batches = batches
        self.augment = augment
        self.image_size = image_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.epoch = epoch
        self.start_batch = start_batch
        self.mode = mode
        self.backend = backend
        self.max_side = max_side
        self.bad_limit = 10_000 + 2 * shuffle_buffer

    # -- shards and samples -----------------------------------------------------------------------------------------
    def _shards(self, slot: int, nslots: int) -> Iterator[str]:
        n = len(self.urls)
        cycle, perm = -1, None
        g = slot
        while True:
            c, pos = divmod(g, n)
            if c != cycle:
                cycle = c
                perm = list(range(n))
                random.Random(mix_seed(self.seed, self.epoch, cycle, 0x5EED)).shuffle(perm)
            yield self.urls[perm[pos]]
            g += nslots

    def _samples(self, shards: Iterator[str], stats: DataStats) -> Iterator[bytes]:
        limit = 2 * len(self.urls) + 2
        empty = 0
        url = None
        for url in shards:
            check_worker()
            got = False
            for sample in iter_shard(url, stats):
                check_worker()
                data = sample_image_bytes(sample, stats)
                if data is None:
                    continue
                got = True
                yield data
            empty = 0 if got else empty + 1
            if empty > limit:
                raise DataStallError(f"SSL loader: {empty} shards in a row gave no sample with an image (the last: "
                                   f"{url!r}); are these WebDataset tar shards of images? counters: {stats!r}")

    @staticmethod
    def _shuffled(items: Iterator[bytes], size: int, rng: random.Random) -> Iterator[bytes]:
        if size <= 1:
            yield from items
            return
        buf: List[bytes] = []
        for x in items:
            if len(buf) < size:
                buf.append(x)
                continue
            j = rng.randrange(size)
            yield buf[j]
            buf[j] = x
        rng.shuffle(buf)
        yield from buf

    def _raw_batches(self, samples: Iterator[bytes], stats: DataStats) -> Iterator[RawBatch]:
        batch: RawBatch = []
        usable = False
        bad_run = 0
        for data in samples:
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
            if len(batch) == self.batch_size:
                if usable:
                    yield batch
                batch, usable = [], False

    # -- iteration ----------------------------------------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot = (worker + self.start_batch) % nworkers
        first = self.start_batch + (slot - self.start_batch) % nworkers
        batches = range(first, self.batches, nworkers)
        if len(batches) == 0:
            return
        stats = DataStats()
        rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, slot, nworkers, 0x5AFE))
        shards = self._shards(self.rank * nworkers + slot, self.world_size * nworkers)
        raw = self._raw_batches(self._shuffled(self._samples(shards, stats), self.shuffle_buffer, rng), stats)
        try:
            for _ in range((first - slot) // nworkers):  # resume: the consumed batches, as bytes only
                next(raw)
            stats.reset()
            in_worker = info is not None
            if self.mode == "raw":
                for k in batches:
                    yield self._raw_item(raw, k, stats, in_worker)
                return
            aug = CPUTwoView(self.augment, self.image_size) if self.backend == "batched" else \
                V2TwoViewAugment(self.augment, self.image_size, normalize=False)
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
                    images[i] = decode_image(data, stats, self.max_side)
            valid = [i for i, im in enumerate(images) if im is not None]
            if valid:
                return [images[j] for j in fill_slots(valid, len(images))]

    def _augmented_item(self, raw, k: int, stats: DataStats, aug, in_worker: bool) -> Dict:
        images = self._decoded(raw, stats)
        seed = batch_seed(self.seed, self.epoch, self.rank, k)
        b, s = self.batch_size, self.image_size
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
        return {"batch": k, "views": out, "stats": stats.pop_delta()}

    def _raw_item(self, raw, k: int, stats: DataStats, in_worker: bool) -> Dict:
        while True:
            batch = next(raw)
            enc: List[bytes] = []
            enc_hw: List[Tuple[int, int]] = []
            pix: List[torch.Tensor] = []
            where: List[Optional[Tuple[str, int]]] = [None] * len(batch)
            for i, (data, probe) in enumerate(batch):
                if probe.kind == "jpeg" and (not self.max_side or max(probe.height, probe.width) <= self.max_side):
                    where[i] = ("dev", len(enc))
                    enc.append(data)
                    enc_hw.append((probe.height, probe.width))
                elif probe.kind != "bad":
                    img = decode_image(data, stats, self.max_side)
                    if img is not None:
                        where[i] = ("cpu", len(pix))
                        pix.append(img)
            valid = [i for i, w in enumerate(where) if w is not None]
            if valid:
                break
        index = [-1 if w is None else w[1] if w[0] == "dev" else len(enc) + w[1] for w in where]
        slot_image = [index[j] for j in fill_slots(valid, len(batch))]
        stats.add("samples", self.batch_size)
        return {
            "batch": k,
            "enc": _shared_flat(enc, sum(len(e) for e in enc), in_worker),
            "enc_sizes": [len(e) for e in enc],
            "enc_hw": enc_hw,
            "pix": _shared_flat(pix, sum(p.numel() for p in pix), in_worker),
            "pix_hw": [tuple(p.shape[-2:]) for p in pix],
            "slot_image": slot_image,
            "stats": stats.pop_delta(),
        }
