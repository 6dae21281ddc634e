"""Augmentation ops at fixed parameters equal torchvision v2's, and the two fast pipelines agree with each other.

Tolerances: the float colour ops, grayscale, solarize and the separable blur match ``torchvision.transforms.v2.
functional`` to 1e-5 (float32 rounding); the batched crop + resize matches ``resized_crop`` (bicubic, antialiased)
to 2e-3 on the 0..255 scale; the CPU path's uint8 resize rounds, so it is within 1 grey level; the CPU and device
pipelines (same parameters; one resizes in uint8 and rounds its output, and colour jitter amplifies those roundings)
agree within 4 grey levels, 0.6 on average.
"""
import math

import pytest
import torch
from torchvision.transforms.v2 import functional as VF

from smi_timm.data import IMAGENET_MEAN, IMAGENET_STD, PRESETS, get_augment_config, ops
from smi_timm.data.augment import (
    EvalTransform,
    V2TwoViewAugment,
    blur_kernel_size,
    draw_batch_params,
    draw_view_params,
    sample_crop_boxes,
)
from smi_timm.data.pipeline import CPUTwoView, DeviceTwoView, FinishUint8, crop_resize_rows, plan_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 24, 20, generator=g)
    x[0, 1] = x[0, 0]  # ties between channels
    x[1] = 0.5  # grey
    x[2, :, :4] = 1.0  # saturated highlights
    return x


def _per_row(ref, x, values):
    return torch.stack([ref(x[i], float(values[i])) for i in range(len(values))])


def test_colour_ops_match_torchvision(batch):
    f = torch.tensor([0.6, 0.9, 1.0, 1.2, 1.4, 0.0])
    h = torch.tensor([-0.1, -0.03, 0.0, 0.05, 0.1, 0.5])
    for ours, ref, fac in ((ops.adjust_brightness, VF.adjust_brightness, f),
                           (ops.adjust_contrast, VF.adjust_contrast, f),
                           (ops.adjust_saturation, VF.adjust_saturation, f),
                           (ops.adjust_hue, VF.adjust_hue, h)):
        got = ours(batch.clone(), fac)
        assert torch.allclose(got, _per_row(ref, batch, fac), atol=1e-5), ours.__name__
    # hue written into its own input
    y = batch.clone()
    ops.adjust_hue(y, h, out=y)
    assert torch.allclose(y, _per_row(VF.adjust_hue, batch, h), atol=1e-5)


def test_blend_step_applies_each_rows_op(batch):
    """One masked step does brightness / contrast / saturation per row and leaves hue / no-op rows alone."""
    kind = torch.tensor([ops.BRIGHTNESS, ops.CONTRAST, ops.SATURATION, ops.HUE, ops.NO_OP, ops.CONTRAST])
    f = torch.tensor([1.3, 0.7, 1.4, 1.0, 1.0, 1.2])
    got = ops.blend_step(batch.clone(), kind, f)
    refs = {ops.BRIGHTNESS: VF.adjust_brightness, ops.CONTRAST: VF.adjust_contrast,
            ops.SATURATION: VF.adjust_saturation}
    for i, k in enumerate(kind.tolist()):
        want = refs[k](batch[i], float(f[i])) if k in refs else batch[i]
        assert torch.allclose(got[i], want, atol=1e-5), i


def test_blur_grayscale_solarize_match_torchvision(batch):
    sigma = torch.tensor([0.3, 1.0, 1.5, 2.0, 0.1, 0.7])
    got = ops.gaussian_blur(batch, sigma, 9)
    assert torch.allclose(got, torch.stack([VF.gaussian_blur(batch[i], [9, 9], [float(sigma[i])] * 2)
                                            for i in range(6)]), atol=1e-5)
    nhwc = ops.gaussian_blur(batch, sigma, 9, memory_format=torch.channels_last)
    assert torch.allclose(nhwc, got, atol=1e-6)
    # trimmed to 4 sigma: within the Gaussian's tail mass (6e-5)
    trimmed = ops.gaussian_blur(batch, sigma * 0 + 1.0, 23, radius=4)
    full = torch.stack([VF.gaussian_blur(batch[i], [23, 23], [1.0, 1.0]) for i in range(6)])
    assert (trimmed - full).abs().max() < 1e-4
    mask = torch.tensor([True, False, True, True, False, True])
    got = ops.grayscale_where(batch, mask)
    assert torch.allclose(got[0], VF.rgb_to_grayscale(batch[0], num_output_channels=3), atol=1e-6)
    assert torch.equal(got[1], batch[1])
    got = ops.solarize_where(batch, mask, 0.5)
    assert torch.allclose(got[0], VF.solarize(batch[0], 0.5)) and torch.equal(got[1], batch[1])
    # kernels longer than the image still work (reflection repeats)
    tiny = ops.gaussian_blur(torch.rand(2, 3, 4, 4), torch.tensor([2.0, 2.0]), 23)
    assert torch.isfinite(tiny).all() and tiny.shape == (2, 3, 4, 4)


