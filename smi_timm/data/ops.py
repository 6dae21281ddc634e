"""Batched image ops with per-sample parameters held in tensors: the pixel work of both augmentation paths.

Every function takes a batch of ``n`` rows (one row = one view of one image) and per-row parameters as tensors on
the same device; per-row choices are made with ``torch.where`` masks or with row slices whose bounds the caller
computed on the host. Nothing here synchronises with the host: no ``.item()``, ``nonzero``, ``bool(tensor)``,
``.tolist()`` or shapes that depend on tensor values, so on a CUDA device the ops queue up without waiting
(``tests/test_data_device.py`` checks this with a dispatch-mode op counter and by running them on ``meta`` tensors).

The colour ops work on float images in [0, 1] and follow ``torchvision.transforms.v2.functional`` formula for
formula (the tests compare them op by op): brightness, contrast and saturation are blends
``factor * x + (1 - factor) * target`` clamped to [0, 1] (target 0, the mean grey level, the grey image); hue is
the exact HSV rotation, written in closed form per channel; grayscale uses the ITU-R 601-2 luma weights; the Gaussian
blur is separable (two grouped convolutions, reflect padding). The resampling is the antialiased bicubic filter of
``torch.nn.functional.interpolate(..., mode="bicubic", antialias=True)`` (Keys a = -0.5, support scaled with the
downscale factor, as in PIL), applied as two dense matrix products so that a batch of crops of different sizes is
resized in one batched ``matmul`` (tensor cores on a GPU).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

#: ITU-R 601-2 luma weights (torchvision's ``rgb_to_grayscale``).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

#: Jitter op codes used in per-row ``kind`` tensors.
BRIGHTNESS, CONTRAST, SATURATION, HUE, NO_OP = 0, 1, 2, 3, 4

__all__ = [
    "GRAY_WEIGHTS", "BRIGHTNESS", "CONTRAST", "SATURATION", "HUE", "NO_OP",
    "aa_bicubic_weights", "crop_windows", "resample", "gray", "adjust_brightness", "adjust_contrast",
    "adjust_saturation", "blend_step", "adjust_hue", "grayscale_where", "solarize_where", "gaussian_kernels",
    "gaussian_blur", "normalize_constants", "normalize_into",
]


# ---------------------------------------------------------------------------------------------------------------------
# Crop and resize
# ---------------------------------------------------------------------------------------------------------------------


def _cubic(d: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel of |d| (as torch's antialiased bicubic and PIL use, a = -0.5)."""
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    far = ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
    return torch.where(d < 1.0, near, torch.where(d < 2.0, far, torch.zeros((), dtype=d.dtype, device=d.device)))


def aa_bicubic_weights(length: torch.Tensor, out_size: int, pad: int, dtype=torch.float32) -> torch.Tensor:
    """Resampling matrices of antialiased bicubic resizing, one per row: shape (n, out_size, pad).

    ``length[i]`` is the source length (a crop's height or width) of row i, ``pad >= length.max()`` the padded source
    length (columns ``>= length[i]`` get weight 0). ``W[i] @ v`` resizes ``v[:length[i]]`` to ``out_size`` exactly as
    ``interpolate(..., mode="bicubic", antialias=True, align_corners=False)`` does: centre ``(y + 0.5) * scale``,
    support ``2 * max(scale, 1)``, taps clipped to the source and renormalised.
    """
    dev = length.device
    src = length.to(torch.float32).view(-1, 1, 1)
    scale = src / out_size
    down = scale >= 1.0
    support = torch.where(down, 2.0 * scale, torch.full_like(scale, 2.0))
    invscale = torch.where(down, 1.0 / scale, torch.ones_like(scale))
    center = scale * (torch.arange(out_size, device=dev, dtype=torch.float32).view(1, -1, 1) + 0.5)
    lo = torch.clamp(torch.floor(center - support + 0.5), min=0.0)
    hi = torch.minimum(torch.floor(center + support + 0.5), src)
    j = torch.arange(pad, device=dev, dtype=torch.float32).view(1, 1, -1)
    w = _cubic(((j - center + 0.5) * invscale).abs_())
    w = torch.where((j >= lo) & (j < hi), w, torch.zeros((), device=dev))
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return w.to(dtype)


