"""Loaders: two-view SSL batches from WebDataset shards, and deterministic labelled batches for evaluation.

SSL loader (:func:`make_ssl_loader`)
    Each rank reads its own endless, shuffled stream of shards and yields ``len(loader)`` =
    ``epoch_samples // (world_size * batch_size)`` batches of two augmented views per epoch (order, resume and
    bad-data rules: :mod:`smi_timm.data.stream`). Two paths give the same distribution of views:

    * **CPU path**: loader workers decode and augment (:class:`~smi_timm.data.pipeline.CPUTwoView`) and hand over
      uint8 views; the training process normalises them on the target device.
    * **Accelerator path** (the default when ``device`` is CUDA): workers only read shards, check the bytes and hand
      over the encoded JPEGs (pinned); the training process decodes the batch with nvJPEG and augments it with batched
      tensor ops (:class:`~smi_timm.data.pipeline.DeviceTwoView`), one batch ahead on a side stream
      (:class:`~smi_timm.data.feed.Prefetcher`), without synchronising with the host.

Eval loader (:func:`make_eval_loader`)
    Shards are split by rank, then by worker (never more workers than shards), read in order, each sample exactly
    once. An ImageFolder directory is accepted too. Shards whose index marks them unlabeled are refused.

Both loaders count bad data (see :mod:`smi_timm.data.stats`); workers send their counts back with every batch, and
``loader.stats()`` returns the totals of this process. Workers never outlive their iterator: see
:mod:`smi_timm.data.workers`.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError
from .augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    EvalTransform,
    batch_seed,
    get_augment_config,
)
from .feed import DeviceStage, Prefetcher
from .pipeline import DeviceTwoView, FinishUint8
from .reading import LabelRule, decode_image, sample_image_bytes, sample_label
from .sources import DataSpec, Source, open_data
from .stats import DataStats, merge
from .stream import SSLStream, StreamOptions, single_thread
from .workers import WorkerPool, check_worker, keep_freed_memory

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SSLLoader",
    "SSLLoaderOptions",
    "EvalLoader",
    "EvalLoaderOptions",
    "UnknownLengthError",
    "make_ssl_loader",
    "make_eval_loader",
    "default_num_workers",
    "DEFAULT_SHUFFLE_BUFFER",
]

log = logging.getLogger(__name__)

#: samples in each worker's shuffle buffer (encoded bytes), unless the data is smaller
DEFAULT_SHUFFLE_BUFFER = 2000

#: Upper bound of :func:`default_num_workers` on the CPU path (beyond it, file handles and shared memory grow for
#: little gain) and its value on the accelerator path.
MAX_CPU_WORKERS = 32
DEVICE_PATH_WORKERS = 3


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_num_workers(world_size: int = 1, path: str = "cpu") -> int:
    """Loader worker processes per rank for the cores this process may use (its affinity mask), shared by
    ``world_size`` ranks on the machine, one core per rank kept for the training process.

    ``path="cpu"`` (workers decode and augment): every other core of the rank, at most :data:`MAX_CPU_WORKERS`.
    ``path="device"`` (workers only read shards and check bytes; the accelerator decodes and augments): at most
    :data:`DEVICE_PATH_WORKERS` = 3. One worker reads and checks ~20,000 samples/s (tar parsing and a JPEG header
    walk, ~50 us per sample), enough for 10,000 two-view samples/s; a second one decodes on the CPU the few images the
    device decoder does not take (grayscale, CMYK, progressive and oversized JPEGs, other formats: a few percent of
    ImageNet at ~5 ms each), and a third keeps up while another waits for I/O. ``0`` means loading in this process.
    """
    per_rank = _cpu_count() // max(1, int(world_size))
    cap = DEVICE_PATH_WORKERS if path == "device" else MAX_CPU_WORKERS
    return max(0, min(cap, per_rank - 1))


def _dist_rank_world(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


class UnknownLengthError(DataError, TypeError):
    """``len()`` of a loader whose data has no known size (a ``TypeError`` too, as ``len()`` expects)."""


class _LoaderBase:
    """Counters, explicit shutdown and context-manager use, common to both loaders."""

    _stats: DataStats

    def _init_base(self, stats: DataStats) -> None:
        self._stats = stats
        self._iterators: "weakref.WeakSet" = weakref.WeakSet()

    def stats(self) -> Dict[str, int]:
        """Counters of bad / converted data and of shards and samples read, summed over workers (this process only;
        sum over ranks with :func:`smi_timm.data.stats.merge` or an all-reduce)."""
        return self._stats.as_dict()

    def reset_stats(self) -> None:
        self._stats.reset()

    def _track(self, gen):
        self._iterators.add(gen)
        return gen

    def close(self) -> None:
        """Stop every running iteration of this loader now: worker processes and background threads exit. The loader
        stays usable (the next ``iter()`` starts new workers). Iterators also stop themselves when exhausted, on any
        exception, and when garbage-collected."""
        for gen in list(self._iterators):
            gen.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        """The options' fields read as the loader's own (``loader.batch_size``, ``loader.num_workers``, ...)."""
        options = self.__dict__.get("options")
        if options is None or name.startswith("_") or not hasattr(options, name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(options, name)


# ---------------------------------------------------------------------------------------------------------------------
# SSL loader
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SSLLoaderOptions:
    """Everything an :class:`SSLLoader` needs besides its source (frozen and keyword-built: a misspelt or swapped
    setting fails at once). :func:`make_ssl_loader` fills the defaults."""

    batch_size: int
    image_size: int
    augment: AugmentConfig
    num_workers: int
    seed: int
    rank: int
    world_size: int
    epoch_samples: int
    shuffle_buffer: int
    backend: str
    device: torch.device
    path: str                       #: "cpu" (workers augment) or "device" (the device decodes and augments)
    out_dtype: torch.dtype
    channels_last: bool
    pin_memory: bool
    prefetch_factor: int
    multiprocessing_context: Any
    max_decode_side: Optional[int]
    prefetch_batches: int
    prefetch_thread: bool
    crop_chunks: int

    @property
    def batches_per_epoch(self) -> int:
        return self.epoch_samples // (self.world_size * self.batch_size)


class SSLLoader(_LoaderBase):
    """Iterable of ``(view_a, view_b)`` tensors of shape (batch_size, 3, image_size, image_size) on ``device``.

    ``len(loader)`` is the number of batches per epoch on this rank (the same on every rank). Each ``iter()`` is one
    epoch; the epoch number (which changes the unit order and the random streams) counts up by itself, or set it
    with :meth:`set_epoch`, which can also start the epoch at a later batch (resume). The options
    (:class:`SSLLoaderOptions`) read as attributes: ``loader.augment`` is the
    :class:`~smi_timm.data.augment.AugmentConfig` (its ``mean`` / ``std`` normalise the views), ``loader.path`` is
    ``"cpu"`` or ``"device"``. Create it with :func:`make_ssl_loader`.
    """

    def __init__(self, source: Source, options: SSLLoaderOptions, stats: DataStats):
        self.source = source
        self.options = options
        self._init_base(stats)
        self._stage_stats = DataStats()  # written only by the device stage (its own thread on CUDA)
        self._next_epoch = 0
        self._next_start = 0
        self._pipeline: Optional[DeviceTwoView] = None
        self._finish: Optional[FinishUint8] = None

    def stats(self) -> Dict[str, int]:
        return merge([self._stats.as_dict(), self._stage_stats.as_dict()])

    stats.__doc__ = _LoaderBase.stats.__doc__

    def reset_stats(self) -> None:
        self._stats.reset()
        self._stage_stats.reset()

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter()`` will run."""
        return self._next_epoch

    @property
    def start_batch(self) -> int:
        """The batch the next ``iter()`` starts at (0 unless :meth:`set_epoch` said otherwise)."""
        return self._next_start

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next ``iter()`` run epoch ``epoch`` from batch ``start_batch`` on: it yields
        ``len(loader) - start_batch`` batches, exactly those an uninterrupted run of that epoch yields from there on.
        The consumed part is skipped at the sample level (its bytes are read and checked, not decoded or augmented).
        Exact for the same seed, rank, world size and ``num_workers``."""
        if not 0 <= int(start_batch) <= self.options.batches_per_epoch:
            raise DataError(f"start_batch must be in [0, {self.options.batches_per_epoch}], got {start_batch}")
        self._next_epoch = int(epoch)
        self._next_start = int(start_batch)

    def __len__(self) -> int:
        return self.options.batches_per_epoch

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._next_epoch, self._next_start
        self._next_epoch, self._next_start = epoch + 1, 0
        return self._track(self._run(epoch, start))

    def _stage(self, epoch: int):
        o = self.options
        if o.path == "device":
            if self._pipeline is None:
                self._pipeline = DeviceTwoView(o.augment, o.image_size, o.device, o.out_dtype, o.channels_last,
                                               o.crop_chunks)
            seed, rank = o.seed, o.rank
            return DeviceStage(self._pipeline, lambda k: batch_seed(seed, epoch, rank, k), self._stage_stats)
        if self._finish is None:
            self._finish = FinishUint8(o.augment, o.device, o.out_dtype, o.channels_last)
            if self._finish.device.type == "cpu":  # batches normalised here: reuse their memory, as workers do
                keep_freed_memory()
        finish = self._finish
        return lambda item: finish(item.views)

    def _stream(self, epoch: int, start: int) -> SSLStream:
        o = self.options
        return SSLStream(self.source, StreamOptions(
            batch_size=o.batch_size, batches=o.batches_per_epoch, augment=o.augment, image_size=o.image_size,
            seed=o.seed, rank=o.rank, world_size=o.world_size, shuffle_buffer=o.shuffle_buffer,
            mode="raw" if o.path == "device" else "augment", backend=o.backend, max_side=o.max_decode_side),
            epoch, start)

    def _run(self, epoch: int, start: int):
        o = self.options
        if start >= o.batches_per_epoch:
            return
        pool = WorkerPool(self._stream(epoch, start), o.num_workers, o.pin_memory, o.prefetch_factor,
                          o.multiprocessing_context)
        feeder = None
        try:
            feeder = Prefetcher(pool, self._stage(epoch), o.device, o.prefetch_batches, o.prefetch_thread,
                                on_item=lambda item: self._stats.update(item.stats))
            yield from feeder
        finally:
            if feeder is not None:
                feeder.close()
            pool.close()

    def __repr__(self) -> str:
        o = self.options
        return (f"SSLLoader(units={len(self.source.units)}, kind={self.source.kind!r}, batch_size={o.batch_size}, "
                f"image_size={o.image_size}, augment={o.augment.name!r}, batches_per_epoch={o.batches_per_epoch}, "
                f"rank={o.rank}/{o.world_size}, num_workers={o.num_workers}, path={o.path!r}, "
                f"device={str(o.device)!r})")


def _epoch_samples(source: Source, epoch_samples: Optional[int], batch_size: int, world_size: int,
                   run_batches: Optional[int]) -> int:
    """Samples per epoch over all ranks: ``epoch_samples`` when given, else the source's size, else (a stream of
    unknown length) ``run_batches`` batches per rank."""
    if epoch_samples is None:
        epoch_samples = source.num_samples
    if epoch_samples is None and run_batches:
        epoch_samples = int(run_batches) * world_size * batch_size
        log.info(f"the data's size is unknown ({source.how}): one epoch is the whole run, {run_batches} batches "
                 f"per rank")
    if epoch_samples is None:
        raise DataError(
            f"epoch length unknown: {source.how}; give the samples per epoch over all ranks, e.g. the dataset size "
            f"(--epoch-samples N on the command line, epoch_samples=N in Python), or the run's length in steps "
            f"(--max-steps N)")
    epoch_samples = int(epoch_samples)
    if epoch_samples // (world_size * batch_size) < 1:
        raise DataError(f"epoch of {epoch_samples} samples is shorter than one batch of {batch_size} per rank "
                        f"on {world_size} rank(s): use a smaller --batch-size, or more data")
    return epoch_samples


def _explain_epoch(source: Source, o: SSLLoaderOptions) -> None:
    """Log (rank 0) what the loader reads, the epoch plan, and what an epoch leaves out or repeats."""
    if o.rank != 0:
        return
    log.info(f"training data: {source.describe()}")
    used = o.batches_per_epoch * o.batch_size * o.world_size
    left = o.epoch_samples - used
    log.info(f"epoch: {o.batches_per_epoch} batch(es) of {o.batch_size} per rank x {o.world_size} rank(s) = {used} "
             f"of {o.epoch_samples} samples" + (f" ({left} left out of each epoch, a different {left} every epoch)"
                                                if left > 0 else ""))
    if source.counts is not None:
        slots = o.world_size * max(1, o.num_workers)
        share = source.num_samples / slots if len(source.units) >= slots else source.num_samples / o.world_size
        if 0 < share < o.batch_size:
            log.warning(f"each loader worker reads about {share:.0f} images per pass, fewer than a batch of "
                        f"{o.batch_size}: its batches will hold an image twice; use fewer workers (--workers) or a "
                        f"smaller batch")


def _resolve_path(augment_on: str, device: torch.device, backend: str) -> str:
    if augment_on not in ("auto", "cpu", "device"):
        raise DataError(f"augment_on must be 'auto', 'cpu' or 'device', got {augment_on!r}")
    if backend not in ("batched", "v2"):
        raise DataError(f"unknown augmentation backend {backend!r}; use 'batched' or 'v2'")
    if backend == "v2":
        if augment_on == "device":
            raise DataError("backend='v2' (per-sample torchvision transforms) runs in the CPU workers; "
                            "use augment_on='cpu' or 'auto' with it")
        return "cpu"
    if augment_on == "auto":
        return "device" if device.type == "cuda" else "cpu"
    return augment_on


def make_ssl_loader(
    urls: DataSpec,
    batch_size: int,
    image_size: int,
    augment: Union[str, AugmentConfig] = "byol",
    num_workers: Optional[int] = None,
    seed: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    epoch_samples: Optional[int] = None,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    backend: str = "batched",
    device: Union[None, str, torch.device] = None,
    augment_on: str = "auto",
    out_dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    pin_memory: Optional[bool] = None,
    prefetch_factor: int = 2,
    multiprocessing_context=None,
    max_decode_side: Optional[int] = None,
    prefetch_batches: int = 2,
    prefetch_thread: Optional[bool] = None,
    crop_chunks: int = 4,
    run_batches: Optional[int] = None,
) -> SSLLoader:
    """Loader of two augmented views per image for self-supervised pretraining.

    Args:
        urls: the data (:func:`smi_timm.data.sources.open_data`): shards (a path, brace pattern
            ``train-{000000..000009}.tar``, glob ``train-*.tar.gz``, ``pipe:`` URL), a folder of shards or of images,
            ``@list.txt`` (one shard or image per line), ``sample`` / ``sample:train`` / ``sample:test`` (the bundled
            CIFAR-10 sample), or a list of these; or an already opened :class:`~smi_timm.data.sources.Source`.
        batch_size: samples per batch (per rank).
        image_size: output side length; any size works whatever the stored image size.
        augment: ``"byol"`` (= ``"barlow"``), ``"cifar"`` (32x32 data: crop scale (0.2, 1), no blur) or an
            :class:`~smi_timm.data.augment.AugmentConfig`.
        num_workers: loader worker processes (default: :func:`default_num_workers` for the path); 0 = in this
            process.
        seed: base seed; shard order, shuffling and augmentation differ per (seed, epoch, rank, batch).
        rank, world_size: this process's place among data-parallel processes. Default: from an initialised
            ``torch.distributed`` process group, else 0 and 1. Pass them explicitly when you can.
        epoch_samples: samples per epoch over all ranks. Default: the data's size (from the metadata next to the
            shards, see :mod:`smi_timm.data.sources.shards`, or the number of image files).
        shuffle_buffer: size of the per-worker sample shuffle buffer (raw bytes are buffered, not decoded images);
            never more than a worker's share of one pass over known-size data, and emptied at the end of each pass,
            so that it never holds two copies of a sample.
        backend: ``"batched"`` (default) or ``"v2"`` (per-sample ``torchvision.transforms.v2``, CPU path only: the
            reference implementation, ~3x slower).
        device: where batches are delivered (default: the CPU).
        augment_on: ``"auto"`` (on the accelerator when ``device`` is CUDA, else in the CPU workers), ``"cpu"``
            (workers decode and augment; batches are still delivered on ``device``, through pinned memory and
            non-blocking copies) or ``"device"`` (workers only read shards; decode and augmentation run on ``device``
            in this process; with a CPU device, on CPU tensors).
        out_dtype: dtype of the views (``torch.float32`` or ``torch.bfloat16``).
        channels_last: deliver the views in channels-last memory format.
        pin_memory: pin worker output (default: when ``device`` is CUDA).
        prefetch_factor, multiprocessing_context: passed to :class:`torch.utils.data.DataLoader`.
        max_decode_side: images whose longer side exceeds it are decoded at a reduced size (JPEG DCT scaling, long
            side between half of it and it). Default ``max(1024, 4 * image_size)``; 0 = never.
        prefetch_batches: batches prepared ahead by the last (training-process) stage.
        prefetch_thread: run that stage in a background thread (default: when ``device`` is CUDA, on a side stream).
        crop_chunks: accelerator path: size-sorted chunks of the batched crop (more = less padding memory).
        run_batches: data of unknown size (a ``pipe:`` stream without metadata) and no ``epoch_samples``: one epoch
            is this many batches per rank (the training loop passes its ``--max-steps``).

    Raises:
        DataError (a ``ValueError``): no data, unknown preset, an epoch shorter than one batch per rank, or an
            unknown epoch length without ``epoch_samples`` / ``run_batches``.
        NotFoundError (a ``FileNotFoundError``): a pattern that matches nothing, or only missing shard files.
    """
    if batch_size < 1 or image_size < 1:
        raise DataError(f"batch_size and image_size must be positive, got {batch_size}, {image_size}")
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise DataError(f"out_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {out_dtype}")
    cfg = get_augment_config(augment)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    path = _resolve_path(augment_on, dev, backend)
    rank, world_size = _dist_rank_world(rank, world_size)
    if shuffle_buffer < 0:
        raise DataError(f"shuffle_buffer must be >= 0 samples, got {shuffle_buffer}")
    stats = DataStats()
    source = urls if isinstance(urls, Source) else open_data(urls, stats)
    epoch_samples = _epoch_samples(source, epoch_samples, batch_size, world_size, run_batches)
    if num_workers is None:
        num_workers = default_num_workers(world_size, path)
    if max_decode_side is None:
        max_decode_side = max(1024, 4 * int(image_size))
    cuda = dev.type == "cuda"
    options = SSLLoaderOptions(
        batch_size=int(batch_size), image_size=int(image_size), augment=cfg, num_workers=int(num_workers),
        seed=int(seed), rank=rank, world_size=world_size, epoch_samples=epoch_samples,
        shuffle_buffer=int(shuffle_buffer), backend=backend, device=dev, path=path, out_dtype=out_dtype,
        channels_last=bool(channels_last), pin_memory=cuda if pin_memory is None else bool(pin_memory),
        prefetch_factor=prefetch_factor, multiprocessing_context=multiprocessing_context,
        max_decode_side=int(max_decode_side) or None, prefetch_batches=int(prefetch_batches),
        prefetch_thread=cuda if prefetch_thread is None else bool(prefetch_thread), crop_chunks=int(crop_chunks))
    _explain_epoch(source, options)
    return SSLLoader(source, options, stats)


# ---------------------------------------------------------------------------------------------------------------------
# Eval loader
# ---------------------------------------------------------------------------------------------------------------------


class _EvalStream(IterableDataset):
    """The eval loader's samples: this rank's units, split between workers, read in order, each sample once."""

    def __init__(self, source: Source, batch_size: int, transform: EvalTransform, label: LabelRule):
        super().__init__()
        self.source = source
        self.batch_size = batch_size
        self.transform = transform
        self.label = label

    def _batch(self, images, labels, stats):
        stats.add("samples", len(images))
        return torch.stack(images), torch.tensor(labels, dtype=torch.long), stats.pop_delta()

    def __iter__(self):
        info = get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        stats = DataStats()
        images: List[torch.Tensor] = []
        labels: List[int] = []
        for unit in self.source.units[worker::nworkers]:
            for sample in self.source.read(unit, stats):
                check_worker()
                stats.add("read")
                data = sample_image_bytes(sample, stats)
                label = None if data is None else sample_label(sample, stats, self.label)
                img = None if label is None else decode_image(data, stats)
                if img is None:
                    continue
                with single_thread(info is None):
                    images.append(self.transform(img))
                labels.append(label)
                if len(images) == self.batch_size:
                    yield self._batch(images, labels, stats)
                    images, labels = [], []
        if images:
            yield self._batch(images, labels, stats)
        delta = stats.pop_delta()
        if delta:
            yield None, None, delta


@dataclass(frozen=True)
class EvalLoaderOptions:
    """Everything an :class:`EvalLoader` needs besides its source (frozen, keyword-built)."""

    batch_size: int
    image_size: int
    num_workers: int
    num_samples: Optional[int]       #: this rank's samples, when known
    num_batches: Optional[int]
    classes: Optional[List[str]]
    label: LabelRule
    pin_memory: bool
    prefetch_factor: int
    multiprocessing_context: Any


class EvalLoader(_LoaderBase):
    """Iterable of ``(images, labels)``: float (B, 3, S, S) and int64 (B,). Reads every sample once, in order.

    ``len(loader)`` is the number of batches when the sample counts are known (with several workers each worker's
    last batch may be partial). ``num_samples`` and ``classes`` are ``None`` when unknown. Samples without a usable
    label or image are counted (``stats()``: ``read``, ``samples`` used, ``missing_label``, ``bad_label``,
    ``missing_image``, ``undecodable``); an iteration that finds no usable label at all raises, naming where it looked.
    Create it with :func:`make_eval_loader`.
    """

    def __init__(self, source: Source, dataset: _EvalStream, options: EvalLoaderOptions, stats: DataStats):
        self.source = source
        self.dataset = dataset
        self.options = options
        self._init_base(stats)

    def __len__(self) -> int:
        if self.options.num_batches is None:
            raise UnknownLengthError(f"length unknown: {self.source.how}")
        return self.options.num_batches

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return self._track(self._run())

    def _run(self):
        o = self.options
        pool = WorkerPool(self.dataset, o.num_workers, o.pin_memory, o.prefetch_factor, o.multiprocessing_context)
        labelled = 0
        try:
            for images, labels, delta in pool:
                self._stats.update(delta)
                if images is not None:
                    labelled += len(labels)
                    yield images, labels
        finally:
            pool.close()
        if labelled == 0 and self._stats["missing_label"] + self._stats["bad_label"] > 0:
            raise DataError(_no_label_message(self._stats, o.label))

    def __repr__(self) -> str:
        o = self.options
        return (f"EvalLoader(kind={self.source.kind!r}, units={len(self.source.units)}, num_samples={o.num_samples}, "
                f"batch_size={o.batch_size}, image_size={o.image_size}, num_workers={o.num_workers})")


def _no_label_message(stats: DataStats, label: LabelRule) -> str:
    missing, bad = stats["missing_label"], stats["bad_label"]
    return (f"no usable label: the evaluation looked for {label.describe()} and found it missing in {missing} and "
            f"not a class index in {bad} of the {stats['read']} samples read. Labels are read from 'cls' (an "
            f"integer), from a field of the sample's 'json' (--label-key NAME), or as class names listed in a "
            f"classes.txt next to the data (line i = class i); shards written by smi-make-shards from a folder with "
            f"one sub-folder per class have them")


def _label_rule(source: Source, label_key: Optional[str], classes_file: Optional[str]) -> LabelRule:
    """Where labels are read: ``label_key`` (default ``cls``), class names from ``classes_file`` or the source."""
    classes = tuple(source.classes) if source.classes else None
    if classes_file is not None:
        if not os.path.isfile(classes_file):
            raise DataError(f"classes file {classes_file!r} does not exist (one class name per line, line i = "
                            f"class i)")
        with open(classes_file, "r", encoding="utf-8") as f:
            classes = tuple(line.strip() for line in f if line.strip())
    return LabelRule(label_key or "cls", classes)


def make_eval_loader(
    urls: Union[DataSpec, Source],
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
    label_key: Optional[str] = None,
    classes_file: Optional[str] = None,
) -> EvalLoader:
    """Deterministic loader of labelled ``(images, labels)`` batches for kNN / linear evaluation.

    Args:
        urls: labelled data, in any form :func:`smi_timm.data.sources.open_data` takes (shards, ``sample:test``, a
            folder with one sub-folder per class, ``@list.txt``), or an opened source.
        batch_size: samples per batch.
        image_size: output side length. Images are resized (shorter side to ``image_size / crop_pct``, bicubic,
            antialiased), centre-cropped and normalised.
        num_workers: worker processes (default :func:`default_num_workers`); never more than there are units.
        crop_pct: centre-crop fraction; default 0.875 from 128 px up, 1.0 below (CIFAR-sized images).
        rank, world_size: split the units between processes; default: a single process sees all.
        label_key: read labels from this field of each sample's ``json`` entry instead of ``cls``.
        classes_file: class names, one per line (line i = class i), for labels given as names; default: the
            source's (our shard index, a ``classes.txt`` next to the shards, or the class folders).

    Raises:
        DataError / NotFoundError: no data, a pattern that matches nothing, only missing shards, a folder without
            images, or data whose index marks it unlabeled (also raised at the end of an iteration that found no
            usable label, naming where it looked).
    """
    if batch_size < 1 or image_size < 1:
        raise DataError(f"batch_size and image_size must be positive, got {batch_size}, {image_size}")
    rank, world_size = _dist_rank_world(rank, world_size)
    transform = EvalTransform(image_size, crop_pct, mean, std)
    stats = DataStats()
    if num_workers is None:
        num_workers = default_num_workers(1)
    source = urls if isinstance(urls, Source) else open_data(urls, stats)
    if source.labeled is False:
        raise DataError(
            f"the evaluation data is unlabeled ({source.how}): evaluation needs labels; use it for pretraining "
            f"(smi-pretrain), and evaluate on labelled data: a folder with one sub-folder per class, or shards "
            f"written from one (smi-make-shards DIR OUT/val-%06d.tar)")
    mine = source.subset(source.units[rank::world_size])
    if not mine.units:
        warnings.warn(f"rank {rank} of {world_size} gets none of the {len(source.units)} unit(s)", stacklevel=2)
    nworkers = min(int(num_workers), len(mine.units))
    num_samples = num_batches = None
    if mine.counts is not None:
        num_samples = mine.num_samples
        groups = [mine.counts[w::max(1, nworkers)] for w in range(max(1, nworkers))]
        num_batches = sum(math.ceil(sum(g) / batch_size) for g in groups)
    label = _label_rule(source, label_key, classes_file)
    options = EvalLoaderOptions(batch_size=int(batch_size), image_size=int(image_size), num_workers=nworkers,
                                num_samples=num_samples, num_batches=num_batches,
                                classes=list(source.classes) if source.classes else None, label=label,
                                pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                                multiprocessing_context=multiprocessing_context)
    return EvalLoader(source, _EvalStream(mine, batch_size, transform, label), options, stats)
