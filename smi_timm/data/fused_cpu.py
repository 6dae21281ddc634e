"""Fused CPU kernels of the colour stage of the CPU two-view path, compiled with numba.

One augmented row (one view of one image) is three passes over a float32 scratch image that stays in the core's
cache, instead of the dozens of whole-tensor torch ops of the same formulas (:mod:`smi_timm.data.ops`):

* :func:`colour_row`: uint8 -> float in [0, 1], the four colour-jitter steps in the row's order, grayscale. Each
  step is one vectorised loop over the pixels; contrast first sums the grey image (the mean grey level is its target).
* :func:`blur_row`: the separable Gaussian blur with reflect padding, the kernel of ``sigma`` trimmed to
  ``ceil(4 * sigma)`` taps each side (renormalised; the Gaussian's mass beyond is < 6e-5, below the uint8 rounding).
* :func:`finish_row`: solarize, ``round(255 * x)`` (half to even, as ``torch.round``) and the uint8 store into the
  row's place in the output batch.

:func:`normalize_rows` is the normalisation where batches are delivered (one pass instead of three).

The formulas are those of :mod:`smi_timm.data.ops` in the same float32 order (the tests compare the two paths);
sums run in float64. FFCV compiles its augmentations with numba in the same way. Kernels are compiled on first use
and cached on disk (numba's ``cache=True``), so a loader worker compiles nothing after the first run on a machine.
Import this module only where numba is installed (:data:`smi_timm.data.pipeline.FUSED_AVAILABLE` says so).
"""
from __future__ import annotations

import math

import numba
import numpy as np

from . import ops

__all__ = ["colour_row", "blur_row", "finish_row", "normalize_rows", "blur_radius"]

_F = np.float32
_ZERO, _ONE, _INV255, _SIX = _F(0.0), _F(1.0), _F(1.0 / 255.0), _F(6.0)
_W0, _W1, _W2 = (_F(w) for w in ops.GRAY_WEIGHTS)  # ITU-R 601-2 luma
_TINY = _F(1e-12)
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = ops.BRIGHTNESS, ops.CONTRAST, ops.SATURATION, ops.HUE

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)
_jit_sum = numba.njit(cache=True, nogil=True, boundscheck=False, fastmath={"reassoc"})  # a sum in any order


@_jit
def _clamp01(v):
    return min(max(v, _ZERO), _ONE)


@_jit
def _to_float(src, buf):
    """uint8 pixels (P, 3), channels last (as the uint8 resize writes them fastest) -> float planes (3, P)."""
    r, g, b = buf[0], buf[1], buf[2]
    for i in range(src.shape[0]):
        r[i] = _F(src[i, 0]) * _INV255
        g[i] = _F(src[i, 1]) * _INV255
        b[i] = _F(src[i, 2]) * _INV255


@_jit_sum
def _gray_sum(buf):
    r, g, b = buf[0], buf[1], buf[2]
    total = 0.0
    for i in range(r.shape[0]):
        total += np.float64(r[i] * _W0 + g[i] * _W1 + b[i] * _W2)
    return total


@_jit
def _affine(buf, f, add):
    """``clamp(x * f + add)`` on every channel: brightness (add 0) and contrast (add = mean grey * (1 - f))."""
    for c in range(3):
        d = buf[c]
        for i in range(d.shape[0]):
            d[i] = _clamp01(d[i] * f + add)


@_jit
def _saturation(buf, f):
    """``clamp(x + (1 - f) * (gray - x))`` (``lerp`` towards the grey image)."""
    r, g, b = buf[0], buf[1], buf[2]
    w = _ONE - f
    for i in range(r.shape[0]):
        y = r[i] * _W0 + g[i] * _W1 + b[i] * _W2
        r[i] = _clamp01(r[i] + w * (y - r[i]))
        g[i] = _clamp01(g[i] + w * (y - g[i]))
        b[i] = _clamp01(b[i] + w * (y - b[i]))


@_jit
def _hue_channel(h, offset, span, lo):
    k = h + offset
    k = k - _SIX if k >= _F(4.0) else k
    return lo + span * _clamp01(abs(k) - _ONE)


@_jit
def _hue(buf, shift):
    """Exact HSV hue rotation in closed form (:func:`smi_timm.data.ops.adjust_hue`)."""
    r, g, b = buf[0], buf[1], buf[2]
    s6 = shift * _SIX
    for i in range(r.shape[0]):
        R, G, B = r[i], g[i], b[i]
        hi = max(max(R, G), B)
        lo = min(min(R, G), B)
        span = hi - lo
        inv = _ONE / max(span, _TINY)
        # selects, not branches, so that the loop vectorises; red wins ties, then green
        h = (R - G) * inv + _F(4.0)
        h = (B - R) * inv + _F(2.0) if hi == G else h
        h = (G - B) * inv if hi == R else h
        h = h + s6
        h = h - _SIX * np.floor(h / _SIX)  # np.floor stays float (math.floor returns an int)
        r[i] = _hue_channel(h, _F(3.0), span, lo)
        g[i] = _hue_channel(h, _ONE, span, lo)
        b[i] = _hue_channel(h, _F(-1.0), span, lo)


