"""The training-process end of the SSL loader: the last stage of each batch, prepared ahead on a side stream.

* :class:`DeviceStage` (accelerator path): decodes the batch's JPEG bytes on the device with nvJPEG
  (``torchvision.io.decode_jpeg`` with a list and ``device=``), falls back to the CPU decoder for files the device
  decoder rejects, and runs :class:`~smi_timm.data.pipeline.DeviceTwoView`.
* :class:`~smi_timm.data.pipeline.FinishUint8` (CPU path): copies the uint8 views to the device and normalises them.
* :class:`Prefetcher` runs that stage ``depth`` batches ahead. On a CUDA device it does so in a background thread on
  a side stream: torchvision's decoder blocks its calling thread until its own stream is done, so the training
  thread keeps launching the current step meanwhile. A batch is handed over with the consumer's stream made to wait
  for an event recorded after it (no host sync) and ``record_stream`` on its tensors, so the caching allocator does
  not reuse their memory before the consumer's kernels are done.
"""
from __future__ import annotations

import queue
import threading
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..errors import DataStallError
from .pipeline import DeviceTwoView
from .reading import decode_image
from .stats import DataStats
from .stream import RawItem, fill_slots

__all__ = ["DeviceStage", "Prefetcher"]


def decode_jpegs(parts: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision >= 0.28 deprecates its codecs (in favour of torchcodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        out = decode_jpeg(parts, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, (list, tuple)) else [out]


class DeviceStage:
    """Decode + augment one raw batch (from :class:`~smi_timm.data.stream.SSLStream` in ``"raw"`` mode) on the
    pipeline's device. Images the device decoder rejects are decoded on the CPU here; those that nothing decodes
    count as ``undecodable`` in ``stats`` and their samples take another image of the batch."""

    def __init__(self, pipeline: DeviceTwoView, seed_of: Callable[[int], int], stats: DataStats):
        self.pipeline = pipeline
        self.device = pipeline.device
        self.seed_of = seed_of
        self.stats = stats

    def decode(self, parts: List[torch.Tensor]) -> Tuple[List[Optional[torch.Tensor]], List[torch.Tensor]]:
        """Device-decoded images (``None`` where the device decoder failed) and CPU-decoded replacements for them
        (one entry per failure: a tensor, or ``None`` when nothing decodes it)."""
        if not parts:
            return [], []
        try:
            return decode_jpegs(parts, self.device), []
        except RuntimeError:  # one bad file fails the whole batched call: decode one by one
            pass
        out: List[Optional[torch.Tensor]] = []
        cpu: List[Optional[torch.Tensor]] = []
        for p in parts:
            try:
                out.append(decode_jpegs([p], self.device)[0])
            except RuntimeError:
                out.append(None)
                cpu.append(decode_image(bytes(p.numpy()), self.stats))
        return out, cpu

    def __call__(self, item: RawItem) -> Tuple[torch.Tensor, torch.Tensor]:
        sizes = list(item.enc_sizes)
        parts = list(torch.split(item.enc, sizes)) if sizes else []
        decoded, rescued = self.decode(parts)
        pix, pix_hw = item.pix, [tuple(hw) for hw in item.pix_hw]
        # numbering: device images that decoded, then the worker's CPU images, then those rescued on the CPU here
        ok = [d for d in decoded if d is not None]
        first_rescued = len(ok) + len(pix_hw)
        index: List[int] = []
        kept = failed = saved = 0
        for d in decoded:
            if d is not None:
                index.append(kept)
                kept += 1
                continue
            img = rescued[failed]
            failed += 1
            index.append(-1 if img is None else first_rescued + saved)
            saved += img is not None
        rescued = [img for img in rescued if img is not None]
        index += [len(ok) + c for c in range(len(pix_hw))]
        slot = [index[s] for s in item.slot_image]
        valid = [i for i, s in enumerate(slot) if s >= 0]
        if not valid:
            raise DataStallError(f"SSL loader: no image of batch {item.batch} decodes on {self.device} or on the "
                               f"CPU, although every one passed the header checks; counters: {self.stats!r}")
        slot = [slot[j] for j in fill_slots(valid, len(slot))]
        extra = ([pix] if pix.numel() else []) + [img.reshape(-1) for img in rescued]
        extra_hw = pix_hw + [tuple(img.shape[-2:]) for img in rescued]
        flat = None
        if extra:
            host = torch.cat(extra) if len(extra) > 1 else extra[0]
            if self.device.type == "cuda" and not host.is_pinned():
                host = host.pin_memory()
            flat = host.to(self.device, non_blocking=True)
        return self.pipeline(ok, slot, self.seed_of(item.batch), flat, extra_hw)


_STOP = object()


class Prefetcher:
    """Iterate ``stage(item)`` over ``source`` items, ``depth`` batches ahead.

    ``on_item`` sees every item as it arrives (the loader adds the workers' counters there). With ``threaded`` the
    stage runs in a background thread (on a side CUDA stream when ``device`` is CUDA); otherwise inline.
    """

    def __init__(self, source: Iterator, stage: Callable, device, depth: int = 2, threaded: bool = False,
                 on_item: Optional[Callable[[Dict], None]] = None):
        self.source = source
        self.stage = stage
        self.device = torch.device(device)
        self.depth = max(1, int(depth))
        self.threaded = threaded
        self.on_item = on_item or (lambda item: None)
        self._submitted = self._taken = 0
        self._exhausted = False
        self._thread: Optional[threading.Thread] = None
        if threaded:
            self._in: "queue.Queue" = queue.Queue()
            self._out: "queue.Queue" = queue.Queue()
            self._thread = threading.Thread(target=self._work, name="smi-data-device-stage", daemon=True)
            self._thread.start()

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        if not self.threaded:
            item = next(self.source)
            self.on_item(item)
            return self.stage(item)
        self._fill()
        if self._taken == self._submitted:
            raise StopIteration
        return self._take()

    # -- threaded ---------------------------------------------------------------------------------------------------
    def _fill(self) -> None:
        while not self._exhausted and self._submitted - self._taken < self.depth:
            try:
                item = next(self.source)
            except StopIteration:
                self._exhausted = True
                break
            self.on_item(item)
            self._in.put(item)
            self._submitted += 1

    def _take(self):
        while True:
            try:
                kind, payload = self._out.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise DataStallError("SSL loader: the device stage thread stopped") from None
        self._taken += 1
        if kind == "error":
            raise payload
        out, event = payload
        if event is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(event)
            for t in out:
                t.record_stream(consumer)
        return out

    def _work(self) -> None:
        cuda = self.device.type == "cuda"
        stream = None
        if cuda:
            if self.device.index is not None:  # the current device is per thread
                torch.cuda.set_device(self.device)
            stream = torch.cuda.Stream(self.device)
        while True:
            item = self._in.get()
            if item is _STOP:
                return
            try:
                if cuda:
                    with torch.cuda.stream(stream):
                        out = self.stage(item)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    out, event = self.stage(item), None
                self._out.put(("ok", (out, event)))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, who re-raises it
                self._out.put(("error", e))

    def close(self) -> None:
        """Stop the background thread (the source is closed by its owner)."""
        if self._thread is not None:
            self._in.put(_STOP)
            self._thread.join(timeout=5.0)
            self._thread = None