@pytest.mark.parametrize("box,size", [((3, 5, 40, 33), 24), ((0, 0, 50, 70), 32), ((10, 10, 12, 9), 32),
                                      ((0, 0, 50, 70), 96), ((7, 2, 41, 60), 17)])
def test_batched_crop_resize_matches_resized_crop(box, size):
    """Crop windows gathered from a flat buffer + two resampling matrices = torchvision's resized_crop."""
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (3, 50, 70), generator=g, dtype=torch.uint8)
    t, left, h, w = box
    flat = torch.cat([img.reshape(-1), torch.zeros(w + 8, dtype=torch.uint8)])
    crops = ops.crop_windows(flat, torch.tensor([t * 70 + left]), torch.tensor([70]), torch.tensor([3500]),
                             torch.tensor([h]), h + 3, w + 8)
    wy = ops.aa_bicubic_weights(torch.tensor([h]), size, h + 3)
    wx = ops.aa_bicubic_weights(torch.tensor([w]), size, w + 8)
    got = ops.resample(crops, wy, wx)[0]
    want = VF.resized_crop(img.float(), t, left, h, w, [size, size], interpolation=VF.InterpolationMode.BICUBIC,
                           antialias=True)
    assert (got - want).abs().max() < 2e-3
    flipped = ops.resample(crops, wy, wx.flip(1))[0]
    assert torch.allclose(flipped, want.flip(-1), atol=2e-3)


def test_cpu_uint8_crop_resize_within_one_level():
    cfg = get_augment_config("byol")
    g = torch.Generator().manual_seed(2)
    imgs = [torch.randint(0, 256, (3, 40 + 9 * i, 60 - 5 * i), generator=g, dtype=torch.uint8) for i in range(4)]
    hw = torch.tensor([im.shape[1:] for im in imgs])
    plan = plan_rows(cfg, *draw_batch_params(cfg, hw[:, 0], hw[:, 1], seed=3))
    rows = crop_resize_rows(imgs, plan, 32)
    for r in range(8):
        t, left, h, w = plan.boxes[r].tolist()
        want = VF.resized_crop(imgs[int(plan.image[r])], t, left, h, w, [32, 32],
                               interpolation=VF.InterpolationMode.BICUBIC, antialias=True)
        if plan.flip[r]:
            want = want.flip(-1)
        assert (rows[r].int() - want.int()).abs().max() <= 1


def test_normalize_dtype_and_layout():
    u8 = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    gain, bias = ops.normalize_constants(IMAGENET_MEAN, IMAGENET_STD, "cpu", scale=1 / 255)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    want = (u8.float() / 255 - mean) / std
    for dtype, fmt, tol in ((torch.float32, torch.contiguous_format, 1e-5),
                            (torch.bfloat16, torch.channels_last, 1e-2)):
        out = torch.empty(4, 3, 5, 5, dtype=dtype, memory_format=fmt)
        ops.normalize_into(u8, gain, bias, out)
        assert out.is_contiguous(memory_format=fmt) and (out.float() - want).abs().max() < tol