def crop_windows(flat: torch.Tensor, row_offset: torch.Tensor, row_stride: torch.Tensor, plane: torch.Tensor,
                 rows: torch.Tensor, rows_pad: int, cols_pad: int) -> torch.Tensor:
    """Cut padded crops out of a flat buffer of CHW images: uint8 (n, 3, rows_pad, cols_pad).

    ``flat`` holds the images one after the other (C, H, W order each) followed by at least ``cols_pad`` spare
    elements. Row i's crop starts at ``row_offset[i]`` (image start + top * width + left), its image rows are
    ``row_stride[i]`` (= width) apart and its colour planes ``plane[i]`` (= height * width); it has ``rows[i]`` rows.
    Rows past ``rows[i]`` repeat the last one, columns past the crop's width read whatever follows (the resampling
    weights of both are zero). One ``index_select`` of overlapping windows (``unfold``) does the gather.
    """
    y = torch.arange(rows_pad, device=flat.device).view(1, 1, -1)
    y = torch.minimum(y, (rows - 1).view(-1, 1, 1))
    c = torch.arange(3, device=flat.device).view(1, 3, 1)
    starts = row_offset.view(-1, 1, 1) + c * plane.view(-1, 1, 1) + y * row_stride.view(-1, 1, 1)
    windows = flat.unfold(0, cols_pad, 1)
    return windows.index_select(0, starts.reshape(-1)).view(-1, 3, rows_pad, cols_pad)


