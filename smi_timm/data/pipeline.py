"""The two fast implementations of the two-view augmentation, built on :mod:`smi_timm.data.ops`.

Both draw the random parameters of batch k from a generator seeded with :func:`~smi_timm.data.augment.batch_seed`
(so a batch does not depend on the batches before it), then lay the 2B rows (view a and view b of B images) out in
an order that makes the expensive per-row choices contiguous (:func:`plan_rows`): rows that get blurred first, and
within each group the rows sorted by the step at which their colour jitter applies the hue rotation. Hue and blur
then run on row slices whose bounds are host integers; the cheap choices (brightness / contrast / saturation at each
step, grayscale, solarize) are masks. No per-sample decision ever needs a value from the device.

* :class:`CPUTwoView` runs in the loader workers: per-row uint8 crop + antialiased bicubic resize (torch's uint8
  kernel, channels last), then per row the colour stage as three compiled passes over one cache-resident float
  image (:mod:`smi_timm.data.fused_cpu`, numba; without numba the same formulas as torch ops on float blocks of about
  1 MiB), then back to uint8. Batches cross process boundaries as uint8 (4x less than float32); normalisation is the
  last step, in the training process (:class:`FinishUint8`), on the device the batches are delivered to.
* :class:`DeviceTwoView` runs in the training process on the device that receives the batches: decoded images of
  any sizes are packed into one flat buffer, every row's crop is cut out with one gather and resized with two
  batched matrix products (a few size-sorted chunks bound the padding), the colour ops run on the whole batch, and
  normalisation writes the output dtype and memory format directly. The number of ops per batch is a constant.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError
from . import ops
from .augment import AugmentConfig, ViewParams, blur_kernel_size, draw_batch_params, resize_uint8

try:  # the fused colour kernels of the CPU path need numba (a dependency; the torch ops remain where it is missing)
    from . import fused_cpu
except (ImportError, RuntimeError) as _exc:  # pragma: no cover - no numba, or numba finds no writable cache folder
    fused_cpu = None
    logging.getLogger(__name__).info("CPU augmentation without the fused kernels (%s): torch ops instead", _exc)

#: Whether :class:`CPUTwoView` runs the fused (numba) colour kernels by default.
FUSED_AVAILABLE = fused_cpu is not None

__all__ = ["FUSED_AVAILABLE", "RowPlan", "plan_rows",
           "jitter_and_gray", "blur_and_solarize", "blur_rows", "solarize_rows", "CPUTwoView",
           "DeviceTwoView", "FinishUint8", "pack_images"]

_BLOCK_FLOATS = 1 << 18  # rows per CPU block: about 1 MiB of float32 pixels
_BLUR_ROWS = 8  # CPU: blurred rows per batched (grouped) convolution


@dataclass
class RowPlan:
    """Layout and per-row parameters of the 2B rows of a batch (host tensors, rows in processing order).

    Source row ``q = view * B + sample``; processing row ``r`` shows source row ``source[r]``; ``position`` is the
    inverse permutation. ``kind[r, s]`` is the jitter op of row r at step s (:data:`smi_timm.data.ops.BRIGHTNESS` ...
    :data:`~smi_timm.data.ops.NO_OP`), ``factor[r, s]`` its factor (1 for hue / no-op), ``hue[r]`` the hue shift.
    Rows ``[0, n_blur)`` are blurred; ``hue_runs[s]`` are the row ranges that rotate the hue at step s.
    """

    batch: int
    source: torch.Tensor
    position: torch.Tensor
    boxes: torch.Tensor
    flip: torch.Tensor
    kind: torch.Tensor
    factor: torch.Tensor
    hue: torch.Tensor
    gray: torch.Tensor
    solarize: torch.Tensor
    sigma: torch.Tensor
    n_blur: int
    hue_runs: Optional[Tuple[Tuple[Tuple[int, int], ...], ...]]

    @property
    def image(self) -> torch.Tensor:
        """Sample (slot) index of each processing row."""
        return self.source % self.batch


def plan_rows(cfg: AugmentConfig, pa: ViewParams, pb: ViewParams, order: str = "hue",
              blur_by_sigma: bool = False) -> RowPlan:
    """Order the rows of a batch and turn the drawn parameters into per-row, per-step tensors.

    Blurred rows come first. Within the blurred and the other rows, rows are sorted by the step of their hue rotation
    (``order="hue"``, device path: each step's hue rows form two contiguous runs, ``hue_runs``), or by their whole
    sequence of jitter ops (``order="kinds"``, CPU path: neighbours share every op, so a run of them takes the
    mask-free fast path; ``hue_runs`` is then ``None``). ``blur_by_sigma`` (with ``"kinds"``) sorts the blurred rows
    by sigma instead, so that neighbours blurred together can share a trimmed kernel.
    """
    n = pa.flip.numel()

    def cat(name):
        return torch.cat([getattr(pa, name), getattr(pb, name)])

    jitter, perm, factors = cat("jitter"), cat("jitter_order"), cat("jitter_factors").float()
    enabled = torch.tensor([s > 0 for s in cfg.jitter])
    kind = torch.where(jitter.view(-1, 1) & enabled[perm], perm, torch.full_like(perm, ops.NO_OP))
    is_hue = kind == ops.HUE
    hue_step = torch.where(is_hue.any(1), is_hue.to(torch.int8).argmax(1).long(), torch.full((2 * n,), 4))
    blur = cat("blur")
    key = (~blur).long() * 5 + hue_step  # 0..4: blurred rows by hue step; 5..9: the others
    bounds = [0] + torch.bincount(key, minlength=10).cumsum(0).tolist()
    if order == "kinds":
        code = (((kind[:, 0] * 5 + kind[:, 1]) * 5 + kind[:, 2]) * 5 + kind[:, 3]).double()
        if blur_by_sigma:
            code = torch.where(blur, cat("blur_sigma").double(), code)
        source = torch.argsort((~blur).double() * 1000.0 + code, stable=True)
        runs = None
    else:
        source = torch.argsort(key, stable=True)
        runs = tuple(tuple((bounds[g * 5 + s], bounds[g * 5 + s + 1]) for g in (0, 1)) for s in range(4))
    position = torch.empty_like(source)
    position[source] = torch.arange(2 * n)
    factor = torch.where(kind <= ops.SATURATION, torch.gather(factors, 1, kind.clamp(max=ops.SATURATION)),
                         torch.ones(()))
    hue = torch.where(is_hue.any(1), factors[:, 3], torch.zeros(()))
    return RowPlan(
        batch=n, source=source, position=position, boxes=cat("boxes")[source], flip=cat("flip")[source],
        kind=kind[source], factor=factor[source], hue=hue[source], gray=cat("gray")[source],
        solarize=cat("solarize")[source], sigma=cat("blur_sigma").float()[source], n_blur=int(bounds[5]),
        hue_runs=runs,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Colour stage (both paths)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ColourParams:
    """Per-row colour parameters of a block of rows (tensors on the block's device)."""

    kind: torch.Tensor  # (n, 4) int64
    factor: torch.Tensor  # (n, 4) float32
    hue: torch.Tensor  # (n,)
    gray: torch.Tensor  # (n,) bool
    solarize: torch.Tensor  # (n,) bool
    sigma: torch.Tensor  # (n,)

    def rows(self, lo: int, hi: int) -> "ColourParams":
        return ColourParams(**{k: v[lo:hi] for k, v in self.__dict__.items()})


def _single_kind(x: torch.Tensor, kind: int, factor: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """One jitter op on every row of ``x`` (CPU fast path: no masks, no wasted work)."""
    if kind == ops.HUE:
        return ops.adjust_hue(x, hue, out=x)
    f = factor.view(-1, 1, 1, 1)
    if kind == ops.BRIGHTNESS:
        return x.mul_(f).clamp_(0.0, 1.0)
    if kind == ops.CONTRAST:  # (a lerp towards a broadcast scalar is slow on CPUs)
        mean = ops.gray(x).mean(dim=(-3, -2, -1), keepdim=True)
        return x.mul_(f).add_(mean * (1.0 - f)).clamp_(0.0, 1.0)
    return x.lerp_(ops.gray(x), 1.0 - f).clamp_(0.0, 1.0)


def jitter_and_gray(x: torch.Tensor, p: ColourParams, cfg: AugmentConfig, hue_runs, lo: int = 0,
                    kinds: Optional[List[List[int]]] = None) -> torch.Tensor:
    """Colour jitter (4 steps in each row's order) and grayscale of rows ``[lo, lo + len(x))`` of a planned batch.

    ``x``: float (n, 3, S, S) in [0, 1]; ``p``: the parameters of these rows; ``hue_runs``: the plan's row ranges
    (batch coordinates). With ``kinds`` (the plan's ``kind`` as host lists: CPU path) steps where all rows do the same
    op take a mask-free fast path and ops no row needs are skipped; without it (device path) every op runs as a
    batched masked op, so the op count does not depend on the data.
    """
    hi = lo + x.shape[0]
    for step in range(4):
        ks = None if kinds is None else {row[step] for row in kinds[lo:hi]}
        if ks is not None and len(ks) == 1:
            (k,) = ks
            if k != ops.NO_OP:
                x = _single_kind(x, k, p.factor[:, step], p.hue)
            continue
        if ks is None or ks & {ops.BRIGHTNESS, ops.CONTRAST, ops.SATURATION}:
            x = ops.blend_step(x, p.kind[:, step], p.factor[:, step])
        if hue_runs is None:  # rows not grouped by hue step: rotate all, by 0 where this step is not the hue
            if ks is None or ops.HUE in ks:
                x = ops.adjust_hue(x, torch.where(p.kind[:, step] == ops.HUE, p.hue, torch.zeros(())), out=x)
            continue
        for a, b in hue_runs[step]:
            a, b = max(a, lo), min(b, hi)
            if b > a or (kinds is None and b == a):
                ops.adjust_hue(x[a - lo:b - lo], p.hue[a - lo:b - lo], out=x[a - lo:b - lo])
    if kinds is None or bool(p.gray.any()):
        x = ops.grayscale_where(x, p.gray)
    return x


def blur_and_solarize(x: torch.Tensor, p: ColourParams, cfg: AugmentConfig, blur_kernel: int, n_blur: int,
                      lo: int = 0, host: bool = False) -> torch.Tensor:
    """Gaussian blur of the rows below ``n_blur`` (batch coordinates) and solarize, for rows ``[lo, lo + len(x))``
    (:func:`blur_rows`, then :func:`solarize_rows`)."""
    return solarize_rows(blur_rows(x, p, cfg, blur_kernel, n_blur, lo, host), p, cfg, host)


def blur_rows(x: torch.Tensor, p: ColourParams, cfg: AugmentConfig, blur_kernel: int, n_blur: int, lo: int = 0,
              host: bool = False) -> torch.Tensor:
    """Gaussian blur of the rows below ``n_blur`` (batch coordinates), for rows ``[lo, lo + len(x))``.

    ``host=True`` (CPU path; the rows must be all blurred or all not): skip what no row needs, trim the kernels to
    ``ceil(4 * max sigma)`` (the Gaussian's mass beyond is < 6e-5, below the uint8 rounding of the CPU path's output)
    and blur in channels-last layout (several times faster depthwise convolution on CPUs); the result stays in that
    layout.
    """
    hi = lo + x.shape[0]
    b = max(min(n_blur, hi), lo)
    if host:
        if b > lo:
            radius = math.ceil(4.0 * float(p.sigma[:b - lo].max()))
            y = ops.gaussian_blur(x[:b - lo], p.sigma[:b - lo], blur_kernel, torch.channels_last, radius)
            if b == hi:
                return y
            x[:b - lo] = y
        return x
    if max(cfg.blur_p) > 0:
        x[:b - lo] = ops.gaussian_blur(x[:b - lo], p.sigma[:b - lo], blur_kernel)
    return x


def solarize_rows(x: torch.Tensor, p: ColourParams, cfg: AugmentConfig, host: bool = False) -> torch.Tensor:
    """Solarize the rows of ``x`` whose parameters say so. ``host=True`` (CPU path): only those rows are touched."""
    if not host:
        return ops.solarize_where(x, p.solarize, cfg.solarize_threshold)
    for i in p.solarize.nonzero().flatten().tolist() if max(cfg.solarize_p) > 0 else ():  # host tensors
        row = x[i:i + 1]
        row.copy_(ops.solarize_where(row, p.solarize[i:i + 1], cfg.solarize_threshold))
    return x


def _colour_params(plan: RowPlan) -> ColourParams:
    return ColourParams(plan.kind, plan.factor, plan.hue, plan.gray, plan.solarize, plan.sigma)


# ---------------------------------------------------------------------------------------------------------------------
# CPU path (loader workers)
# ---------------------------------------------------------------------------------------------------------------------


class CPUTwoView:
    """Two augmented views of a batch of decoded images, on the CPU: ``(images, seed) -> uint8 (2, B, 3, S, S)``.

    ``images``: uint8 (3, H, W) tensors of any sizes; ``seed``: the batch's seed; ``out``: optional uint8
    (2B, 3, S, S) to write into. The output is not normalised (:class:`FinishUint8` does that where the batch is
    delivered). ``profile`` (a dict) accumulates CPU seconds
    per stage when given (used by the benchmark).

    ``fused`` (default: where numba is installed, :data:`FUSED_AVAILABLE`): the colour stage of each row (to float,
    jitter, grayscale, blur, solarize, back to uint8) runs as three compiled passes over one cache-resident image
    (:mod:`smi_timm.data.fused_cpu`); ``fused=False``: the same formulas as batched torch ops on blocks of rows.
    """

    def __init__(self, augment: AugmentConfig, image_size: int, fused: Optional[bool] = None):
        self.config = augment
        self.image_size = int(image_size)
        self.blur_kernel = blur_kernel_size(self.image_size, augment.blur_kernel_frac)
        self.block = max(1, _BLOCK_FLOATS // (3 * self.image_size ** 2))
        if fused and not FUSED_AVAILABLE:
            raise ConfigError("CPUTwoView(fused=True) needs numba, which is not installed: pip install numba, or "
                              "pass fused=False (the same augmentation with torch ops, slower)")
        self.fused = FUSED_AVAILABLE if fused is None else bool(fused)

    def __call__(self, images: Sequence[torch.Tensor], seed: int, profile: Optional[dict] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        clock = _Clock(profile)
        s = self.image_size
        hs = torch.tensor([im.shape[-2] for im in images])
        ws = torch.tensor([im.shape[-1] for im in images])
        plan = plan_rows(self.config, *draw_batch_params(self.config, hs, ws, seed), order="kinds",
                         blur_by_sigma=self.block == 1)
        clock("params_plan")
        rows = crop_resize_rows(images, plan, s)
        clock("crop_resize_flip")
        if out is None:
            out = torch.empty(2 * plan.batch, 3, s, s, dtype=torch.uint8)
        if self.fused:
            self._fused_colour(rows, plan, out, clock)
            return out.view(2, plan.batch, 3, s, s)
        params = _colour_params(plan)
        kinds = plan.kind.tolist()
        source = plan.source.tolist()
        n, nb = 2 * plan.batch, plan.n_blur
        group = max(self.block, _BLUR_ROWS)
        bounds = sorted(set(list(range(0, nb, group)) + list(range(nb, n, group)) + [n]))
        for lo, hi in zip(bounds[:-1], bounds[1:]):  # blurred rows in groups (batched conv), then the others
            x = rows[lo:hi].to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255.0)
            clock("to_float_and_back")
            a = lo
            while a < hi:  # runs of rows with the same jitter ops, at most a cache-sized block each
                b = a + 1
                while b < hi and b - a < max(self.block, 2) and kinds[b] == kinds[a]:
                    b += 1
                part = x[a - lo:b - lo]
                res = jitter_and_gray(part, params.rows(a, b), self.config, None, lo=a, kinds=kinds)
                if res.data_ptr() != part.data_ptr():
                    part.copy_(res)
                a = b
            clock("color_jitter_grayscale")
            part = params.rows(lo, hi)
            x = blur_rows(x, part, self.config, self.blur_kernel, nb, lo=lo, host=True)
            clock("blur")
            x = solarize_rows(x, part, self.config, host=True)
            clock("solarize")
            # float -> uint8 through int16: 6x faster than the direct conversion on CPUs (values are in [0, 255])
            x = x.mul_(255.0).round_().to(torch.int16)
            for r in range(lo, hi):
                out[source[r]].copy_(x[r - lo])
            clock("to_float_and_back")
        return out.view(2, plan.batch, 3, s, s)

    def _fused_colour(self, rows: torch.Tensor, plan: RowPlan, out: torch.Tensor, clock: "_Clock") -> None:
        """The colour stage row by row with the compiled kernels, into ``out`` (source order). The profile's
        ``color_jitter_grayscale`` includes the conversion to float, ``solarize`` the rounding back to uint8."""
        s, n = self.image_size, rows.shape[0]
        target = out if out.is_contiguous() else torch.empty(out.shape, dtype=torch.uint8)
        src = rows.permute(0, 2, 3, 1).numpy().reshape(n, s * s, 3)  # channels last: a view
        dst = target.numpy().reshape(out.shape[0], 3, s * s)
        buf = np.empty((3, s * s), dtype=np.float32)
        tmp = np.empty_like(buf) if plan.n_blur else buf
        line = np.empty(s + 2 * (self.blur_kernel // 2), dtype=np.float32)
        kinds, factors, hue = plan.kind.numpy(), plan.factor.numpy(), plan.hue.numpy()
        gray, solarize, sigma = plan.gray.tolist(), plan.solarize.tolist(), plan.sigma.numpy()
        source = plan.source.tolist()
        threshold = np.float32(self.config.solarize_threshold)
        for r in range(n):
            fused_cpu.colour_row(src[r], buf, kinds[r], factors[r], hue[r], gray[r])
            clock("color_jitter_grayscale")
            if r < plan.n_blur:
                radius = fused_cpu.blur_radius(sigma[r], self.blur_kernel)
                fused_cpu.blur_row(buf, tmp, line, s, sigma[r], radius)
                clock("blur")
            fused_cpu.finish_row(buf, dst[source[r]], solarize[r], threshold)
            clock("solarize")
        if target is not out:
            out.copy_(target)


def crop_resize_rows(images: Sequence[torch.Tensor], plan: RowPlan, size: int) -> torch.Tensor:
    """Crop each row's box out of its image, mirror it where the plan says, resize to ``size`` (uint8 antialiased
    bicubic): uint8 (2B, 3, size, size) in processing order, channels-last layout. Mirroring the small crop before the
    (mirror-symmetric) resize equals mirroring the output.

    Channels last is what torch's vectorised uint8 kernel writes fastest (1.5x against planes at 224 px); decoded
    JPEGs are channels last already, planar crops are made so first (the kernel refuses planar input into a
    channels-last output)."""
    n = plan.source.numel()
    out = torch.empty(n, 3, size, size, dtype=torch.uint8, memory_format=torch.channels_last)
    for r, (img_idx, box, flip) in enumerate(zip(plan.image.tolist(), plan.boxes.tolist(), plan.flip.tolist())):
        t, left, h, w = box
        crop = images[img_idx][:, t:t + h, left:left + w]
        if flip:
            crop = crop.flip(-1)
        if h == size and w == size:
            out[r].copy_(crop)
            continue
        crop = crop.unsqueeze(0)
        if crop.stride(1) != 1:  # planar (e.g. PIL-decoded): the channels-last kernel wants interleaved input
            crop = crop.contiguous(memory_format=torch.channels_last)
        resize_uint8(crop, (size, size), out=out[r:r + 1])
    return out


class _Clock:
    def __init__(self, profile: Optional[dict]):
        self.profile = profile
        if profile is not None:
            import time

            self._time = time.process_time  # CPU time: meaningful on a shared machine (use one torch thread)
            self.t = self._time()

    def __call__(self, name: str) -> None:
        if self.profile is None:
            return
        now = self._time()
        self.profile[name] = self.profile.get(name, 0.0) + now - self.t
        self.t = now


class FinishUint8:
    """Last step of the CPU path, where batches are delivered: uint8 (2, B, 3, S, S) -> normalised ``(view_a,
    view_b)`` on ``device`` in ``out_dtype`` (channels-last on request). The copy to a CUDA device is non-blocking
    (the loader pins the batch). On the CPU each view is its own allocation: below glibc's 32 MiB limit for reusing
    freed heap memory (see :func:`~smi_timm.data.workers.keep_freed_memory`) a view of up to 32 MiB then costs no
    page faults, where one buffer for both views would be mapped afresh for every batch."""

    def __init__(self, augment: AugmentConfig, device, out_dtype=torch.float32, channels_last: bool = False):
        self.device = torch.device(device)
        self.out_dtype = out_dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.gain, self.bias = ops.normalize_constants(augment.mean, augment.std, self.device, scale=1.0 / 255.0)

    def __call__(self, views: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        u8 = views.to(self.device, non_blocking=True)
        two, b, c, h, w = u8.shape
        if self.device.type == "cpu":
            return self._view_on_cpu(u8[0]), self._view_on_cpu(u8[1])
        out = self._empty(two * b, c, h, w)
        ops.normalize_into(u8.view(two * b, c, h, w), self.gain, self.bias, out)
        return out[:b], out[b:]

    def _view_on_cpu(self, u8: torch.Tensor) -> torch.Tensor:
        """One view, normalised in blocks of rows of about 1 MiB: the second and third of normalize_into's passes then
        read the cache, not memory (3x on a 224-px batch)."""
        out = self._empty(*u8.shape)
        if FUSED_AVAILABLE and out.dtype == torch.float32 and out.is_contiguous() and u8.is_contiguous():
            n, c = u8.shape[:2]
            fused_cpu.normalize_rows(u8.numpy().reshape(n, c, -1), self.gain.view(-1).numpy(),
                                     self.bias.view(-1).numpy(), out.numpy().reshape(n, c, -1))
            return out
        step = max(1, _BLOCK_FLOATS // max(1, u8[0].numel())) if len(u8) else 1
        for i in range(0, len(u8), step):
            ops.normalize_into(u8[i:i + step], self.gain, self.bias, out[i:i + step])
        return out

    def _empty(self, *shape) -> torch.Tensor:
        return torch.empty(*shape, dtype=self.out_dtype, device=self.device, memory_format=self.memory_format)


# ---------------------------------------------------------------------------------------------------------------------
# Device path (training process)
# ---------------------------------------------------------------------------------------------------------------------


def pack_images(decoded: Sequence[torch.Tensor], extra: Optional[torch.Tensor], spare: int) -> torch.Tensor:
    """One flat uint8 buffer: the ``decoded`` (3, H, W) images one after the other, then ``extra`` (already flat),
    then ``spare`` zeros. One op for the list where torch has ``_chunk_cat`` (torch >= 2.4), else one view each."""
    parts = []
    if len(decoded):
        flat = None
        chunk_cat = getattr(torch, "_chunk_cat", None)
        if chunk_cat is not None:
            try:
                flat = chunk_cat(list(decoded), 0, 1).view(-1)
            except (RuntimeError, NotImplementedError):  # pragma: no cover - a torch without it for this dtype
                flat = None
        parts.extend([flat] if flat is not None else [t.reshape(-1) for t in decoded])
    if extra is not None and extra.numel():
        parts.append(extra.view(-1))
    device = decoded[0].device if len(decoded) else extra.device
    parts.append(torch.zeros(spare, dtype=torch.uint8, device=device))
    return torch.cat(parts)


def _crop_chunks(boxes: torch.Tensor, nchunks: int) -> List[Tuple[int, int, int, int]]:
    """Split rows sorted by crop height into ``nchunks`` equal parts: ``(lo, hi, rows_pad, cols_pad)`` each."""
    n = boxes.shape[0]
    nchunks = max(1, min(nchunks, n))
    h = boxes[:, 2].tolist()
    w = boxes[:, 3].tolist()
    out = []
    for c in range(nchunks):
        lo, hi = c * n // nchunks, (c + 1) * n // nchunks
        out.append((lo, hi, max(h[lo:hi]), max(w[lo:hi])))
    return out


#: Columns of the packed int64 row table uploaded per batch.
_INT_COLS = ("offset", "stride", "plane", "height", "width", "flip", "gray", "solarize", "crop_row", "position",
             "kind0", "kind1", "kind2", "kind3")


class DeviceTwoView:
    """Two augmented views of a batch on ``device``, from images decoded there: the accelerator path.

    Call with the decoded images (a list of uint8 (3, H, W) tensors on the device), optionally a flat uint8 buffer of
    more images (CPU-decoded fallbacks, already on the device) with their ``(H, W)`` sizes, the image used by each
    of the B samples (``slot_image``: indices into decoded + extra), and the batch's seed. Returns ``(view_a,
    view_b)`` of shape (B, 3, S, S) in ``out_dtype``, channels-last on request.

    Host work per batch: drawing the parameters, planning the rows and packing two small tables, which are copied
    to the device without blocking (pinned memory). Device work: a fixed number of batched ops, no host sync.
    ``crop_chunks`` size-sorted chunks bound the padding of the crop gather (memory ~ rows / chunks x largest crop).
    """

    def __init__(self, augment: AugmentConfig, image_size: int, device, out_dtype=torch.float32,
                 channels_last: bool = False, crop_chunks: int = 4, resample_dtype: Optional[torch.dtype] = None):
        self.config = augment
        self.image_size = int(image_size)
        self.device = torch.device(device)
        self.out_dtype = out_dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.crop_chunks = int(crop_chunks)
        if resample_dtype is None:  # fp16 tensor cores on a GPU (pixels <= 255 are exact); fp32 elsewhere
            resample_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.resample_dtype = resample_dtype
        self.blur_kernel = blur_kernel_size(self.image_size, augment.blur_kernel_frac)
        self.gain, self.bias = ops.normalize_constants(augment.mean, augment.std, self.device)

    # -- host side ------------------------------------------------------------------------------------------------
    def prepare(self, sizes: Sequence[Tuple[int, int]], slot_image: Sequence[int], seed: int):
        """Host part: parameters, plan and the two packed tables (pinned when the device is CUDA)."""
        hw = torch.tensor([sizes[i] for i in slot_image], dtype=torch.int64).view(-1, 2)
        plan = plan_rows(self.config, *draw_batch_params(self.config, hw[:, 0], hw[:, 1], seed))
        all_hw = torch.tensor(list(sizes), dtype=torch.int64).view(-1, 2)
        plane = all_hw[:, 0] * all_hw[:, 1]
        start = torch.cumsum(3 * plane, 0) - 3 * plane
        img = torch.tensor(list(slot_image), dtype=torch.int64)[plan.image]
        t, left, h, w = plan.boxes.unbind(1)
        width = all_hw[img, 1]
        crop_order = torch.argsort(h, descending=True, stable=True)
        chunks = _crop_chunks(plan.boxes[crop_order], self.crop_chunks)
        ints = torch.stack([start[img] + t * width + left, width, plane[img], h, w, plan.flip.long(), plan.gray.long(),
                            plan.solarize.long(), crop_order, plan.position] + list(plan.kind.unbind(1)), dim=1)
        floats = torch.cat([plan.factor, plan.hue.view(-1, 1), plan.sigma.view(-1, 1)], dim=1)
        if self.device.type == "cuda":
            ints, floats = ints.pin_memory(), floats.pin_memory()
        spare = max(c[3] for c in chunks)
        return plan, chunks, ints, floats, spare

    # -- device side ----------------------------------------------------------------------------------------------
    def __call__(self, decoded: Sequence[torch.Tensor], slot_image: Sequence[int], seed: int,
                 extra: Optional[torch.Tensor] = None, extra_sizes: Sequence[Tuple[int, int]] = ()):
        sizes = [tuple(t.shape[-2:]) for t in decoded] + [tuple(s) for s in extra_sizes]
        plan, chunks, ints, floats, spare = self.prepare(sizes, slot_image, seed)
        flat = pack_images(decoded, extra, spare)
        return self.run(flat, plan, chunks, ints.to(self.device, non_blocking=True),
                        floats.to(self.device, non_blocking=True))

    def run(self, flat: torch.Tensor, plan: RowPlan, chunks, ints: torch.Tensor, floats: torch.Tensor):
        """Device part: crop + resize + flip, colour, blur, solarize, normalise (no host sync)."""
        s, n = self.image_size, 2 * plan.batch
        x = torch.empty(n, 3, s, s, dtype=torch.float32, device=self.device)
        crop_row = ints[:, 8]
        for lo, hi, rows_pad, cols_pad in chunks:
            rows = crop_row[lo:hi]
            t = ints.index_select(0, rows)
            crops = ops.crop_windows(flat, t[:, 0], t[:, 1], t[:, 2], t[:, 3], rows_pad, cols_pad)
            wy = ops.aa_bicubic_weights(t[:, 3], s, rows_pad, self.resample_dtype)
            wx = ops.aa_bicubic_weights(t[:, 4], s, cols_pad, self.resample_dtype)
            wx = torch.where(t[:, 5].view(-1, 1, 1) > 0, wx.flip(1), wx)
            y = ops.resample(crops, wy, wx).to(torch.float32).clamp_(0.0, 255.0).mul_(1.0 / 255.0)
            x.index_copy_(0, rows, y)
        params = ColourParams(kind=ints[:, 10:14], factor=floats[:, 0:4], hue=floats[:, 4], gray=ints[:, 6] > 0,
                              solarize=ints[:, 7] > 0, sigma=floats[:, 5])
        x = jitter_and_gray(x, params, self.config, plan.hue_runs)
        x = blur_and_solarize(x, params, self.config, self.blur_kernel, plan.n_blur)
        out = torch.empty(n, 3, s, s, dtype=self.out_dtype, device=self.device, memory_format=self.memory_format)
        ops.normalize_into(x.index_select(0, ints[:, 9]), self.gain, self.bias, out)
        return out[:plan.batch], out[plan.batch:]

