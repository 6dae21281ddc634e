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

This module holds the recipe (:class:`AugmentConfig`, :data:`PRESETS`), the random parameters of a batch
(:func:`draw_view_params`, drawn per sample exactly as torchvision draws them), the per-sample reference pipeline
built from ``torchvision.transforms.v2`` (:func:`v2_view_transform`) and the deterministic eval transform. The pixel
work of the two fast implementations of the same distribution lives in :mod:`smi_timm.data.ops` and
:mod:`smi_timm.data.pipeline`: batched tensor ops run in the loader workers on the CPU, or on the accelerator in the
training process (see ``docs/data.md``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import DataError

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)


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
        raise DataError(f"unknown augment preset {augment!r}; choose one of {sorted(PRESETS)} "
                         "or pass an AugmentConfig") from None


def blur_kernel_size(image_size: int, frac: float = 0.1) -> int:
    """Odd Gaussian-blur kernel size for an image size (23 at 224 px, as in BYOL)."""
    k = int(round(frac * image_size))
    if k % 2 == 0:
        k += 1
    return max(3, k)


# ---------------------------------------------------------------------------------------------------------------------
# Reference per-sample pipeline (torchvision.transforms.v2)
# ---------------------------------------------------------------------------------------------------------------------


def v2_view_transform(augment: Union[str, AugmentConfig], image_size: int, view: int, normalize: bool = True):
    """Per-sample ``torchvision.transforms.v2`` pipeline of one view (0 = a, 1 = b): uint8 CHW -> normalised float
    (or uint8 before normalisation with ``normalize=False``)."""
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
    if normalize:
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg.mean), list(cfg.std))]
    return v2.Compose(ops)


class V2TwoViewAugment:
    """Two views per image with the per-sample v2 pipelines: ``(list of uint8 CHW images) -> (view_a, view_b)``,
    normalised float (or uint8 with ``normalize=False``).

    Randomness comes from torch's global generator (the loader seeds it per batch).
    """

    def __init__(self, augment: Union[str, AugmentConfig], image_size: int, normalize: bool = True):
        self.config = get_augment_config(augment)
        self.image_size = int(image_size)
        self.views = tuple(v2_view_transform(self.config, image_size, v, normalize) for v in (0, 1))

    def __call__(self, images: Sequence[torch.Tensor]):
        a = torch.stack([self.views[0](x) for x in images])
        b = torch.stack([self.views[1](x) for x in images])
        return a, b


# ---------------------------------------------------------------------------------------------------------------------
# Random parameters of a batch
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
    """Random parameters of view ``view`` (0 = a, 1 = b) for images of the given sizes, per sample as torchvision's
    transforms draw them: crop box, flip, whether and how to jitter (factors and a random order), grayscale, blur
    and its sigma, solarize."""
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


def batch_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    """Seed of the augmentation of batch ``batch`` of an epoch on a rank: a batch's random parameters depend only on
    these numbers, not on the batches produced before it (so a resumed epoch skips batches without drawing them)."""
    import numpy as np

    parts = [seed, epoch, rank, batch, 0xA116]
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def draw_batch_params(cfg: AugmentConfig, heights: torch.Tensor, widths: torch.Tensor,
                      seed: int) -> Tuple[ViewParams, ViewParams]:
    """Parameters of both views of a batch (view a first), from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return draw_view_params(cfg, 0, heights, widths, g), draw_view_params(cfg, 1, heights, widths, g)


# ---------------------------------------------------------------------------------------------------------------------
# uint8 resize (CPU)
# ---------------------------------------------------------------------------------------------------------------------


_UINT8_BICUBIC_AA: Optional[bool] = None


def _has_uint8_bicubic_aa() -> bool:
    """Whether this torch has the uint8 antialiased bicubic kernel (CPU, torch >= 2.1): probed once, on a tiny
    tensor, so that an error of one later call (a layout the kernel refuses) cannot switch it off for good."""
    global _UINT8_BICUBIC_AA
    if _UINT8_BICUBIC_AA is None:
        try:
            torch.ops.aten._upsample_bicubic2d_aa(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), [2, 2], False)
            _UINT8_BICUBIC_AA = True
        except (RuntimeError, NotImplementedError, AttributeError):
            _UINT8_BICUBIC_AA = False
    return _UINT8_BICUBIC_AA


def resize_uint8(x: torch.Tensor, size: Tuple[int, int], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bicubic antialiased resize of a uint8 (1, C, h, w) tensor to uint8 (1, C, *size), into ``out`` when given.

    Uses torch's uint8 kernel where it exists (CPU, torch >= 2.1; rounds like PIL), else resizes in float and rounds
    (also for a call the kernel refuses, e.g. planar input into a channels-last ``out``).
    """
    size = [int(size[0]), int(size[1])]
    if _has_uint8_bicubic_aa():
        try:
            # The aten op directly: F.interpolate's Python checks cost as much as the kernel on 32 px images.
            if out is None:
                return torch.ops.aten._upsample_bicubic2d_aa(x, size, False)
            return torch.ops.aten._upsample_bicubic2d_aa.out(x, size, False, None, None, out=out)
        except RuntimeError:
            pass
    res = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    res = res.round_().clamp_(0, 255).to(torch.uint8)
    return res if out is None else out.copy_(res)


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
            raise DataError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.resize_size = int(math.floor(self.image_size / self.crop_pct + 1e-6))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        short = min(h, w)
        if short != self.resize_size:
            scale = self.resize_size / short
            nh, nw = max(self.resize_size, round(h * scale)), max(self.resize_size, round(w * scale))
            x = resize_uint8(img.unsqueeze(0), (nh, nw))[0].float()
        else:
            x = img.float()
            nh, nw = h, w
        s = self.image_size
        top, left = (nh - s) // 2, (nw - s) // 2
        x = x[:, top:top + s, left:left + s]
        return (x / 255.0 - self.mean) / self.std