def test_crop_boxes_valid_and_scaled():
    g = torch.Generator().manual_seed(1)
    n = 4000
    hs = torch.randint(20, 400, (n,), generator=g)
    ws = torch.randint(20, 400, (n,), generator=g)
    boxes = sample_crop_boxes(hs, ws, (0.08, 1.0), (3 / 4, 4 / 3), g)
    t, left, h, w = boxes.unbind(1)
    assert (t >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (t + h <= hs).all() and (left + w <= ws).all()
    frac = (h * w).double() / (hs * ws).double()
    assert frac.min() > 0.05 and frac.max() <= 1.0
    # extreme aspect ratio: the centre-crop fallback clamps the ratio
    b = sample_crop_boxes(torch.tensor([10]), torch.tensor([1000]), (0.9, 1.0), (3 / 4, 4 / 3), g)
    assert b[0, 2] == 10 and b[0, 3] == round(10 * 4 / 3)


def test_param_probabilities_and_presets():
    cfg = get_augment_config("byol")
    n = 20000
    g = torch.Generator().manual_seed(0)
    hs = torch.full((n,), 64)
    a = draw_view_params(cfg, 0, hs, hs, g)
    b = draw_view_params(cfg, 1, hs, hs, g)

    def close(mask, p):
        return abs(mask.float().mean().item() - p) < 0.015
    assert close(a.flip, 0.5) and close(a.jitter, 0.8) and close(a.gray, 0.2)
    assert close(a.blur, 1.0) and close(b.blur, 0.1) and close(a.solarize, 0.0) and close(b.solarize, 0.2)
    assert a.jitter_factors[:, 0].min() >= 0.6 and a.jitter_factors[:, 0].max() <= 1.4
    assert a.jitter_factors[:, 3].abs().max() <= 0.1
    assert sorted(a.jitter_order[0].tolist()) == [0, 1, 2, 3]
    cifar = PRESETS["cifar"]
    assert cifar.crop_scale == (0.2, 1.0) and cifar.blur_p == (0.0, 0.0)
    assert PRESETS["barlow"].blur_p == PRESETS["byol"].blur_p == (1.0, 0.1)
    assert blur_kernel_size(224) == 23


def test_plan_groups_rows():
    """Blurred rows first; each step's hue rows in contiguous runs; ``position`` inverts ``source``."""
    cfg = get_augment_config("byol")
    hw = torch.full((64,), 48)
    plan = plan_rows(cfg, *draw_batch_params(cfg, hw, hw, seed=5))
    blur = torch.cat([draw_batch_params(cfg, hw, hw, seed=5)[v].blur for v in (0, 1)])[plan.source]
    assert blur[:plan.n_blur].all() and not blur[plan.n_blur:].any()
    assert torch.equal(plan.source[plan.position], torch.arange(128))
    for step, runs in enumerate(plan.hue_runs):
        rows = sorted(r for a, b in runs for r in range(a, b))
        assert rows == (plan.kind[:, step] == ops.HUE).nonzero().flatten().tolist()


@pytest.mark.parametrize("preset,size", [("byol", 48), ("cifar", 32)])
def test_cpu_and_device_pipelines_agree(preset, size):
    """Same seed -> same parameters: the two implementations differ only by uint8 rounding in the CPU path."""
    cfg = get_augment_config(preset)
    g = torch.Generator().manual_seed(3)
    # smooth images: resampling differences stay at the rounding level
    imgs = []
    for i in range(10):
        small = torch.rand(1, 3, 6, 8, generator=g) * 255
        imgs.append(torch.nn.functional.interpolate(small, size=(40 + 3 * i, 56 - 2 * i), mode="bilinear",
                                                    align_corners=False)[0].round().to(torch.uint8))
    u8 = CPUTwoView(cfg, size)(imgs, seed=11)
    a, b = FinishUint8(cfg, "cpu")(u8)
    da, db = DeviceTwoView(cfg, size, "cpu")(imgs, list(range(10)), seed=11)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1) * 255
    for x, y in ((a, da), (b, db)):
        diff = (x - y).abs() * std
        assert diff.max() < 4.0 and diff.mean() < 0.6


def test_v2_reference_shapes():
    imgs = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8) for _ in range(3)]
    a, b = V2TwoViewAugment("byol", 40)(imgs)
    assert a.shape == b.shape == (3, 3, 40, 40) and a.dtype == torch.float32
    a, _ = V2TwoViewAugment("cifar", 32, normalize=False)(imgs)
    assert a.dtype == torch.uint8


def test_eval_transform():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    t = EvalTransform(32)
    assert t.crop_pct == 1.0
    out = t(img)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(out * std + mean, img.float() / 255, atol=1e-6)
    big = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    t = EvalTransform(224)
    assert t.crop_pct == 0.875 and t.resize_size == 256 and t(big).shape == (3, 224, 224)
    assert math.isclose(EvalTransform(64, crop_pct=0.5).resize_size, 128)
    with pytest.raises(ValueError):
        EvalTransform(32, crop_pct=0)
