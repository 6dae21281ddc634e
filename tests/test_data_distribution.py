"""The fast pipelines draw the same distribution of views as the per-sample ``torchvision.transforms.v2`` reference.

* crop area fraction and aspect ratio: two-sample Kolmogorov-Smirnov test against v2's ``RandomResizedCrop``
  (critical value at alpha = 0.001);
* flip, jitter, grayscale, blur and solarize rates: within 5 binomial standard errors of the recipe's
  probabilities; jitter factors and blur sigma: one-sample KS against their uniform ranges; jitter order: each op at
  each step a quarter of the time;
* the output views (bundled CIFAR-10 images; both presets; both fast paths): per-channel mean and standard
  deviation, colourfulness (largest minus smallest channel) and gradient energy within 4 standard errors of the v2
  reference (standard errors from the per-image values). A whole-chain check: the parameter and op tests above and
  in ``test_data_augment.py`` are the precise ones; a view b without its solarize shows it can fail.
"""
import dataclasses
import math

import pytest
import torch

from smi_timm.data import get_augment_config, sample_shards
from smi_timm.data.augment import V2TwoViewAugment, batch_seed, draw_batch_params, sample_crop_boxes
from smi_timm.data.pipeline import CPUTwoView, DeviceTwoView, FinishUint8
from smi_timm.data.reading import decode_image, iter_shard, sample_image_bytes
from smi_timm.data.stats import DataStats

KS_C = 1.95  # c(alpha) of the two-sample KS test at alpha = 0.001


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ks_two_sample(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True).double() / len(a)
    fb = torch.searchsorted(b, grid, right=True).double() / len(b)
    return float((fa - fb).abs().max())


def ks_uniform(x: torch.Tensor, lo: float, hi: float) -> float:
    x = x.double().sort().values
    n = len(x)
    cdf = ((x - lo) / (hi - lo)).clamp(0, 1)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())


@pytest.mark.parametrize("hw", [(64, 64), (40, 120), (350, 400)])
def test_crop_area_and_ratio_match_random_resized_crop(hw):
    from torchvision.transforms import v2

    n = 3000
    h, w = hw
    rrc = v2.RandomResizedCrop(32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    make_params = getattr(rrc, "make_params", None) or rrc._get_params
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    torch.manual_seed(0)
    ref = torch.tensor([[p["height"], p["width"]] for p in (make_params([img]) for _ in range(n))]).double()
    ours = sample_crop_boxes(torch.full((n,), h), torch.full((n,), w), (0.08, 1.0), (3 / 4, 4 / 3),
                             torch.Generator().manual_seed(1))[:, 2:].double()
    crit = KS_C * math.sqrt(2 / n)
    assert ks_two_sample(ref[:, 0] * ref[:, 1], ours[:, 0] * ours[:, 1]) < crit  # area
    assert ks_two_sample(ref[:, 1] / ref[:, 0], ours[:, 1] / ours[:, 0]) < crit  # aspect ratio


def test_rates_factors_and_order_over_many_batches():
    """Parameters as the loader draws them (one seed per batch) over 50 batches of 64."""
    cfg = get_augment_config("byol")
    hw = torch.full((64,), 96)
    views = [[], []]
    for k in range(50):
        for v, p in enumerate(draw_batch_params(cfg, hw, hw, batch_seed(0, 0, 0, k))):
            views[v].append(p)

    def cat(v, name):
        return torch.cat([getattr(p, name) for p in views[v]])

    n = 50 * 64
    for v in (0, 1):
        for name, prob in (("flip", cfg.flip_p), ("jitter", cfg.jitter_p), ("gray", cfg.grayscale_p),
                           ("blur", cfg.blur_p[v]), ("solarize", cfg.solarize_p[v])):
            rate = cat(v, name).double().mean().item()
            bound = 5 * math.sqrt(prob * (1 - prob) / n) + 1e-12
            assert abs(rate - prob) <= bound, (v, name, rate, prob)
        crit = KS_C * math.sqrt(1 / n)  # one-sample
        f = cat(v, "jitter_factors")
        for col, (lo, hi) in enumerate(((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))):
            assert ks_uniform(f[:, col], lo, hi) < crit, col
        assert ks_uniform(cat(v, "blur_sigma"), *cfg.blur_sigma) < crit
        order = cat(v, "jitter_order")
        for step in range(4):
            counts = torch.bincount(order[:, step], minlength=4).double() / n
            assert (counts - 0.25).abs().max() < 5 * math.sqrt(0.25 * 0.75 / n)
    # batches differ from each other (one seed per batch)
    assert not torch.equal(views[0][0].boxes, views[0][1].boxes)


def _cifar_images(n: int):
    stats = DataStats()
    out = []
    for url in sample_shards("train"):
        for s in iter_shard(url, stats):
            out.append(decode_image(sample_image_bytes(s, stats), stats))
            if len(out) == n:
                return out
    return out


_STATS = {
    "channel mean": lambda t: t.mean(dim=(2, 3)),
    "channel std": lambda t: t.std(dim=(2, 3)),
    "colourfulness": lambda t: (t.amax(1) - t.amin(1)).mean(dim=(1, 2)).unsqueeze(1),
    "gradient": lambda t: (t[..., 1:] - t[..., :-1]).abs().mean(dim=(1, 2, 3)).unsqueeze(1),
}


def _views(run, images, chunk=128):
    out = [[], []]
    for k, i in enumerate(range(0, len(images), chunk)):
        for v, t in enumerate(run(images[i:i + chunk], batch_seed(7, 0, 0, k))):
            out[v].append(t)
    return [torch.cat(v) for v in out]


def _max_z(ours, ref):
    """Per view: the largest |difference of means| / standard error over the statistics and channels."""
    z = []
    for v in (0, 1):
        worst = 0.0
        for stat in _STATS.values():
            x, y = stat(ours[v]), stat(ref[v])  # one value per image (and channel)
            se = (x.var(0) / len(x) + y.var(0) / len(y)).sqrt()
            worst = max(worst, float(((x.mean(0) - y.mean(0)).abs() / se).max()))
        z.append(worst)
    return z


@pytest.fixture(scope="module")
def cifar_images():
    return _cifar_images(768)


@pytest.mark.parametrize("preset,size", [("cifar", 32), ("byol", 48)])
def test_output_statistics_match_v2(preset, size, cifar_images):
    cfg = get_augment_config(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = _views(lambda imgs, k: V2TwoViewAugment(cfg, size)(imgs), cifar_images)
    cpu, dev, finish = CPUTwoView(cfg, size), DeviceTwoView(cfg, size, "cpu"), FinishUint8(cfg, "cpu")
    for name, run in (("cpu", lambda imgs, k: finish(cpu(imgs, k))),
                      ("device", lambda imgs, k: dev(imgs, list(range(len(imgs))), k))):
        assert max(_max_z(_views(run, cifar_images), ref)) < 4.0, name
    if preset == "cifar":  # the check has teeth: view b without its solarize (p = 0.2) is caught
        no_sol = DeviceTwoView(dataclasses.replace(cfg, solarize_p=(0.0, 0.0)), size, "cpu")
        z = _max_z(_views(lambda imgs, k: no_sol(imgs, list(range(len(imgs))), k), cifar_images), ref)
        assert z[0] < 4.0 < z[1]