def resample(crops: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """``wy @ crop @ wx^T`` per row: (n, 3, P, Q) crops, (n, S, P) and (n, T, Q) weights -> (n, 3, S, T)."""
    x = crops.to(wy.dtype)
    x = torch.matmul(wy.unsqueeze(1), x)
    return torch.matmul(x, wx.transpose(1, 2).unsqueeze(1))


# ---------------------------------------------------------------------------------------------------------------------
# Colour
# ---------------------------------------------------------------------------------------------------------------------


def gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of (n, 3, H, W) -> (n, 1, H, W), with torchvision's op order (so results agree bit for bit)."""
    r, g, b = x.unbind(1)
    return r.mul(GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _rows(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _rows(factor)
    mean = gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    return (x * f + mean * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _rows(factor)
    return (x * f + gray(x) * (1.0 - f)).clamp_(0.0, 1.0)


def blend_step(x: torch.Tensor, kind: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """One colour-jitter step, in place: row i gets brightness, contrast or saturation with ``factor[i]`` as
    ``kind[i]`` says (:data:`BRIGHTNESS`, :data:`CONTRAST`, :data:`SATURATION`); other kinds leave the row as it is.

    The three ops are the same blend ``f * x + (1 - f) * target`` with target 0, the image's mean grey level or its
    grey image, so one ``lerp`` does all rows at once.
    """
    k = _rows(kind)
    g = gray(x)
    is_sat = (k == SATURATION).to(x.dtype)
    is_con = (k == CONTRAST).to(x.dtype)
    target = torch.addcmul(g.mean(dim=(-2, -1), keepdim=True).mul_(is_con), g, is_sat)  # 0 for brightness
    weight = (k <= SATURATION).to(x.dtype).mul_(1.0 - _rows(factor).to(x.dtype))
    return x.lerp_(target, weight).clamp_(0.0, 1.0)


def _is(op, a: torch.Tensor, b) -> torch.Tensor:
    """``op(a, b)`` as 0.0 / 1.0 in ``a``'s dtype. Float masks and ``lerp`` select: ``torch.where`` and bool tensors
    are an order of magnitude slower than arithmetic on CPUs, and ``lerp`` with weight exactly 0 or 1 returns one of
    its inputs bit for bit."""
    return op(a, b, out=torch.empty_like(a))


def _mod6(y: torch.Tensor) -> torch.Tensor:
    """``torch.remainder(y, 6)`` in place, written as ``y - 6 * floor(y / 6)`` (what remainder computes, 2x faster)."""
    return y.sub_(torch.floor(y / 6.0).mul_(6.0))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotate the hue of each row by ``shift[i]`` (fraction of a turn) in HSV space; x in [0, 1], (n, 3, H, W).

    The result equals torchvision's ``adjust_hue`` (RGB -> HSV, shift, HSV -> RGB) up to rounding. Closed form: with
    M, m the largest and smallest channel and h the hue in sixths of a turn, channel c of the output is
    ``M - (M - m) * clamp(2 - |k - 2|, 0, 1)`` with ``k = (h + n_c) mod 6``, n = 5, 3, 1 for R, G, B, computed as
    ``m + (M - m) * clamp(|k - 2| - 1, 0, 1)``. ``out`` may be ``x`` itself (it is written last).
    """
    r, g, b = x.unbind(1)
    maxc = torch.maximum(r, g)
    maxc = torch.maximum(maxc, b, out=maxc)
    minc = torch.minimum(r, g)
    minc = torch.minimum(minc, b, out=minc)
    span = maxc - minc
    inv = span.clamp_min(1e-12).reciprocal_()  # where span == 0 all channel differences below are 0 as well
    h = torch.sub(r, g).mul_(inv).add_(4.0)  # hue if blue is the largest channel
    alt = torch.sub(b, r).mul_(inv).add_(2.0)  # ... green
    mask = _is(torch.eq, maxc, g)
    h = h.lerp_(alt, mask)
    alt = torch.sub(g, b, out=alt).mul_(inv)  # ... red (wins ties, then green)
    h = h.lerp_(alt, torch.eq(maxc, r, out=mask))
    h = _mod6(h.add_(shift.view(-1, 1, 1).to(x.dtype) * 6.0))
    # k - 2 per channel, offsets n_c - 2 = 3, 1, -1 made on the device (a torch.tensor from a list would be a
    # blocking host-to-device copy); in [-1, 9): (k mod 6) - 2 = that - 6 where it is >= 4
    offsets = torch.arange(3, dtype=x.dtype, device=x.device).mul_(-2.0).add_(3.0).view(1, 3, 1, 1)
    k = h.unsqueeze(1) + offsets
    k = k.add_(_is(torch.ge, k, 4.0), alpha=-6.0).abs_().sub_(1.0).clamp_(0.0, 1.0).mul_(span.unsqueeze(1))
    return torch.add(k, minc.unsqueeze(1), out=k if out is None else out)


def grayscale_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows where ``mask`` become grey (3 equal channels); the others are kept."""
    return torch.lerp(x, gray(x).expand_as(x), _rows(mask).to(x.dtype))


def solarize_where(x: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """Rows where ``mask``: values ``>= threshold`` are inverted (``1 - x``)."""
    sel = _is(torch.ge, x, threshold).mul_(_rows(mask).to(x.dtype))
    return torch.lerp(x, 1.0 - x, sel)


# ---------------------------------------------------------------------------------------------------------------------
# Gaussian blur
# ---------------------------------------------------------------------------------------------------------------------


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels, shape (n, kernel_size), one per sigma (as torchvision builds them)."""
    half = (kernel_size - 1) * 0.5
    coords = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=torch.float32)
    kern = torch.exp(-0.5 * (coords.view(1, -1) / sigma.view(-1, 1).to(torch.float32)) ** 2)
    kern = kern / kern.sum(dim=1, keepdim=True)
    # Zero the far tail: below float32 resolution anyway, and denormal weights slow the arithmetic down on x86.
    return torch.where(kern < 1e-12, torch.zeros((), device=kern.device), kern)


def _reflect_band(n: int, kern: torch.Tensor) -> torch.Tensor:
    """(m, n, n) matrices ``M`` with ``M[i] @ v`` = 1-D convolution of v (length n) with ``kern[i]``, reflect padding
    repeated as often as needed (kernels longer than the image)."""
    m, k = kern.shape
    src = torch.arange(n, device=kern.device).view(n, 1) + torch.arange(k, device=kern.device).view(1, k) - k // 2
    if n == 1:
        src = torch.zeros_like(src)
    else:
        period = 2 * (n - 1)
        src = torch.remainder(src, period)
        src = torch.where(src > n - 1, period - src, src)
    band = torch.zeros(m, n, n, dtype=kern.dtype, device=kern.device)
    band.scatter_add_(2, src.expand(m, n, k), kern.view(m, 1, k).expand(m, n, k))
    return band


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int, memory_format=torch.contiguous_format,
                  radius: Optional[int] = None) -> torch.Tensor:
    """Separable Gaussian blur of every row with its own ``sigma``, reflect padding: two grouped convolutions
    (1 x k, then k x 1), one group per (row, channel). Equals torchvision's 2-D ``gaussian_blur`` up to rounding.

    ``memory_format=torch.channels_last`` runs the convolutions in NHWC layout (several times faster on CPUs) and
    returns the result in that layout. ``radius`` (a host int below ``kernel_size // 2``) trims the kernel to
    ``2 * radius + 1`` taps (renormalised): with ``radius >= 4 * sigma.max()`` the result differs from the full
    kernel's by less than the Gaussian's mass beyond 4 sigma (6e-5).
    """
    n, c, hgt, wid = x.shape
    if n == 0:
        return x
    if radius is not None and 0 <= radius < kernel_size // 2:
        kernel_size = 2 * radius + 1
    kern = gaussian_kernels(sigma, kernel_size).to(x.dtype)
    half = kernel_size // 2
    if half >= hgt or half >= wid:  # reflect padding needs pad < size: fall back to banded matrices
        along_w = _reflect_band(wid, kern).transpose(1, 2).unsqueeze(1)
        along_h = along_w if hgt == wid else _reflect_band(hgt, kern).transpose(1, 2).unsqueeze(1)
        return torch.matmul(along_h.transpose(2, 3), torch.matmul(x, along_w))
    weight = kern.repeat_interleave(c, dim=0, output_size=n * c).view(n * c, 1, 1, kernel_size)
    y = F.pad(x.reshape(1, n * c, hgt, wid), (half, half, half, half), mode="reflect")
    y = F.conv2d(y.contiguous(memory_format=memory_format), weight, groups=n * c)
    y = F.conv2d(y, weight.view(n * c, 1, kernel_size, 1), groups=n * c)
    if memory_format == torch.contiguous_format:
        return y.view(n, c, hgt, wid)
    return y.as_strided((n, c, hgt, wid), (c, 1, wid * n * c, n * c))  # NHWC over (row, channel) pairs


# ---------------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------------


def normalize_constants(mean: Sequence[float], std: Sequence[float], device, scale: float = 1.0):
    """``(gain, bias)`` of shape (1, 3, 1, 1) on ``device`` for :func:`normalize_into`: ``(x * scale - mean) / std`` =
    ``x * gain + bias``. Made once per pipeline: building them per batch would copy from the host every time."""
    gain = torch.tensor([scale / v for v in std], dtype=torch.float32).view(1, -1, 1, 1)
    bias = torch.tensor([-a / v for a, v in zip(mean, std)], dtype=torch.float32).view(1, -1, 1, 1)
    return gain.to(device), bias.to(device)


def normalize_into(x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = x * gain + bias`` per channel (see :func:`normalize_constants`), written into ``out``: any float dtype
    and memory format (e.g. bf16, channels-last) in one pass."""
    if out.device.type == "cpu":  # three passes beat one broadcasting, type-promoting addcmul there (7x)
        if out.dtype == torch.float32:
            return out.copy_(x).mul_(gain).add_(bias)
        return out.copy_(torch.empty(out.shape, dtype=torch.float32).copy_(x).mul_(gain).add_(bias))
    return torch.addcmul(bias, x, gain, out=out)  # uint8 or float x; the math runs in float32
