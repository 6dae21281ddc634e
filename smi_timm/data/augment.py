"""Two-view augmentations for self-supervised pretraining and the deterministic eval transform.

The recipe is the one of BYOL (Grill et al., 2020), reused unchanged by Barlow Twins (Zbontar et al., 2021):

====================  ==============================================  =========  =========
step                  parameters                                      view a     view b
====================  ==============================================  =========  =========
RandomResizedCrop     scale (0.08, 1), ratio (3/4, 4/3), bicubic      always     always
horizontal flip                                                       p = 0.5    p = 0.5
ColorJitter           brightness 0.4, contrast 0.4, saturation 0.2,   p = 0.8    p = 0.8
                      hue 0.1, random order
grayscale                                                             p = 0.2    p = 0.2
Gaussian blur         sigma U(0.1, 2), kernel 23 px at 224 px         p = 1.0    p = 0.1
solarize              threshold 128 / 255                             p = 0.0    p = 0.2
normalise             ImageNet mean / std                             always     always
====================  ==============================================  =========  =========

The ``"cifar"`` preset (for 32x32 images) uses crop scale (0.2, 1) and no blur.

Two implementations of the same distribution are provided:

* :class:`BatchTwoViewAugment` (``backend="batched"``, the default of the loaders): crops and resizes each uint8
  image on its own (``torch.nn.functional.interpolate``, bicubic with antialiasing), stacks the crops and applies
  flip, colour jitter (per-sample factors and order), grayscale, blur (per-sample sigma, one grouped convolution),
  solarize and normalisation to the whole batch at once. About 5x faster than per-sample transforms at 32 px.
* :func:`v2_view_transform` (``backend="v2"``): the per-sample reference pipeline built from
  ``torchvision.transforms.v2``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

# ITU-R 601-2 luma weights, as used by torchvision's rgb_to_grayscale.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of a two-view augmentation. ``*_p`` pairs are (view a, view b) probabilities."""

    name: str = "custom"
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    crop_ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: Tuple[float, float] = (1.0, 0.1)
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1  # kernel size = nearest odd integer >= 3 to this fraction of the image size
    solarize_p: Tuple[float, float] = (0.0, 0.2)
    solarize_threshold: float = 128.0 / 255.0
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD


_BYOL = AugmentConfig(name="byol")
PRESETS = {
    "byol": _BYOL,
    "barlow": replace(_BYOL, name="barlow"),  # Barlow Twins uses the BYOL recipe unchanged
    "cifar": replace(_BYOL, name="cifar", crop_scale=(0.2, 1.0), blur_p=(0.0, 0.0)),
}


def get_augment_config(augment: Union[str, AugmentConfig]) -> AugmentConfig:
    """Return the :class:`AugmentConfig` for a preset name (``"byol"``, ``"barlow"``, ``"cifar"``) or a config."""
    if isinstance(augment, AugmentConfig):
        return augment
    try:
        return PRESETS[str(augment).lower()]
    except KeyError:
        raise ValueError(f"unknown augment preset {augment!r}; choose one of {sorted(PRESETS)} or pass an AugmentConfig") from None


def blur_kernel_size(image_size: int, frac: float = 0.1) -> int:
    """Odd Gaussian-blur kernel size for an image size (23 at 224 px, as in BYOL)."""
    k = int(round(frac * image_size))
    if k % 2 == 0:
        k += 1
    return max(3, k)


# ---------------------------------------------------------------------------------------------------------------------
# Reference per-sample pipeline (torchvision.transforms.v2)
# ---------------------------------------------------------------------------------------------------------------------


def v2_view_transform(augment: Union[str, AugmentConfig], image_size: int, view: int):
    """Per-sample ``torchvision.transforms.v2`` pipeline of one view (0 = a, 1 = b): uint8 CHW -> normalised float."""
    from torchvision.transforms import v2

    cfg = get_augment_config(augment)
    ops = [
        v2.RandomResizedCrop(
            image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio,
            interpolation=v2.InterpolationMode.BICUBIC, antialias=True,
        ),
        v2.RandomHorizontalFlip(p=cfg.flip_p),
        v2.RandomApply([v2.ColorJitter(*cfg.jitter)], p=cfg.jitter_p),
        v2.RandomGrayscale(p=cfg.grayscale_p),
    ]
    if cfg.blur_p[view] > 0:
        k = blur_kernel_size(image_size, cfg.blur_kernel_frac)
        ops.append(v2.RandomApply([v2.GaussianBlur(k, sigma=cfg.blur_sigma)], p=cfg.blur_p[view]))
    if cfg.solarize_p[view] > 0:
        ops.append(v2.RandomSolarize(threshold=round(cfg.solarize_threshold * 255), p=cfg.solarize_p[view]))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg.mean), list(cfg.std))]
    return v2.Compose(ops)


