"""Loaders: two-view SSL batches from WebDataset shards, and deterministic labelled batches for evaluation.

SSL loader (:func:`make_ssl_loader`)
    Every (rank, worker) pair reads an endless stream of shards: the shard list is shuffled once per (seed, epoch,
    cycle) identically on every rank, and slot ``rank * num_workers + worker`` takes every
    ``world_size * num_workers``-th shard of the concatenated permutations (so within a cycle the slots read disjoint
    shards, and nobody runs dry when the shard count does not divide evenly). Samples go through a shuffle buffer,
    are decoded and augmented in batches, and each worker stops after its share of the epoch
    (``len(loader)`` = ``epoch_samples // (world_size * batch_size)`` batches per rank, spread over the workers).
    This is webdataset's "resampled shards + ``with_epoch``" scheme, with rank and worker split explicitly.

Eval loader (:func:`make_eval_loader`)
    Shards are split by rank, then by worker (never more workers than shards), read in order, each sample exactly
    once. An ImageFolder directory is accepted too.

Both loaders count bad data (see :mod:`smi_timm.data.stats`); workers send their counts back with every batch, and
``loader.stats()`` returns the totals of this process.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    EvalTransform,
    get_augment_config,
    make_two_view_augment,
)
from .reading import (
    UrlSpec,
    check_local_shards,
    decode_image,
    expand_urls,
    find_index,
    iter_shard,
    sample_image_bytes,
    sample_label,
)
from .stats import DataStats

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SSLLoader",
    "EvalLoader",
    "make_ssl_loader",
    "make_eval_loader",
    "default_num_workers",
]


def _mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, rank, worker, ...)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


@contextlib.contextmanager
def _single_thread(active: bool = True):
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


def default_num_workers(world_size: int = 1) -> int:
    """CPU cores per rank minus one (for the training process), at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus // max(1, world_size) - 1))


