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

import math
import os
import warnings
import weakref
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

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
from .reading import (
    UrlSpec,
    check_local_shards,
    decode_image,
    expand_urls,
    index_info,
    iter_shard,
    sample_image_bytes,
    sample_label,
)
from .stats import DataStats, merge
from .stream import SSLStream, single_thread
from .workers import WorkerPool, check_worker

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SSLLoader",
    "EvalLoader",
    "make_ssl_loader",
    "make_eval_loader",
    "default_num_workers",
]

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


def _resolve_shards(urls: UrlSpec, stats: DataStats) -> List[str]:
    if isinstance(urls, (str, os.PathLike)) and os.path.isdir(os.fspath(urls)):
        raise DataError(
            f"{os.fspath(urls)!r} is a directory; pass shard files or a pattern such as 'DIR/train-*.tar' "
            "(write shards from an image folder with `smi-make-shards`)"
        )
    return check_local_shards(expand_urls(urls), stats)



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


# ---------------------------------------------------------------------------------------------------------------------
# SSL loader
# ---------------------------------------------------------------------------------------------------------------------


class SSLLoader(_LoaderBase):
    """Iterable of ``(view_a, view_b)`` tensors of shape (batch_size, 3, image_size, image_size) on ``device``.

    ``len(loader)`` is the number of batches per epoch on this rank (the same on every rank). Each ``iter()`` is one
    epoch; the epoch number (which changes the shard order and the random streams) counts up by itself, or set it
    with :meth:`set_epoch`, which can also start the epoch at a later batch (resume). ``augment`` is the
    :class:`~smi_timm.data.augment.AugmentConfig` (its ``mean`` / ``std`` normalise the views); ``path`` is
    ``"cpu"`` or ``"device"``. Create it with :func:`make_ssl_loader`.
    """

    def __init__(self, urls: List[str], batch_size: int, image_size: int, augment: AugmentConfig, num_workers: int,
                 seed: int, rank: int, world_size: int, epoch_samples: int, shuffle_buffer: int, backend: str,
                 device: torch.device, path: str, out_dtype: torch.dtype, channels_last: bool, pin_memory: bool,
                 prefetch_factor: int, multiprocessing_context, max_decode_side: Optional[int],
                 prefetch_batches: int, prefetch_thread: bool, crop_chunks: int, stats: DataStats):
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
        self.device = device
        self.path = path
        self.out_dtype = out_dtype
        self.channels_last = channels_last
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.max_decode_side = max_decode_side
        self.prefetch_batches = prefetch_batches
        self.prefetch_thread = prefetch_thread
        self.crop_chunks = crop_chunks
        self.batches_per_epoch = epoch_samples // (world_size * batch_size)
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
        if not 0 <= int(start_batch) <= self.batches_per_epoch:
            raise DataError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        self._next_epoch = int(epoch)
        self._next_start = int(start_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._next_epoch, self._next_start
        self._next_epoch, self._next_start = epoch + 1, 0
        return self._track(self._run(epoch, start))

    def _stage(self, epoch: int):
        if self.path == "device":
            if self._pipeline is None:
                self._pipeline = DeviceTwoView(self.augment, self.image_size, self.device, self.out_dtype,
                                               self.channels_last, self.crop_chunks)
            seed, rank = self.seed, self.rank
            return DeviceStage(self._pipeline, lambda k: batch_seed(seed, epoch, rank, k), self._stage_stats)
        if self._finish is None:
            self._finish = FinishUint8(self.augment, self.device, self.out_dtype, self.channels_last)
        finish = self._finish
        return lambda item: finish(item["views"])

    def _run(self, epoch: int, start: int):
        if start >= self.batches_per_epoch:
            return
        mode = "raw" if self.path == "device" else "augment"
        dataset = SSLStream(self.urls, self.batch_size, self.batches_per_epoch, self.augment, self.image_size,
                            self.seed, self.rank, self.world_size, self.shuffle_buffer, epoch, start, mode,
                            self.backend, self.max_decode_side)
        pool = WorkerPool(dataset, self.num_workers, self.pin_memory, self.prefetch_factor,
                          self.multiprocessing_context)
        feeder = None
        try:
            feeder = Prefetcher(pool, self._stage(epoch), self.device, self.prefetch_batches, self.prefetch_thread,
                                on_item=lambda item: self._stats.update(item["stats"]))
            yield from feeder
        finally:
            if feeder is not None:
                feeder.close()
            pool.close()

    def __repr__(self) -> str:
        return (f"SSLLoader(shards={len(self.urls)}, batch_size={self.batch_size}, image_size={self.image_size}, "
                f"augment={self.augment.name!r}, batches_per_epoch={self.batches_per_epoch}, rank={self.rank}/"
                f"{self.world_size}, num_workers={self.num_workers}, path={self.path!r}, device={str(self.device)!r})")


def _epoch_samples(shards: List[str], epoch_samples: Optional[int], batch_size: int, world_size: int) -> int:
    if epoch_samples is None:
        counts, _, _ = index_info(shards)
        if counts is None:
            raise DataError(
                "epoch length unknown: no JSON shard index (written by smi-make-shards) lists all of these shards; "
                "give the samples per epoch over all ranks, e.g. the dataset size: --epoch-samples N on the command "
                "line, epoch_samples=N in Python (smi_timm.data.count_samples(urls) counts them by reading the shards)"
            )
        epoch_samples = sum(counts.values())
    epoch_samples = int(epoch_samples)
    if epoch_samples // (world_size * batch_size) < 1:
        raise DataError(f"epoch of {epoch_samples} samples is shorter than one batch of {batch_size} per rank "
                         f"on {world_size} rank(s)")
    return epoch_samples


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
) -> SSLLoader:
    """Loader of two augmented views per image for self-supervised pretraining.

    Args:
        urls: shards: a path, brace pattern (``train-{000000..000009}.tar``), glob (``train-*.tar.gz``), ``pipe:``
            URL, ``sample`` / ``sample:train`` / ``sample:test`` (the bundled CIFAR-10 sample), or a list of these.
        batch_size: samples per batch (per rank).
        image_size: output side length; any size works whatever the stored image size.
        augment: ``"byol"`` (= ``"barlow"``), ``"cifar"`` (32x32 data: crop scale (0.2, 1), no blur) or an
            :class:`~smi_timm.data.augment.AugmentConfig`.
        num_workers: loader worker processes (default: :func:`default_num_workers` for the path); 0 = in this
            process.
        seed: base seed; shard order, shuffling and augmentation differ per (seed, epoch, rank, batch).
        rank, world_size: this process's place among data-parallel processes. Default: from an initialised
            ``torch.distributed`` process group, else 0 and 1. Pass them explicitly when you can.
        epoch_samples: samples per epoch over all ranks. Default: the sum of the shard sizes from the JSON index next
            to the shards (written by ``smi-make-shards``).
        shuffle_buffer: size of the per-worker sample shuffle buffer (raw bytes are buffered, not decoded images).
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

    Raises:
        ValueError: empty shard list, unknown preset, or an epoch shorter than one batch per rank; or no
            ``epoch_samples`` and no index covering the shards.
        FileNotFoundError: a glob that matches nothing, or only missing shard files.
    """
    if batch_size < 1 or image_size < 1:
        raise DataError(f"batch_size and image_size must be positive, got {batch_size}, {image_size}")
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise DataError(f"out_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {out_dtype}")
    cfg = get_augment_config(augment)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    path = _resolve_path(augment_on, dev, backend)
    rank, world_size = _dist_rank_world(rank, world_size)
    stats = DataStats()
    shards = _resolve_shards(urls, stats)
    epoch_samples = _epoch_samples(shards, epoch_samples, batch_size, world_size)
    if num_workers is None:
        num_workers = default_num_workers(world_size, path)
    if max_decode_side is None:
        max_decode_side = max(1024, 4 * int(image_size))
    cuda = dev.type == "cuda"
    return SSLLoader(shards, batch_size, image_size, cfg, int(num_workers), int(seed), rank, world_size,
                     epoch_samples, int(shuffle_buffer), backend, dev, path, out_dtype, bool(channels_last),
                     cuda if pin_memory is None else bool(pin_memory), prefetch_factor, multiprocessing_context,
                     int(max_decode_side) or None, int(prefetch_batches),
                     cuda if prefetch_thread is None else bool(prefetch_thread), int(crop_chunks), stats)


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
                check_worker()
                data = sample_image_bytes(sample, stats)
                if data is None:
                    continue
                label = sample_label(sample, stats)
                if label is None:
                    continue
                img = decode_image(data, stats)
                if img is None:
                    continue
                with single_thread(info is None):
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