class V2TwoViewAugment:
    """Two views per image with the per-sample v2 pipelines; same call signature as :class:`BatchTwoViewAugment`.

    Randomness comes from torch's global generator (seeded per worker and epoch by the loader).
    """

    def __init__(self, augment: Union[str, AugmentConfig], image_size: int):
        self.config = get_augment_config(augment)
        self.image_size = int(image_size)
        self.views = (v2_view_transform(self.config, image_size, 0), v2_view_transform(self.config, image_size, 1))

    def __call__(self, images: Sequence[torch.Tensor], generator: Optional[torch.Generator] = None):
        a = torch.stack([self.views[0](x) for x in images])
        b = torch.stack([self.views[1](x) for x in images])
        return a, b


# ---------------------------------------------------------------------------------------------------------------------
# Batched pipeline
# ---------------------------------------------------------------------------------------------------------------------


def _uniform(n: int, lo: float, hi: float, g: Optional[torch.Generator]) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def sample_crop_boxes(
    heights: torch.Tensor, widths: torch.Tensor, scale: Tuple[float, float], ratio: Tuple[float, float],
    generator: Optional[torch.Generator] = None, tries: int = 10,
) -> torch.Tensor:
    """RandomResizedCrop boxes ``(top, left, h, w)`` for a batch of image sizes, shape (N, 4), int64.

    Same rule as torchvision: up to ``tries`` draws of area fraction U(scale) and log-uniform aspect ratio; the first
    box that fits wins; otherwise a centre crop with the aspect ratio clamped to ``ratio``.
    """
    n = heights.numel()
    H = heights.double().view(n, 1)
    W = widths.double().view(n, 1)
    area = H * W
    target = area * (torch.rand(n, tries, generator=generator, dtype=torch.float64) * (scale[1] - scale[0]) + scale[0])
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    r = torch.exp(torch.rand(n, tries, generator=generator, dtype=torch.float64) * (log_r[1] - log_r[0]) + log_r[0])
    w = torch.round(torch.sqrt(target * r))
    h = torch.round(torch.sqrt(target / r))
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)
    any_ok = ok.any(dim=1)
    w_sel = torch.gather(w, 1, first).squeeze(1)
    h_sel = torch.gather(h, 1, first).squeeze(1)
    # Fallback: centre crop with clamped aspect ratio.
    Hf, Wf = H.squeeze(1), W.squeeze(1)
    in_ratio = Wf / Hf
    fb_w = torch.where(in_ratio < ratio[0], Wf, torch.where(in_ratio > ratio[1], torch.round(Hf * ratio[1]), Wf))
    fb_h = torch.where(in_ratio < ratio[0], torch.round(Wf / ratio[0]), Hf)
    w_sel = torch.where(any_ok, w_sel, fb_w)
    h_sel = torch.where(any_ok, h_sel, fb_h)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.where(any_ok, torch.floor(u[:, 0] * (Hf - h_sel + 1)), torch.div(Hf - h_sel, 2, rounding_mode="floor"))
    left = torch.where(any_ok, torch.floor(u[:, 1] * (Wf - w_sel + 1)), torch.div(Wf - w_sel, 2, rounding_mode="floor"))
    return torch.stack([top, left, h_sel, w_sel], dim=1).long()


_UINT8_BICUBIC_AA: Optional[bool] = None


