"""The fused (numba) colour kernels of the CPU path against the torch ops they replace (:mod:`smi_timm.data.ops`).

Tolerances: each kernel matches its torch op to 2e-6 in [0, 1] (float32 rounding; sums run in float64 in one and
float32 in the other); the blur matches ``ops.gaussian_blur`` with the same trimmed kernel to 2e-6, also where the
kernel is longer than the image (reflect padding folded several times); whole batches of the fused and the torch
CPU path, with the same parameters, differ by at most one grey level (rounding of values within float32 error of a
half level, and the torch path trimming a group's kernels to the group's largest sigma), in under 1 % of the pixels.
"""
import numpy as np
import pytest
import torch

from smi_timm.data import get_augment_config, ops

fused_cpu = pytest.importorskip("smi_timm.data.fused_cpu")
from smi_timm.data.pipeline import FUSED_AVAILABLE, CPUTwoView  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _image(h, w, seed):
    """uint8 (3, h, w) with ties between channels, a grey patch and saturated highlights (the hue op's edge cases)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(3, h, w, generator=g) * 255).round().to(torch.uint8)
    x[1, : h // 3] = x[0, : h // 3]
    x[:, h // 2:, : w // 4] = 128
    x[:, -2:, :] = 255
    return x


def _torch_steps(x, kinds, factors, hue, gray):
    """The jitter steps with the torch ops, one row."""
    for k, f in zip(kinds, factors):
        f = torch.tensor([float(f)])
        if k == ops.BRIGHTNESS:
            x = ops.adjust_brightness(x, f)
        elif k == ops.CONTRAST:
            x = ops.adjust_contrast(x, f)
        elif k == ops.SATURATION:
            x = ops.adjust_saturation(x, f)
        elif k == ops.HUE:
            x = ops.adjust_hue(x, torch.tensor([hue]))
    return ops.grayscale_where(x, torch.tensor([gray]))


@pytest.mark.parametrize("size", [(17, 23), (32, 32), (5, 64)])
@pytest.mark.parametrize("kinds,hue,gray", [
    ((ops.HUE, ops.CONTRAST, ops.BRIGHTNESS, ops.SATURATION), 0.07, False),
    ((ops.SATURATION, ops.HUE, ops.NO_OP, ops.CONTRAST), -0.1, True),
    ((ops.NO_OP,) * 4, 0.0, False),
    ((ops.BRIGHTNESS, ops.SATURATION, ops.CONTRAST, ops.HUE), 0.5, False),
])
def test_colour_row_matches_torch_ops(size, kinds, hue, gray):
    h, w = size
    img = _image(h, w, seed=h * w)
    factors = np.array([1.4, 0.6, 1.2, 1.0], dtype=np.float32)
    buf = np.empty((3, h * w), dtype=np.float32)
    hwc = img.permute(1, 2, 0).contiguous().view(-1, 3).numpy()  # the rows are channels last
    fused_cpu.colour_row(hwc, buf, np.array(kinds, dtype=np.int64), factors, np.float32(hue), gray)
    ref = _torch_steps(img.float().unsqueeze(0) / 255, kinds, factors, hue, gray)[0]
    assert torch.allclose(torch.from_numpy(buf).view(3, h, w), ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("size,sigma,radius", [(24, 0.7, 3), (31, 2.0, 8), (6, 2.0, 8), (1, 1.0, 4), (9, 0.1, 1)])
def test_blur_row_matches_gaussian_blur(size, sigma, radius):
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))
    buf = x[0].reshape(3, -1).numpy().copy()
    tmp, line = np.empty_like(buf), np.empty(size + 2 * radius, dtype=np.float32)
    fused_cpu.blur_row(buf, tmp, line, size, np.float32(sigma), radius)
    ref = ops.gaussian_blur(x, torch.tensor([sigma]), 2 * radius + 1)
    assert torch.allclose(torch.from_numpy(buf).view(1, 3, size, size), ref, atol=2e-6, rtol=0)


def test_finish_row_solarizes_and_rounds_half_to_even():
    buf = np.array([[0.0, 0.5 / 255, 1.5 / 255, 0.6, 1.0, 1.0000001]] * 3, dtype=np.float32)
    out = np.empty((3, 6), dtype=np.uint8)
    fused_cpu.finish_row(buf, out, False, np.float32(0.5))
    ref = torch.from_numpy(buf).mul(255).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(torch.from_numpy(out), ref)
    fused_cpu.finish_row(buf, out, True, np.float32(0.5))
    assert out[0].tolist() == [0, 0, 2, 102, 0, 0]


@pytest.mark.parametrize("preset,size", [("byol", 48), ("byol", 37), ("cifar", 32)])
def test_fused_and_torch_cpu_paths_agree(preset, size):
    cfg = get_augment_config(preset)
    imgs = [_image(40 + 5 * i, 61 - 3 * i, seed=i) for i in range(12)]
    fused = CPUTwoView(cfg, size, fused=True)(imgs, seed=4)
    plain = CPUTwoView(cfg, size, fused=False)(imgs, seed=4)
    diff = (fused.int() - plain.int()).abs()
    assert diff.max() <= 1 and diff.float().gt(0).float().mean() < 0.01
    # the output buffer may be a non-contiguous view: written in place all the same
    out = torch.empty(3, 3, size, size, 2 * len(imgs), dtype=torch.uint8).permute(4, 0, 1, 2, 3)[:, 0]
    CPUTwoView(cfg, size, fused=True)(imgs, seed=4, out=out)
    assert torch.equal(out.reshape(fused.shape), fused)


def test_normalize_rows_matches_normalize_into():
    from smi_timm.data.pipeline import FinishUint8

    cfg = get_augment_config("byol")
    u8 = torch.randint(0, 256, (2, 5, 3, 9, 11), dtype=torch.uint8)
    a, b = FinishUint8(cfg, "cpu")(u8)
    gain, bias = ops.normalize_constants(cfg.mean, cfg.std, "cpu", scale=1.0 / 255.0)
    for got, view in ((a, u8[0]), (b, u8[1])):
        ref = ops.normalize_into(view, gain, bias, torch.empty(view.shape))
        assert got.is_contiguous() and torch.allclose(got, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["planar", "channels_last"])
def test_crop_resize_stays_on_the_uint8_kernel(layout, monkeypatch):
    """Planar and interleaved images, mirrored or not, all go through torch's uint8 kernel into the channels-last
    rows (no silent fallback to the float resize; it once switched itself off for good after one refused call)."""
    from smi_timm.data import augment
    from smi_timm.data.augment import draw_batch_params
    from smi_timm.data.pipeline import crop_resize_rows, plan_rows

    def refuse(*args, **kwargs):
        raise AssertionError("fell back to the float resize")

    monkeypatch.setattr(augment.F, "interpolate", refuse)
    imgs = [_image(40 + 5 * i, 61 - 3 * i, seed=i) for i in range(6)]
    if layout == "channels_last":
        imgs = [im.permute(1, 2, 0).contiguous().permute(2, 0, 1) for im in imgs]  # as decode_jpeg returns them
    cfg = get_augment_config("byol")
    hw = torch.tensor([im.shape[1:] for im in imgs])
    plan = plan_rows(cfg, *draw_batch_params(cfg, hw[:, 0], hw[:, 1], seed=1), order="kinds")
    assert plan.flip.any() and not plan.flip.all()
    rows = crop_resize_rows(imgs, plan, 33)
    assert rows.is_contiguous(memory_format=torch.channels_last) and augment._has_uint8_bicubic_aa()


def test_fused_is_the_default_where_numba_is_installed():
    assert FUSED_AVAILABLE and CPUTwoView(get_augment_config("byol"), 32).fused


def test_without_numba_the_torch_ops_run(monkeypatch):
    """Where numba is missing (``FUSED_AVAILABLE`` false) the CPU path and the normalisation use the torch ops, and
    asking for the fused kernels says what to install."""
    from smi_timm.data import pipeline
    from smi_timm.errors import ConfigError

    cfg = get_augment_config("byol")
    imgs = [_image(40 + 5 * i, 61 - 3 * i, seed=i) for i in range(4)]
    fused_views = pipeline.FinishUint8(cfg, "cpu")(CPUTwoView(cfg, 33)(imgs, seed=2))
    monkeypatch.setattr(pipeline, "FUSED_AVAILABLE", False)
    with pytest.raises(ConfigError, match="pip install numba"):
        CPUTwoView(cfg, 33, fused=True)
    aug = CPUTwoView(cfg, 33)
    assert not aug.fused
    plain_views = pipeline.FinishUint8(cfg, "cpu")(aug(imgs, seed=2))
    std = torch.tensor(cfg.std).view(1, 3, 1, 1) * 255
    for a, b in zip(fused_views, plain_views):
        assert ((a - b).abs() * std).max() <= 1.0 + 1e-3
