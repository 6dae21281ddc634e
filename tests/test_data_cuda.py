"""The accelerator path on a CUDA device: same results as on CPU tensors, no host sync, the loader end to end.

Skipped without CUDA; run by section b of ``benchmarks/gpu_check.sh`` (``pytest -m cuda``). Tolerances: the device
resamples in fp16 (pixels exact, weights to 2^-11), so views agree with the float32 CPU-tensor run within 0.05 in
normalised units on average (about 3 grey levels at the worst pixel); nvJPEG and libjpeg-turbo differ by their IDCT
rounding, a few grey levels.
"""
import numpy as np
import pytest
import torch

from smi_timm.data import get_augment_config, make_ssl_loader, write_shards
from smi_timm.data.feed import decode_jpegs
from smi_timm.data.pipeline import DeviceTwoView, pack_images
from smi_timm.data.reading import decode_image
from smi_timm.data.stats import DataStats
from smi_timm.data.testing import encode_image

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _jpegs(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(60, 140, 2))
        small = rng.integers(0, 256, (h // 10 + 1, w // 10 + 1, 3), dtype=np.uint8)
        arr = np.kron(small, np.ones((10, 10, 1), dtype=np.uint8))[:h, :w]
        out.append(encode_image(arr, quality=92))
    return out


def test_nvjpeg_decode_matches_cpu_decoder():
    jpegs = _jpegs(16)
    parts = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    gpu = decode_jpegs(parts, torch.device("cuda"))
    for j, g in zip(jpegs, gpu):
        c = decode_image(j, DataStats())
        assert g.shape == c.shape and g.device.type == "cuda"
        assert (g.cpu().int() - c.int()).abs().float().mean() < 1.5


def test_device_pipeline_on_cuda_matches_cpu_tensors():
    cfg = get_augment_config("byol")
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, int(h), int(w)), generator=g, dtype=torch.uint8)
              for h, w in torch.randint(50, 120, (24, 2), generator=g)]
    cpu = DeviceTwoView(cfg, 64, "cpu")(images, list(range(24)), seed=3)
    cuda = DeviceTwoView(cfg, 64, "cuda", out_dtype=torch.bfloat16, channels_last=True)(
        [t.cuda() for t in images], list(range(24)), seed=3)
    for c, d in zip(cpu, cuda):
        assert d.dtype == torch.bfloat16 and d.is_contiguous(memory_format=torch.channels_last)
        diff = (d.float().cpu() - c).abs()
        assert diff.mean() < 0.05 and diff.max() < 0.5


def test_no_host_sync_on_cuda():
    """``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronising call while the device part runs."""
    cfg = get_augment_config("byol")
    pipe = DeviceTwoView(cfg, 64, "cuda", out_dtype=torch.bfloat16, channels_last=True)
    images = [t.cuda() for t in (torch.randint(0, 256, (3, 80 + i, 96 - i), dtype=torch.uint8) for i in range(16))]
    plan, chunks, ints, floats, spare = pipe.prepare([tuple(t.shape[-2:]) for t in images], range(16), 1)
    ints, floats = ints.cuda(non_blocking=True), floats.cuda(non_blocking=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a, b = pipe.run(pack_images(images, None, spare), plan, chunks, ints, floats)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(a.float()).all()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda")
    for i, j in enumerate(_jpegs(96, seed=1)):
        d = tmp / "src" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:03d}.jpg").write_bytes(j)
    write_shards(tmp / "src", tmp / "shards" / "train-%06d.tar", maxcount=32, progress=False)
    return str(tmp / "shards" / "train-*.tar")


def test_loader_on_cuda_side_stream_and_resume(shards):
    kw = dict(batch_size=16, image_size=64, augment="byol", num_workers=2, epoch_samples=96, device="cuda",
              out_dtype=torch.bfloat16, channels_last=True)
    loader = make_ssl_loader(shards, **kw)
    assert loader.path == "device" and loader.pin_memory and loader.prefetch_thread
    loader.set_epoch(1)
    full = [(a.clone(), b.clone()) for a, b in loader]
    assert len(full) == 6 and full[0][0].device.type == "cuda" and full[0][0].dtype == torch.bfloat16
    loader.set_epoch(1, 4)
    part = list(loader)
    assert len(part) == 2 and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
                                  for x, y in zip(part, full[4:]))
    cpu_tensors = make_ssl_loader(shards, **{**kw, "device": "cpu", "augment_on": "device",
                                             "out_dtype": torch.float32, "channels_last": False})
    cpu_tensors.set_epoch(1)
    for (a, _), (c, _) in zip(full, cpu_tensors):
        assert (a.float().cpu() - c).abs().mean() < 0.05


def test_cpu_path_delivers_on_cuda(shards):
    loader = make_ssl_loader(shards, batch_size=16, image_size=48, augment="cifar", num_workers=2, epoch_samples=64,
                             device="cuda", augment_on="cpu")
    batches = list(loader)
    assert len(batches) == 4 and batches[0][0].device.type == "cuda" and loader.path == "cpu"