def _dist_rank_world(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    if rank is not None and world_size is not None:
        pass
    else:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


def _resolve_shards(urls: UrlSpec, stats: DataStats) -> List[str]:
    if isinstance(urls, (str, os.PathLike)) and os.path.isdir(os.fspath(urls)):
        raise ValueError(
            f"{os.fspath(urls)!r} is a directory; pass shard files or a pattern such as 'DIR/train-*.tar' "
            "(write shards from an image folder with `smi-make-shards`)"
        )
    return check_local_shards(expand_urls(urls), stats)


class _Prefetchable:
    """Common parts of the two loaders."""

    num_workers: int
    _stats: DataStats

    def stats(self) -> Dict[str, int]:
        """Counters of bad / converted data and of shards and samples read, summed over workers (this process only;
        sum over ranks with :func:`smi_timm.data.stats.merge` or an all-reduce)."""
        return self._stats.as_dict()

    def reset_stats(self) -> None:
        self._stats.reset()

    def _dataloader(self, dataset, num_workers: int, **kw) -> DataLoader:
        extra = {}
        if num_workers > 0:
            extra["prefetch_factor"] = self.prefetch_factor
            extra["worker_init_fn"] = _ignore_stop_signals
            if self.multiprocessing_context is not None:
                extra["multiprocessing_context"] = self.multiprocessing_context
        return DataLoader(dataset, num_workers=num_workers, pin_memory=self.pin_memory, **extra, **kw)


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers ignore Ctrl-C / SIGTERM sent to the whole process group: the main process decides when to stop
    (the training loop saves a checkpoint first) and shuts the workers down; they also exit if it dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------------------------------
# SSL loader
# ---------------------------------------------------------------------------------------------------------------------


class _SSLStream(IterableDataset):
    def __init__(self, urls: List[str], batch_size: int, batches_per_rank: int, augment, seed: int, rank: int,
                 world_size: int, shuffle_buffer: int, epoch: int, backend: str):
        super().__init__()
        self.urls = urls
        self.batch_size = batch_size
        self.batches_per_rank = batches_per_rank
        self.augment = augment
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.epoch = epoch
        self.backend = backend

    # -- shard and sample streams ---------------------------------------------------------------------------------
    def _shards(self, slot: int, nslots: int) -> Iterator[str]:
        n = len(self.urls)
        cycle, perm = -1, None
        g = slot
        while True:
            c, pos = divmod(g, n)
            if c != cycle:
                cycle = c
                perm = list(range(n))
                random.Random(_mix_seed(self.seed, self.epoch, cycle, 0x5EED)).shuffle(perm)
            yield self.urls[perm[pos]]
            g += nslots

    def _samples(self, shards: Iterator[str], stats: DataStats) -> Iterator[bytes]:
        limit = 2 * len(self.urls) + 2
        empty = 0
        for url in shards:
            got = False
            for sample in iter_shard(url, stats):
                data = sample_image_bytes(sample, stats)
                if data is None:
                    continue
                got = True
                yield data
            empty = 0 if got else empty + 1
            if empty > limit:
                raise RuntimeError(f"SSL loader: {empty} shards in a row gave no sample with an image; "
                                   f"are the shards valid? counters: {stats!r}")

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

    # -- iteration -----------------------------------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        quota = self.batches_per_rank // nworkers + (1 if worker < self.batches_per_rank % nworkers else 0)
        if quota == 0:
            return
        stats = DataStats()
        seed = _mix_seed(self.seed, self.epoch, self.rank, worker, 0xA116)
        gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        slot, nslots = self.rank * nworkers + worker, self.world_size * nworkers
        stream = self._shuffled(self._samples(self._shards(slot, nslots), stats), self.shuffle_buffer, rng)
        bad_limit = 10_000 + 2 * self.shuffle_buffer
        bad_run = 0
        images: List[torch.Tensor] = []
        produced = 0
        try:
            for data in stream:
                img = decode_image(data, stats)
                if img is None:
                    bad_run += 1
                    if bad_run > bad_limit:
                        raise RuntimeError(f"SSL loader: {bad_run} undecodable samples in a row; counters: {stats!r}")
                    continue
                bad_run = 0
                images.append(img)
                if len(images) < self.batch_size:
                    continue
                with _single_thread(info is None):
                    if self.backend == "v2":  # per-sample v2 transforms draw from torch's global generator
                        with torch.random.fork_rng(devices=[]):
                            torch.manual_seed(_mix_seed(seed, produced))
                            a, b = self.augment(images)
                    else:
                        a, b = self.augment(images, gen)
                images = []
                produced += 1
                stats.add("samples", self.batch_size)
                yield a, b, stats.pop_delta()
                if produced >= quota:
                    break
        finally:
            stream.close()


class SSLLoader(_Prefetchable):
    """Iterable of ``(view_a, view_b)`` float tensors of shape (batch_size, 3, image_size, image_size).

    ``len(loader)`` is the number of batches per epoch on this rank (the same on every rank). Each ``iter()`` is one
    epoch; the epoch number (which changes the shard order and the random streams) counts up by itself, or set it
    with :meth:`set_epoch`. Create it with :func:`make_ssl_loader`.
    """

    def __init__(self, urls: List[str], batch_size: int, image_size: int, augment: AugmentConfig, num_workers: int,
                 seed: int, rank: int, world_size: int, epoch_samples: int, shuffle_buffer: int, backend: str,
                 pin_memory: bool, prefetch_factor: int, multiprocessing_context, stats: DataStats):
        self.urls = urls
        self.batch_size = batch_size
        self.image_size = image_size
        self.augment = augment
        self.num_workers = num_workers
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch_samples = epoch_samples
        self.shuffle_buffer = shuffle_buffer
        self.backend = backend
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self._stats = stats
        self.batches_per_epoch = epoch_samples // (world_size * batch_size)
        self._transform = make_two_view_augment(augment, image_size, backend)
        self._next_epoch = 0

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter()`` will run."""
        return self._next_epoch

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._next_epoch
        self._next_epoch += 1
        stream = _SSLStream(self.urls, self.batch_size, self.batches_per_epoch, self._transform, self.seed, self.rank,
                            self.world_size, self.shuffle_buffer, epoch, self.backend)
        for a, b, delta in self._dataloader(stream, self.num_workers, batch_size=None):
            self._stats.update(delta)
            yield a, b

    def __repr__(self) -> str:
        return (f"SSLLoader(shards={len(self.urls)}, batch_size={self.batch_size}, image_size={self.image_size}, "
                f"augment={self.augment.name!r}, batches_per_epoch={self.batches_per_epoch}, rank={self.rank}/"
                f"{self.world_size}, num_workers={self.num_workers})")


def make_ssl_loader(
    urls: UrlSpec,
    batch_size: int,
    image_size: int,
    augment: Union[str, AugmentConfig] = "byol",
    num_workers: Optional[int] = None,
    seed: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    epoch_samples: Optional[int] = None,
    shuffle_buffer: int = 2000,
    backend: str = "batched",
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    multiprocessing_context=None,
) -> SSLLoader:
    """Loader of two augmented views per image for self-supervised pretraining.

    Args:
        urls: shards: a path, brace pattern (``train-{000000..000009}.tar``), glob (``train-*.tar.gz``), ``pipe:``
            URL, or a list of these.
        batch_size: samples per batch (per rank).
        image_size: output side length; any size works whatever the stored image size.
        augment: ``"byol"`` (= ``"barlow"``), ``"cifar"`` (32x32 data: crop scale (0.2, 1), no blur) or an
            :class:`~smi_timm.data.augment.AugmentConfig`.
        num_workers: DataLoader worker processes (default: :func:`default_num_workers`); 0 = in this process.
        seed: base seed; shard order, shuffling and augmentation differ per (seed, epoch, rank, worker).
        rank, world_size: this process's place among data-parallel processes. Default: from an initialised
            ``torch.distributed`` process group, else 0 and 1. Pass them explicitly when you can.
        epoch_samples: samples per epoch over all ranks. Default: the sum of the shard sizes from the JSON index next to
            the shards (written by ``smi-make-shards``).
        shuffle_buffer: size of the per-worker sample shuffle buffer (raw bytes are buffered, not decoded images).
        backend: ``"batched"`` (fast batched tensor ops, default) or ``"v2"`` (per-sample torchvision.transforms.v2).
        pin_memory, prefetch_factor, multiprocessing_context: passed to :class:`torch.utils.data.DataLoader`.

    Raises:
        ValueError: empty shard list, unknown preset, or an epoch shorter than one batch per rank; or no
            ``epoch_samples`` and no index covering the shards.
        FileNotFoundError: a glob that matches nothing, or only missing shard files.
    """
    if batch_size < 1 or image_size < 1:
        raise ValueError(f"batch_size and image_size must be positive, got {batch_size}, {image_size}")
    cfg = get_augment_config(augment)
    rank, world_size = _dist_rank_world(rank, world_size)
    stats = DataStats()
    shards = _resolve_shards(urls, stats)
    if epoch_samples is None:
        counts, _ = find_index(shards)
        if counts is None:
            raise ValueError(
                "epoch length unknown: no JSON shard index (written by smi-make-shards) lists all of these shards; "
                "pass epoch_samples=<samples per epoch over all ranks>, e.g. the dataset size "
                "(smi_timm.data.count_samples(urls) counts them by reading the shards)"
            )
        epoch_samples = sum(counts.values())
    epoch_samples = int(epoch_samples)
    if epoch_samples // (world_size * batch_size) < 1:
        raise ValueError(f"epoch of {epoch_samples} samples is shorter than one batch of {batch_size} per rank "
                         f"on {world_size} rank(s)")
    if num_workers is None:
        num_workers = default_num_workers(world_size)
    if backend not in ("batched", "v2"):
        raise ValueError(f"unknown augmentation backend {backend!r}; use 'batched' or 'v2'")
    return SSLLoader(shards, batch_size, image_size, cfg, int(num_workers), int(seed), rank, world_size,
                     epoch_samples, int(shuffle_buffer), backend, pin_memory, prefetch_factor, multiprocessing_context,
                     stats)


# ---------------------------------------------------------------------------------------------------------------------
# Eval loader
# ---------------------------------------------------------------------------------------------------------------------


class _EvalStream(IterableDataset):
    def __init__(self, urls: List[str], batch_size: int, transform: EvalTransform):
        super().__init__()
        self.urls = urls
        self.batch_size = batch_size
        self.transform = transform

    def __iter__(self):
        info = get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        stats = DataStats()
        images: List[torch.Tensor] = []
        labels: List[int] = []
        for url in self.urls[worker::nworkers]:
            for sample in iter_shard(url, stats):
                data = sample_image_bytes(sample, stats)
                if data is None:
                    continue
                label = sample_label(sample, stats)
                if label is None:
                    continue
                img = decode_image(data, stats)
                if img is None:
                    continue
                with _single_thread(info is None):
                    images.append(self.transform(img))
                labels.append(label)
                if len(images) == self.batch_size:
                    stats.add("samples", len(images))
                    yield torch.stack(images), torch.tensor(labels, dtype=torch.long), stats.pop_delta()
                    images, labels = [], []
        if images:
            stats.add("samples", len(images))
            yield torch.stack(images), torch.tensor(labels, dtype=torch.long), stats.pop_delta()
        delta = stats.pop_delta()
        if delta:
            yield None, None, delta


class _FolderDataset(Dataset):
    """torchvision ImageFolder that decodes with :func:`decode_image` and reports counters per sample."""

    def __init__(self, root: str, transform: EvalTransform, rank: int, world_size: int):
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(root, loader=_read_bytes)
        self.indices = list(range(rank, len(self.folder.samples), world_size))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        path, label = self.folder.samples[self.indices[i]]
        stats = DataStats()
        try:
            data = _read_bytes(path)
        except OSError:
            data = b""
        img = decode_image(data, stats)
        if img is None:
            return None, label, stats.pop_delta()
        stats.add("samples")
        return self.transform(img), label, stats.pop_delta()


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _collate_folder(items):
    stats = DataStats()
    images, labels = [], []
    for img, label, delta in items:
        stats.update(delta)
        if img is not None:
            images.append(img)
            labels.append(label)
    if not images:
        return None, None, stats.pop_delta()
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), stats.pop_delta()


class EvalLoader(_Prefetchable):
    """Iterable of ``(images, labels)``: float (B, 3, S, S) and int64 (B,). Reads every sample once, in order.

    ``len(loader)`` is the number of batches when the sample counts are known (JSON index or ImageFolder); with
    several workers each worker's last batch may be partial. ``num_samples`` and ``classes`` are ``None`` when
    unknown. Create it with :func:`make_eval_loader`.
    """

    def __init__(self, source: str, dataset, num_workers: int, batch_size: int, image_size: int,
                 num_samples: Optional[int], num_batches: Optional[int], classes: Optional[List[str]],
                 pin_memory: bool, prefetch_factor: int, multiprocessing_context, stats: DataStats):
        self.source = source
        self.dataset = dataset
        self.num_workers = num_workers
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_samples = num_samples
        self.num_batches = num_batches
        self.classes = classes
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self._stats = stats

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("length unknown: no JSON shard index lists these shards")
        return self.num_batches

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self.source == "folder":
            dl = self._dataloader(self.dataset, self.num_workers, batch_size=self.batch_size, shuffle=False,
                                  collate_fn=_collate_folder)
        else:
            dl = self._dataloader(self.dataset, self.num_workers, batch_size=None)
        for images, labels, delta in dl:
            self._stats.update(delta)
            if images is not None:
                yield images, labels

    def __repr__(self) -> str:
        return (f"EvalLoader(source={self.source!r}, num_samples={self.num_samples}, batch_size={self.batch_size}, "
                f"image_size={self.image_size}, num_workers={self.num_workers})")


def make_eval_loader(
    urls: Union[UrlSpec, os.PathLike],
    batch_size: int,
    image_size: int,
    num_workers: Optional[int] = None,
    crop_pct: Optional[float] = None,
    rank: int = 0,
    world_size: int = 1,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    multiprocessing_context=None,
) -> EvalLoader:
    """Deterministic loader of labelled ``(images, labels)`` batches for kNN / linear evaluation.

    Args:
        urls: labelled shards (``jpg`` + ``cls``; same forms as :func:`make_ssl_loader`) or an ImageFolder directory.
        batch_size: samples per batch.
        image_size: output side length. Images are resized (shorter side to ``image_size / crop_pct``, bicubic,
            antialiased), centre-cropped and normalised.
        num_workers: worker processes (default :func:`default_num_workers`); never more than there are shards.
        crop_pct: centre-crop fraction; default 0.875 from 128 px up, 1.0 below (CIFAR-sized images).
        rank, world_size: split the shards (or folder images) between processes; default: a single process sees all.

    Raises:
        ValueError / FileNotFoundError: empty shard list, a pattern that matches nothing, only missing shards, or an
            ImageFolder without images.
    """
    if batch_size < 1 or image_size < 1:
        raise ValueError(f"batch_size and image_size must be positive, got {batch_size}, {image_size}")
    rank, world_size = _dist_rank_world(rank, world_size)
    transform = EvalTransform(image_size, crop_pct, mean, std)
    stats = DataStats()
    if num_workers is None:
        num_workers = default_num_workers(1)
    if isinstance(urls, (str, os.PathLike)) and os.path.isdir(os.fspath(urls)):
        ds = _FolderDataset(os.fspath(urls), transform, rank, world_size)
        n = len(ds)
        return EvalLoader("folder", ds, int(num_workers), batch_size, image_size, n, math.ceil(n / batch_size),
                          list(ds.folder.classes), pin_memory, prefetch_factor, multiprocessing_context, stats)
    shards = check_local_shards(expand_urls(urls), stats)
    counts, classes = find_index(shards)
    mine = shards[rank::world_size]
    if not mine:
        warnings.warn(f"rank {rank} of {world_size} gets none of the {len(shards)} shard(s)", stacklevel=2)
    nworkers = min(int(num_workers), len(mine))
    num_samples = num_batches = None
    if counts is not None:
        num_samples = sum(counts[u] for u in mine)
        groups = [mine[w::max(1, nworkers)] for w in range(max(1, nworkers))]
        num_batches = sum(math.ceil(sum(counts[u] for u in g) / batch_size) for g in groups)
    ds = _EvalStream(mine, batch_size, transform)
    return EvalLoader("shards", ds, nworkers, batch_size, image_size, num_samples, num_batches, classes, pin_memory,
                      prefetch_factor, multiprocessing_context, stats)
