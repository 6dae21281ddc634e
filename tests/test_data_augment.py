"""Batched augmentations agree with torchvision and draw the BYOL / Barlow Twins probabilities."""
import math

import pytest
import torch
from torchvision.transforms.v2 import functional as VF

from smi_timm.data import IMAGENET_MEAN, IMAGENET_STD, PRESETS, get_augment_config
from smi_timm.data.augment import (
    BatchTwoViewAugment,
    EvalTransform,
    V2TwoViewAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    crop_resize_batch,
    draw_view_params,
    gaussian_blur_,
    grayscale_,
    sample_crop_boxes,
    solarize_,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Small-tensor ops: intra-op threads only add overhead (the loaders run augmentation single-threaded too)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 24, 20, generator=g)
    x[0, 1] = x[0, 0]  # ties between channels
    x[1] = 0.5  # grey
    return x


def test_colour_ops_match_torchvision(batch):
    f = torch.tensor([0.6, 0.9, 1.0, 1.2, 1.4])
    h = torch.tensor([-0.1, -0.03, 0.0, 0.05, 0.1])
    for ours, ref, fac in ((adjust_brightness, VF.adjust_brightness, f), (adjust_contrast, VF.adjust_contrast, f),
                           (adjust_saturation, VF.adjust_saturation, f), (adjust_hue, VF.adjust_hue, h)):
        got = ours(batch.clone(), fac)
        want = torch.stack([ref(batch[i], float(fac[i])) for i in range(len(fac))])
        assert torch.allclose(got, want, atol=1e-5), ours.__name__


def test_blur_grayscale_solarize_match_torchvision(batch):
    mask = torch.tensor([True, False, True, True, False])
    sigma = torch.tensor([0.3, 1.0, 1.5, 2.0, 0.1])
    got = gaussian_blur_(batch.clone(), mask, sigma, 9)
    for i in range(5):
        want = VF.gaussian_blur(batch[i], [9, 9], [float(sigma[i])] * 2) if mask[i] else batch[i]
        assert torch.allclose(got[i], want, atol=1e-5)
    got = grayscale_(batch.clone(), mask)
    assert torch.allclose(got[0], VF.rgb_to_grayscale(batch[0], num_output_channels=3), atol=1e-6)
    assert torch.equal(got[1], batch[1])
    got = solarize_(batch.clone(), mask, 0.5)
    assert torch.allclose(got[0], VF.solarize(batch[0], 0.5)) and torch.equal(got[1], batch[1])
    # kernels longer than the image still work (reflection repeats)
    tiny = gaussian_blur_(torch.rand(2, 3, 4, 4), torch.tensor([True, True]), torch.tensor([2.0, 2.0]), 23)
    assert torch.isfinite(tiny).all()


def test_crop_boxes_valid_and_scaled():
    g = torch.Generator().manual_seed(1)
    n = 4000
    hs = torch.randint(20, 400, (n,), generator=g)
    ws = torch.randint(20, 400, (n,), generator=g)
    boxes = sample_crop_boxes(hs, ws, (0.08, 1.0), (3 / 4, 4 / 3), g)
    t, l, h, w = boxes.unbind(1)
    assert (t >= 0).all() and (l >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (t + h <= hs).all() and (l + w <= ws).all()
    frac = (h * w).double() / (hs * ws).double()
    assert frac.min() > 0.05 and frac.max() <= 1.0
    # same distribution as torchvision's RandomResizedCrop (which rejects crops that do not fit, favouring small ones)
    from torchvision.transforms import v2

    rrc = v2.RandomResizedCrop(32, scale=(0.08, 1.0))
    make_params = getattr(rrc, "make_params", None) or rrc._get_params
    for H, W in ((64, 64), (40, 120)):
        img = torch.zeros(3, H, W, dtype=torch.uint8)
        torch.manual_seed(0)
        ref = torch.tensor([(lambda p: p["height"] * p["width"])(make_params([img])) for _ in range(3000)]) / (H * W)
        ours = sample_crop_boxes(torch.full((3000,), H), torch.full((3000,), W), (0.08, 1.0), (3 / 4, 4 / 3), g)
        ours = (ours[:, 2] * ours[:, 3]).double() / (H * W)
        assert abs(ref.mean().item() - ours.mean().item()) < 0.03 and abs(ref.std().item() - ours.std().item()) < 0.03
    # extreme aspect ratio: the centre-crop fallback clamps the ratio
    b = sample_crop_boxes(torch.tensor([10]), torch.tensor([1000]), (0.9, 1.0), (3 / 4, 4 / 3), g)
    assert b[0, 2] == 10 and b[0, 3] == round(10 * 4 / 3)


def test_flip_before_resize_equals_flip_after():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    boxes = torch.tensor([[3, 5, 20, 17]])
    plain = crop_resize_batch([img], boxes, 48)
    flipped = crop_resize_batch([img], boxes, 48, torch.tensor([True]))
    assert torch.allclose(flipped, plain.flip(-1), atol=1.5 / 255)


def test_param_probabilities():
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


@pytest.mark.parametrize("preset,size", [("cifar", 32), ("cifar", 64), ("byol", 48)])
def test_two_view_batch(preset, size):
    imgs = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8) for _ in range(6)]
    imgs.append(torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8))  # mixed sizes are fine
    aug = BatchTwoViewAugment(preset, size)
    a, b = aug(imgs, torch.Generator().manual_seed(0))
    assert a.shape == b.shape == (7, 3, size, size) and a.dtype == torch.float32
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert (a >= lo.view(1, 3, 1, 1) - 1e-5).all() and (a <= hi.view(1, 3, 1, 1) + 1e-5).all()
    a2, _ = aug(imgs, torch.Generator().manual_seed(0))
    assert torch.equal(a, a2)
    ref = V2TwoViewAugment(preset, size)
    ra, rb = ref(imgs)
    assert ra.shape == a.shape


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
