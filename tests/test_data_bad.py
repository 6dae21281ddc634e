"""Bad input: broken samples, truncated / empty / missing shards; counters; no hangs."""

import pytest
import torch

from smi_timm.data import DataStats, make_eval_loader, make_ssl_loader
from smi_timm.data.reading import decode_image, iter_shard
from smi_timm.data.stats import merge
from smi_timm.data.testing import broken_samples, encode_image, noise_image, truncate_file, write_samples


@pytest.fixture()
def bad_shards(tmp_path):
    samples, expected = broken_samples()
    paths = write_samples(tmp_path / "bad-%06d.tar", samples, maxcount=7)  # 2 shards: 7 + 6 samples
    return tmp_path, paths, samples, expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_loader_counts_every_kind(bad_shards, num_workers):
    tmp, paths, _, expected = bad_shards
    loader = make_eval_loader(str(tmp / "bad-*.tar"), batch_size=3, image_size=32, num_workers=num_workers)
    n = sum(len(y) for _, y in loader)
    st = loader.stats()
    assert n == expected["samples"] == 8
    for kind, count in expected.items():
        assert st[kind] == count, kind
    assert st["missing_shard"] == 0 and st["bad_shard"] == 0 and st["shards"] == 2


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_ssl_loader_counts_every_kind_exactly(tmp_path, augment_on):
    """One pass over the 13 broken samples in order: the same counts on both paths; 2 holes filled."""
    samples, _ = broken_samples()
    (path,) = write_samples(tmp_path / "one-%06d.tar", samples, index=False)
    loader = make_ssl_loader(path, batch_size=12, image_size=32, augment="cifar", num_workers=0, shuffle_buffer=1,
                             epoch_samples=12, augment_on=augment_on)
    (a, b), = list(loader)
    assert a.shape == (12, 3, 32, 32) and torch.isfinite(a).all() and torch.isfinite(b).all()
    st = loader.stats()
    expected = {"undecodable": 2, "missing_image": 1, "converted_grayscale": 1, "converted_cmyk": 1,
                "converted_alpha": 1, "converted_other": 1, "non_jpeg": 2, "samples": 12, "shards": 1,
                "missing_label": 0, "bad_label": 0, "bad_shard": 0, "missing_shard": 0}
    assert {k: st[k] for k in expected} == expected


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_ssl_loader_trains_through_bad_data(bad_shards, augment_on):
    tmp, _, _, _ = bad_shards
    loader = make_ssl_loader(str(tmp / "bad-*.tar"), batch_size=4, image_size=32, augment="cifar", num_workers=2,
                             shuffle_buffer=4, epoch_samples=48, augment_on=augment_on)
    batches = list(loader)
    assert len(batches) == len(loader) == 12
    assert all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in batches)
    st = loader.stats()
    assert st["samples"] == 48
    # counters arrive from both worker processes
    for kind in ("undecodable", "missing_image", "converted_grayscale", "converted_cmyk", "converted_alpha",
                 "non_jpeg"):
        assert st[kind] > 0, kind
    # the SSL loader does not need labels: samples without cls are used, not counted as skipped
    assert st["bad_label"] == 0


def test_truncated_and_missing_shards(bad_shards, tmp_path):
    tmp, paths, _, _ = bad_shards
    rng = __import__("numpy").random.default_rng(1)
    good = [(f"k{i:03d}", {"jpg": encode_image(noise_image(rng)), "cls": b"0"}) for i in range(40)]
    (long_path,) = write_samples(tmp_path / "long" / "good-%06d.tar", good, index=False)
    truncate_file(long_path, 0.5)
    stats = DataStats()
    kept = list(iter_shard(long_path, stats))
    assert 10 < len(kept) < 40 and stats["bad_shard"] == 1
    gz = write_samples(tmp_path / "gz" / "g-%06d.tar.gz", good, index=False)[0]
    truncate_file(gz, 0.6)
    stats = DataStats()
    assert 0 < len(list(iter_shard(gz, stats))) < 40 and stats["bad_shard"] == 1
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    missing = str(tmp_path / "missing-000000.tar")
    with pytest.warns(UserWarning, match="missing"):
        loader = make_eval_loader([long_path, gz, str(empty), missing], batch_size=8, image_size=32, num_workers=2)
    n = sum(len(y) for _, y in loader)
    st = loader.stats()
    assert n == st["samples"] > 20
    assert st["missing_shard"] == 1 and st["bad_shard"] == 3
    with pytest.warns(UserWarning, match="missing"):
        ssl = make_ssl_loader([long_path, missing], batch_size=4, image_size=32, num_workers=0, epoch_samples=16)
    assert len(list(ssl)) == 4 and ssl.stats()["missing_shard"] == 1 and ssl.stats()["bad_shard"] >= 1


def test_only_missing_shards_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        make_eval_loader([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], batch_size=2, image_size=32)


def test_unusable_shards_raise_instead_of_hanging(tmp_path):
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    loader = make_ssl_loader([str(empty)], batch_size=2, image_size=32, num_workers=0, epoch_samples=4)
    with pytest.raises(RuntimeError, match="no sample with an image"):
        list(loader)
    rng = __import__("numpy").random.default_rng(0)
    junk = [(f"j{i}", {"jpg": bytes(rng.integers(0, 256, 64, dtype="uint8")), "cls": b"0"}) for i in range(5)]
    (junk_path,) = write_samples(tmp_path / "junk-%06d.tar", junk, index=False)
    loader = make_ssl_loader(junk_path, batch_size=2, image_size=32, num_workers=0, epoch_samples=4,
                             shuffle_buffer=2)
    with pytest.raises(RuntimeError, match="undecodable"):
        list(loader)
    loader = make_ssl_loader(junk_path, batch_size=2, image_size=32, num_workers=0, epoch_samples=4,
                             shuffle_buffer=2, augment_on="device")
    with pytest.raises(RuntimeError, match="undecodable"):
        list(loader)


def test_decode_conversions():
    rng = __import__("numpy").random.default_rng(0)
    arr = noise_image(rng, (20, 30))
    cases = {
        "converted_grayscale": encode_image(arr, mode="L"),
        "converted_cmyk": encode_image(arr, mode="CMYK"),
        "converted_alpha": encode_image(arr, fmt="PNG", mode="RGBA"),
        "converted_other": encode_image(arr, fmt="PNG", mode="P"),
    }
    for kind, data in cases.items():
        stats = DataStats()
        img = decode_image(data, stats)
        assert img is not None and img.shape == (3, 20, 30) and img.dtype == torch.uint8, kind
        assert stats[kind] == 1, kind
    stats = DataStats()
    png = decode_image(encode_image(arr, fmt="PNG"), stats)
    assert torch.equal(png, torch.from_numpy(arr).permute(2, 0, 1)) and stats["non_jpeg"] == 1
    jpg = encode_image(arr)
    stats = DataStats()
    assert decode_image(jpg[:-40], stats) is None and stats["undecodable"] == 1
    assert decode_image(b"", stats) is None and stats["undecodable"] == 2


def test_stats_merge():
    a, b = DataStats(), DataStats()
    a.add("undecodable", 2)
    b.add("undecodable")
    b.add("samples", 5)
    m = merge([a.as_dict(), b.as_dict()])
    assert m["undecodable"] == 3 and m["samples"] == 5 and m["missing_shard"] == 0
    assert a.pop_delta() == {"undecodable": 2} and a.pop_delta() == {}