@_jit
def _grayscale(buf):
    r, g, b = buf[0], buf[1], buf[2]
    for i in range(r.shape[0]):
        y = r[i] * _W0 + g[i] * _W1 + b[i] * _W2
        r[i] = y
        g[i] = y
        b[i] = y


@_jit
def colour_row(src, buf, kinds, factors, hue, gray):
    """One row's colour stage: uint8 (P, 3) ``src`` -> float32 (3, P) ``buf`` in [0, 1], then the jitter steps
    ``kinds`` (op codes of :mod:`smi_timm.data.ops`; others are no-ops) with ``factors``, the hue shift ``hue``, and
    grayscale where ``gray``."""
    _to_float(src, buf)
    for s in range(kinds.shape[0]):
        k, f = kinds[s], factors[s]
        if k == _BRIGHTNESS:
            _affine(buf, f, _ZERO)
        elif k == _CONTRAST:
            mean = _F(_gray_sum(buf) / buf.shape[1])
            _affine(buf, f, mean * (_ONE - f))
        elif k == _SATURATION:
            _saturation(buf, f)
        elif k == _HUE:
            _hue(buf, hue)
    if gray:
        _grayscale(buf)


@_jit
def _reflect(i, n):
    """Index ``i`` reflected into [0, n) without repeating the edge (``F.pad(mode="reflect")``), any distance."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i = i % period
    return period - i if i > n - 1 else i


def blur_radius(sigma: float, kernel_size: int) -> int:
    """Taps each side of the trimmed kernel: ``ceil(4 * sigma)``, at most the full kernel's ``kernel_size // 2``."""
    return min(math.ceil(4.0 * float(sigma)), kernel_size // 2)


@_jit
def blur_row(buf, tmp, line, size, sigma, radius):
    """Separable Gaussian blur of the (3, size * size) float image ``buf``, in place (``tmp``: same shape, ``line``:
    at least ``size + 2 * radius`` floats of scratch): along rows, then along columns, reflect padding."""
    taps = 2 * radius + 1
    w = np.empty(taps, dtype=np.float32)
    total = 0.0
    for t in range(taps):
        d = (t - radius) / sigma
        v = math.exp(-0.5 * d * d)
        w[t] = v
        total += v
    for t in range(taps):
        w[t] = _F(w[t] / total) if w[t] / total >= 1e-12 else _ZERO
    for c in range(3):
        src, dst = buf[c], tmp[c]
        for y in range(size):  # along the row: a reflect-padded copy, then one contiguous multiply-add per tap
            row = src[y * size:(y + 1) * size]
            out = dst[y * size:(y + 1) * size]
            for j in range(size):
                line[radius + j] = row[j]
            for j in range(radius):  # the borders
                line[j] = row[_reflect(j - radius, size)]
                line[radius + size + j] = row[_reflect(size + j, size)]
            for x in range(size):
                out[x] = w[radius] * line[radius + x]
            for t in range(radius):  # the kernel is symmetric: one weight for the two taps t and taps - 1 - t
                wt, left, right = w[t], line[t:t + size], line[taps - 1 - t:taps - 1 - t + size]
                for x in range(size):
                    out[x] += wt * (left[x] + right[x])
        # along the column: whole rows at reflected row indices. Row slices, not offsets into the plane: indices
        # that numba cannot prove non-negative get a wrap-around check, which stops the loop from vectorising.
        for y in range(size):
            out = src[y * size:(y + 1) * size]
            centre = dst[y * size:(y + 1) * size]
            for x in range(size):
                out[x] = w[radius] * centre[x]
            for t in range(radius):
                a, b = _reflect(y + t - radius, size) * size, _reflect(y + radius - t, size) * size
                wt, up, down = w[t], dst[a:a + size], dst[b:b + size]
                for x in range(size):
                    out[x] += wt * (up[x] + down[x])


@_jit
def normalize_rows(src, gain, bias, out):
    """``out = src * gain[c] + bias[c]`` per channel: uint8 (n, 3, P) -> float32 (n, 3, P), one pass (the CPU
    path's normalisation where batches are delivered, :class:`smi_timm.data.pipeline.FinishUint8`)."""
    for n in range(src.shape[0]):
        for c in range(3):
            s, d, k, a = src[n, c], out[n, c], gain[c], bias[c]
            for i in range(s.shape[0]):
                d[i] = _F(s[i]) * k + a


@_jit
def finish_row(buf, out, solarize, threshold):
    """Solarize (values ``>= threshold`` -> ``1 - x``) where ``solarize``, then ``round(255 * x)`` into uint8
    ``out`` (3, P)."""
    for c in range(3):
        s, d = buf[c], out[c]
        for i in range(s.shape[0]):
            v = s[i]
            if solarize and v >= threshold:
                v = _ONE - v
            v = np.rint(v * _F(255.0))
            d[i] = np.uint8(min(max(v, _ZERO), _F(255.0)))
