"""The accelerator path, run on CPU tensors: no host synchronisation, a constant op count, and the loader around it.

The device part of a batch (:meth:`DeviceTwoView.run` and the packing before it) is checked with a
``TorchDispatchMode`` that records every aten op: none may synchronise with the host (``item`` /
``_local_scalar_dense``, ``nonzero``, ``is_nonzero``, ``equal``, ``unique``, ``masked_select``, a
``repeat_interleave`` without ``output_size``, boolean indexing, ...), and the number of ops must not grow with the
batch size. The same code also runs on ``meta`` tensors, which have no values at all: any decision that needed one
would fail there. (On a CUDA device the decode is one op too, ``decode_jpegs_cuda``; on the CPU torchvision decodes
image by image, so decoding is left out of the count.)
"""
import io
import threading

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from smi_timm.data import get_augment_config, make_ssl_loader, write_shards
from smi_timm.data.feed import DeviceStage, Prefetcher
from smi_timm.data.pipeline import DeviceTwoView, pack_images
from smi_timm.data.stats import DataStats
from smi_timm.data.stream import RawItem
from smi_timm.data.testing import encode_image, write_samples

SYNCING = {"_local_scalar_dense", "item", "nonzero", "nonzero_static", "is_nonzero", "equal", "allclose",
           "masked_select", "_unique", "_unique2", "unique_consecutive", "unique_dim", "bincount", "histc",
           "argwhere"}


class OpLog(TorchDispatchMode):
    """Record every aten op (name, args, kwargs) dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((func, args, kwargs))
        return func(*args, **kwargs)

    def problems(self, device: torch.device):
        bad = []
        for func, args, kwargs in self.ops:
            name = func.overloadpacket.__name__
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            for a in args:
                if isinstance(a, (list, tuple)):
                    tensors += [t for t in a if isinstance(t, torch.Tensor)]
            if name in SYNCING:
                bad.append(name)
            elif name == "repeat_interleave" and kwargs.get("output_size") is None:
                bad.append("repeat_interleave without output_size")
            elif name in ("index", "index_put", "index_put_") and any(t.dtype == torch.bool for t in tensors[1:]):
                bad.append(f"{name} with a boolean mask")
            elif any(t.device != device and t.dim() > 0 for t in tensors):
                bad.append(f"{name} reads a tensor on {next(t.device for t in tensors if t.device != device)}")
        return bad


def _images(n, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(24, 72, (n, 2), generator=g)
    return [torch.randint(0, 256, (3, int(h), int(w)), generator=g, dtype=torch.uint8).to(device) for h, w in sizes]


def _device_part(pipe, images, seed):
    """Host preparation outside the log, then the device part inside it."""
    plan, chunks, ints, floats, spare = pipe.prepare([tuple(t.shape[-2:]) for t in images], range(len(images)), seed)
    ints, floats = ints.to(pipe.device), floats.to(pipe.device)  # the upload (pinned, non-blocking on CUDA)
    log = OpLog()
    with log:
        flat = pack_images(images, None, spare)
        a, b = pipe.run(flat, plan, chunks, ints, floats)
    return log, a, b


@pytest.mark.parametrize("preset", ["byol", "cifar"])
def test_no_host_sync_and_constant_op_count(preset):
    cfg = get_augment_config(preset)
    pipe = DeviceTwoView(cfg, 32, "cpu", out_dtype=torch.bfloat16, channels_last=True)
    counts = []
    for n, seed in ((8, 0), (32, 1), (64, 2)):
        log, a, b = _device_part(pipe, _images(n, seed), seed)
        assert log.problems(torch.device("cpu")) == []
        assert a.shape == b.shape == (n, 3, 32, 32) and a.dtype == torch.bfloat16
        assert a.is_contiguous(memory_format=torch.channels_last)
        counts.append(len(log.ops))
    assert counts[0] == counts[1] == counts[2], counts


def test_runs_on_meta_tensors():
    """No op of the device part needs a tensor's value: it all runs on the value-less meta device."""
    cfg = get_augment_config("byol")
    pipe = DeviceTwoView(cfg, 32, "meta", out_dtype=torch.bfloat16, channels_last=True)
    images = _images(12, 3, device="meta")
    log, a, b = _device_part(pipe, images, 4)
    assert a.device.type == "meta" and a.shape == (12, 3, 32, 32)
    assert log.problems(torch.device("meta")) == []


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """60 JPEGs of different sizes with some texture, 3 classes, 2 shards."""
    tmp = tmp_path_factory.mktemp("dev")
    rng = np.random.default_rng(0)
    for i in range(60):
        h, w = rng.integers(40, 90, 2)
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        arr = np.kron(small, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]
        d = tmp / "src" / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:03d}.jpg").write_bytes(encode_image(arr))
    write_shards(tmp / "src", tmp / "shards" / "train-%06d.tar", maxcount=30, progress=False)
    return str(tmp / "shards" / "train-*.tar")