def _resize_uint8(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bicubic antialiased resize of a uint8 (1, C, h, w) tensor.

    Returns uint8 where torch has the uint8 kernel (CPU, torch >= 2.1), else float32 in [0, 255] (unclamped).
    """
    global _UINT8_BICUBIC_AA
    if _UINT8_BICUBIC_AA is not False:
        try:
            # The aten op directly: F.interpolate's Python checks cost as much as the kernel on 32 px images.
            out = torch.ops.aten._upsample_bicubic2d_aa(x, list(size), False)
            _UINT8_BICUBIC_AA = True
            return out
        except (RuntimeError, NotImplementedError, AttributeError):
            try:
                out = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
                return out
            except (RuntimeError, NotImplementedError):  # older torch: no uint8 bicubic kernel
                _UINT8_BICUBIC_AA = False
    return F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False)


def crop_resize_batch(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int,
                      flips: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Crop ``boxes[i]`` out of ``images[i]`` (uint8 CHW), mirror it where ``flips[i]``, resize to ``size`` x ``size``.

    Returns float (N, 3, S, S) in [0, 1]. Mirroring the small uint8 crop before the (mirror-symmetric) resize is the
    same as mirroring the output, and cheaper.
    """
    out = torch.empty(len(images), 3, size, size, dtype=torch.float32)
    flip_list = flips.tolist() if flips is not None else [False] * len(images)
    clamp = False
    for i, (img, box, flip) in enumerate(zip(images, boxes.tolist(), flip_list)):
        t, l, h, w = box
        crop = img[:, t:t + h, l:l + w]
        if flip:
            crop = crop.flip(-1)
        if h == size and w == size:
            out[i].copy_(crop)
        else:
            r = _resize_uint8(crop.unsqueeze(0), (size, size))
            clamp = clamp or r.dtype != torch.uint8
            out[i].copy_(r[0])
    if clamp:
        out.clamp_(0, 255)
    return out.div_(255.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (x * f + other * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), factor)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Shift hue by ``factor`` (fraction of a turn, per sample) in HSV space; x in [0, 1], shape (N, 3, H, W).

    Same result as torchvision's ``adjust_hue`` (RGB -> HSV, shift, HSV -> RGB), written with closed-form sector
    arithmetic so that it vectorises over the batch.
    """
    maxc, argmax = x.max(dim=1)
    minc = x.amin(dim=1)
    delta = maxc - minc  # = v * s
    r, g, b = x.unbind(1)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(argmax == 0, (g - b) / safe, torch.where(argmax == 1, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = torch.where(delta > 0, h, torch.zeros_like(h))  # hue in [-1, 5) sixths of a turn
    h6 = torch.remainder(h + 6.0 * factor.view(-1, 1, 1), 6.0)
    out = torch.empty_like(x)
    for c, n in enumerate((5.0, 3.0, 1.0)):  # R, G, B
        k = torch.remainder(h6 + n, 6.0)
        t = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.sub(maxc, delta * t, out=out[:, c])
    return out


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


@dataclass
class ViewParams:
    """Random parameters of one view for a batch of N images (all tensors have first dimension N)."""

    boxes: torch.Tensor  # (N, 4) int64 top, left, height, width
    flip: torch.Tensor  # (N,) bool
    jitter: torch.Tensor  # (N,) bool
    jitter_factors: torch.Tensor  # (N, 4) brightness, contrast, saturation, hue
    jitter_order: torch.Tensor  # (N, 4) int64, a permutation of 0..3 per sample
    gray: torch.Tensor  # (N,) bool
    blur: torch.Tensor  # (N,) bool
    blur_sigma: torch.Tensor  # (N,)
    solarize: torch.Tensor  # (N,) bool

    def slice(self, start: int, stop: int) -> "ViewParams":
        return ViewParams(**{k: v[start:stop] for k, v in self.__dict__.items()})


def draw_view_params(cfg: AugmentConfig, view: int, heights: torch.Tensor, widths: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> ViewParams:
    n = heights.numel()
    boxes = sample_crop_boxes(heights, widths, cfg.crop_scale, cfg.crop_ratio, generator)
    u = torch.rand(n, 5, generator=generator)
    bri, con, sat, hue = cfg.jitter
    factors = torch.stack([
        _uniform(n, max(0.0, 1 - bri), 1 + bri, generator),
        _uniform(n, max(0.0, 1 - con), 1 + con, generator),
        _uniform(n, max(0.0, 1 - sat), 1 + sat, generator),
        _uniform(n, -hue, hue, generator),
    ], dim=1)
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)
    sigma = _uniform(n, cfg.blur_sigma[0], cfg.blur_sigma[1], generator)
    return ViewParams(
        boxes=boxes, flip=u[:, 0] < cfg.flip_p, jitter=u[:, 1] < cfg.jitter_p, jitter_factors=factors,
        jitter_order=order, gray=u[:, 2] < cfg.grayscale_p, blur=u[:, 3] < cfg.blur_p[view], blur_sigma=sigma,
        solarize=u[:, 4] < cfg.solarize_p[view],
    )


def _rows(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask).squeeze(1)


def color_jitter_(x: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                  enabled: Sequence[bool] = (True, True, True, True)) -> torch.Tensor:
    """ColorJitter on the rows where ``apply``: per-sample factors, the 4 ops in a per-sample order ``order``."""
    if not bool(apply.any()):
        return x
    for step in range(4):
        for op in range(4):
            if not enabled[op]:
                continue
            idx = _rows(apply & (order[:, step] == op))
            if idx.numel() == x.shape[0]:
                x = _JITTER_OPS[op](x, factors[:, op])
            elif idx.numel():
                x[idx] = _JITTER_OPS[op](x[idx], factors[idx, op])
    return x


def grayscale_(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    idx = _rows(mask)
    if idx.numel():
        x[idx] = _gray(x[idx]).expand(-1, 3, -1, -1)
    return x


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels, shape (N, kernel_size), one per sigma (as torchvision builds them)."""
    half = (kernel_size - 1) / 2
    coords = torch.linspace(-half, half, kernel_size)
    kern = torch.exp(-0.5 * (coords.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kern = kern / kern.sum(dim=1, keepdim=True)
    # Zero the far tail: below float32 resolution anyway, and denormal weights (small sigma) slow the
    # matrix products down tenfold on x86.
    return torch.where(kern < 1e-12, torch.zeros_like(kern), kern)


def _reflect_band(n: int, kern: torch.Tensor) -> torch.Tensor:
    """(m, n, n) matrices ``M`` with ``M[i] @ v`` = 1-D convolution of v (length n) with ``kern[i]``, reflect padding."""
    m, k = kern.shape
    src = torch.arange(n).view(n, 1) + torch.arange(k).view(1, k) - k // 2
    if n == 1:
        src = torch.zeros_like(src)
    else:  # reflect (edge not repeated), as often as needed for kernels longer than the image
        period = 2 * (n - 1)
        src = torch.remainder(src, period)
        src = torch.where(src > n - 1, period - src, src)
    band = torch.zeros(m, n, n, dtype=kern.dtype)
    band.scatter_add_(2, src.expand(m, n, k), kern.view(m, 1, k).expand(m, n, k))
    return band


def gaussian_blur_(x: torch.Tensor, mask: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur (reflect padding) of the rows where ``mask``, with a per-sample sigma.

    Each 1-D pass is a batched matrix product with a banded matrix (faster on CPU than a grouped convolution).
    """
    idx = _rows(mask)
    if idx.numel() == 0:
        return x
    hgt, wid = x.shape[-2:]
    kern = gaussian_kernels(sigma[idx], kernel_size)
    along_w = _reflect_band(wid, kern).transpose(1, 2).unsqueeze(1)  # (m, 1, W, W): rows @ M^T
    along_h = along_w if hgt == wid else _reflect_band(hgt, kern).transpose(1, 2).unsqueeze(1)
    sub = torch.matmul(x[idx], along_w)
    sub = torch.matmul(along_h.transpose(2, 3), sub)
    x[idx] = sub
    return x


def solarize_(x: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    idx = _rows(mask)
    if idx.numel():
        sub = x[idx]
        x[idx] = torch.where(sub >= threshold, 1.0 - sub, sub)
    return x


def normalize_(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


class BatchTwoViewAugment:
    """Batched two-view augmentation: ``(list of uint8 CHW images, generator) -> (view_a, view_b)`` float tensors.

    All random parameters of a batch are drawn first (from ``generator``); the pixel work then runs on chunks of
    ``chunk_size`` images so that the working set stays in cache at large image sizes. ``profile`` (a dict)
    accumulates CPU seconds per stage when given (used by the benchmark).
    """

    def __init__(self, augment: Union[str, AugmentConfig], image_size: int, chunk_size: Optional[int] = None):
        self.config = get_augment_config(augment)
        self.image_size = int(image_size)
        self.blur_kernel = blur_kernel_size(self.image_size, self.config.blur_kernel_frac)
        if chunk_size is None:  # about 1 MiB of float32 pixels per chunk
            chunk_size = max(1, (1 << 20) // (12 * self.image_size * self.image_size))
        self.chunk_size = int(chunk_size)
        self._jitter_enabled = tuple(s > 0 for s in self.config.jitter)

    def view(self, images: Sequence[torch.Tensor], view: int, generator: Optional[torch.Generator] = None,
             profile: Optional[dict] = None) -> torch.Tensor:
        cfg = self.config
        clock = _Clock(profile)
        hs = torch.tensor([im.shape[-2] for im in images])
        ws = torch.tensor([im.shape[-1] for im in images])
        params = draw_view_params(cfg, view, hs, ws, generator)
        clock("params")
        x = crop_resize_batch(images, params.boxes, self.image_size, params.flip)
        clock("crop_resize_flip")
        for start in range(0, len(images), self.chunk_size):
            stop = min(start + self.chunk_size, len(images))
            p = params.slice(start, stop)
            xc = x[start:stop]
            xc = color_jitter_(xc, p.jitter, p.jitter_factors, p.jitter_order, self._jitter_enabled)
            clock("color_jitter")
            xc = grayscale_(xc, p.gray)
            clock("grayscale")
            if cfg.blur_p[view] > 0:
                xc = gaussian_blur_(xc, p.blur, p.blur_sigma, self.blur_kernel)
                clock("blur")
            if cfg.solarize_p[view] > 0:
                xc = solarize_(xc, p.solarize, cfg.solarize_threshold)
                clock("solarize")
            x[start:stop] = normalize_(xc, cfg.mean, cfg.std)
            clock("normalize")
        return x

    def __call__(self, images: Sequence[torch.Tensor], generator: Optional[torch.Generator] = None,
                 profile: Optional[dict] = None):
        return self.view(images, 0, generator, profile), self.view(images, 1, generator, profile)


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


def make_two_view_augment(augment: Union[str, AugmentConfig], image_size: int, backend: str = "batched"):
    """Build the two-view augmentation: ``backend`` ``"batched"`` (fast, default) or ``"v2"`` (per-sample reference)."""
    if backend == "batched":
        return BatchTwoViewAugment(augment, image_size)
    if backend == "v2":
        return V2TwoViewAugment(augment, image_size)
    raise ValueError(f"unknown augmentation backend {backend!r}; use 'batched' or 'v2'")


# ---------------------------------------------------------------------------------------------------------------------
# Eval transform
# ---------------------------------------------------------------------------------------------------------------------


def default_crop_pct(image_size: int) -> float:
    """Centre-crop fraction used by the eval transform: 0.875 (224 from 256) from 128 px up, else 1.0 (CIFAR-sized)."""
    return 0.875 if image_size >= 128 else 1.0


class EvalTransform:
    """Deterministic eval transform: resize the shorter side to ``image_size / crop_pct`` (bicubic, antialiased),
    centre-crop ``image_size``, scale to [0, 1] and normalise. Input uint8 CHW, output float CHW."""

    def __init__(self, image_size: int, crop_pct: Optional[float] = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.image_size = int(image_size)
        self.crop_pct = default_crop_pct(self.image_size) if crop_pct is None else float(crop_pct)
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.resize_size = int(math.floor(self.image_size / self.crop_pct + 1e-6))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        short = min(h, w)
        if short != self.resize_size:
            scale = self.resize_size / short
            nh, nw = max(self.resize_size, round(h * scale)), max(self.resize_size, round(w * scale))
            x = _resize_uint8(img.unsqueeze(0), (nh, nw))[0].float().clamp_(0, 255)
        else:
            x = img.float()
            nh, nw = h, w
        s = self.image_size
        top, left = (nh - s) // 2, (nw - s) // 2
        x = x[:, top:top + s, left:left + s]
        return (x / 255.0 - self.mean) / self.std