class EvalLoader(_LoaderBase):
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
        self._init_base(stats)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise UnknownLengthError("length unknown: no JSON shard index lists these shards")
        return self.num_batches

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return self._track(self._run())

    def _run(self):
        kw = dict(batch_size=self.batch_size, shuffle=False, collate_fn=_collate_folder) \
            if self.source == "folder" else {}
        pool = WorkerPool(self.dataset, self.num_workers, self.pin_memory, self.prefetch_factor,
                          self.multiprocessing_context, **kw)
        labelled = 0
        try:
            for images, labels, delta in pool:
                self._stats.update(delta)
                if images is not None:
                    labelled += len(labels)
                    yield images, labels
        finally:
            pool.close()
        if labelled == 0 and self._stats["missing_label"] > 0:
            raise DataError(f"evaluation needs labelled samples (an image and a 'cls' entry), but these shards have "
                             f"no labels ({self._stats['missing_label']} samples without 'cls'); write labelled shards "
                             f"from a folder with one sub-folder per class: smi-make-shards DIR OUT/val-%06d.tar")

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
        urls: labelled shards (``jpg`` + ``cls``; same forms as :func:`make_ssl_loader`, ``sample:test`` included) or
            an ImageFolder directory.
        batch_size: samples per batch.
        image_size: output side length. Images are resized (shorter side to ``image_size / crop_pct``, bicubic,
            antialiased), centre-cropped and normalised.
        num_workers: worker processes (default :func:`default_num_workers`); never more than there are shards.
        crop_pct: centre-crop fraction; default 0.875 from 128 px up, 1.0 below (CIFAR-sized images).
        rank, world_size: split the shards (or folder images) between processes; default: a single process sees all.

    Raises:
        ValueError / FileNotFoundError: empty shard list, a pattern that matches nothing, only missing shards, an
            ImageFolder without images, or shards whose index marks them unlabeled (also raised at the end of an
            iteration that found no label at all).
    """
    if batch_size < 1 or image_size < 1:
        raise DataError(f"batch_size and image_size must be positive, got {batch_size}, {image_size}")
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
    counts, classes, unlabeled = index_info(shards)
    if unlabeled:
        raise DataError(
            f"{len(unlabeled)} of the {len(shards)} shard(s) are unlabeled (their index says \"labeled\": false, e.g. "
            f"{unlabeled[0]!r}): evaluation needs labels; use them for pretraining (smi-pretrain), and evaluate on "
            f"labelled shards, written from a folder with one sub-folder per class: "
            f"smi-make-shards DIR OUT/val-%06d.tar"
        )
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