def test_device_path_close_to_cpu_path(shards):
    """Same seeds, same images and parameters: the two paths agree up to the CPU path's uint8 rounding."""
    kw = dict(batch_size=8, image_size=40, augment="byol", num_workers=0, epoch_samples=32, shuffle_buffer=10)
    cpu = list(make_ssl_loader(shards, augment_on="cpu", **kw))
    dev = list(make_ssl_loader(shards, augment_on="device", **kw))
    assert len(cpu) == len(dev) == 4
    std = torch.tensor(get_augment_config("byol").std).view(1, 3, 1, 1) * 255
    for (a, b), (da, db) in zip(cpu, dev):
        for x, y in ((a, da), (b, db)):
            diff = (x - y).abs() * std
            assert diff.mean() < 1.0 and diff.max() < 12.0


def test_threaded_prefetcher_keeps_order_and_reraises():
    items = [{"i": i} for i in range(7)]
    seen = []
    pf = Prefetcher(iter(items), lambda item: (torch.full((1,), item["i"]), torch.zeros(1)), "cpu", depth=3,
                    threaded=True, on_item=lambda item: seen.append(item["i"]))
    assert [int(a) for a, _ in pf] == list(range(7)) and seen == list(range(7))
    pf.close()

    def stage(item):
        if item["i"] == 2:
            raise ValueError("bad batch 2")
        return torch.zeros(1), torch.zeros(1)

    pf = Prefetcher(iter(items), stage, "cpu", depth=2, threaded=True)
    next(pf), next(pf)
    with pytest.raises(ValueError, match="bad batch 2"):
        next(pf)
    pf.close()
    assert not any(t.name == "smi-data-device-stage" for t in threading.enumerate())


def test_threaded_loader_equals_inline(shards):
    kw = dict(batch_size=8, image_size=32, augment="cifar", num_workers=0, epoch_samples=24, augment_on="device")
    inline = list(make_ssl_loader(shards, **kw))
    threaded = list(make_ssl_loader(shards, prefetch_thread=True, **kw))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(inline, threaded))


def test_device_decoder_failure_is_rescued(monkeypatch):
    """The device decoder rejects an image: the CPU decoder takes it; if nothing decodes it, it is counted and its
    sample takes another image of the batch."""
    import smi_timm.data.feed as feed

    rng = np.random.default_rng(1)
    jpegs = [encode_image(rng.integers(0, 256, (30 + 8 * i, 40, 3), dtype=np.uint8)) for i in range(4)]
    assert len({len(j) for j in jpegs}) == 4
    real = feed.decode_jpegs

    def flaky(parts, device):
        if any(int(p.numel()) == len(jpegs[1]) for p in parts):
            raise RuntimeError("nvjpeg: unsupported")
        return real(parts, device)

    monkeypatch.setattr(feed, "decode_jpegs", flaky)
    stats = DataStats()
    stage = DeviceStage(DeviceTwoView(get_augment_config("cifar"), 32, "cpu"), lambda k: k, stats)
    enc = torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8)
    item = RawItem(batch=0, enc=enc, enc_sizes=[len(j) for j in jpegs], enc_hw=[],
                   pix=torch.empty(0, dtype=torch.uint8), pix_hw=[], slot_image=[0, 1, 2, 3], stats={})
    a, b = stage(item)
    assert a.shape == (4, 3, 32, 32) and stats["undecodable"] == 0  # rescued by the CPU decoder
    broken = bytearray(jpegs[1])
    broken[len(broken) // 3:] = bytes(len(broken) - len(broken) // 3)  # entropy data zeroed: the CPU decoder fails
    monkeypatch.setattr(feed, "decode_image", lambda data, st: (st.add("undecodable"), None)[1])
    item = item._replace(enc=torch.frombuffer(bytearray(b"".join([jpegs[0], bytes(broken), jpegs[2], jpegs[3]])),
                                              dtype=torch.uint8))
    a, b = stage(item)
    assert a.shape == (4, 3, 32, 32) and stats["undecodable"] == 1


def test_worker_decodes_what_the_device_decoder_does_not_take(tmp_path):
    """Grayscale, CMYK, progressive and non-JPEG images go to the CPU decoder in the workers, counted as on the CPU
    path; oversized JPEGs are decoded there at a reduced size."""
    rng = np.random.default_rng(2)

    def img(h=40, w=48):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    from PIL import Image

    prog = io.BytesIO()
    Image.fromarray(img()).save(prog, format="JPEG", progressive=True)
    samples = [("rgb0", {"jpg": encode_image(img())}), ("gray", {"jpg": encode_image(img(), mode="L")}),
               ("cmyk", {"jpg": encode_image(img(), mode="CMYK")}), ("png", {"png": encode_image(img(), fmt="PNG")}),
               ("prog", {"jpg": prog.getvalue()}), ("big", {"jpg": encode_image(img(300, 260))}),
               ("rgb1", {"jpg": encode_image(img())}), ("rgb2", {"jpg": encode_image(img())})]
    (path,) = write_samples(tmp_path / "mix-%06d.tar", samples, index=False)
    counts = {}
    for on in ("cpu", "device"):
        loader = make_ssl_loader(path, batch_size=8, image_size=32, augment="cifar", num_workers=0, epoch_samples=8,
                                 shuffle_buffer=1, augment_on=on, max_decode_side=128)
        (a, b), = list(loader)
        assert torch.isfinite(a.float()).all()
        counts[on] = loader.stats()
    assert counts["cpu"] == counts["device"]
    st = counts["device"]
    assert st["converted_grayscale"] == 1 and st["converted_cmyk"] == 1 and st["non_jpeg"] == 1
    assert st["samples"] == 8 and st["undecodable"] == 0
