"""SSL and eval loaders: round trips with exact counts, rank/worker split, seeds, URL forms, errors, bundled sample."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from smi_timm.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    make_eval_loader,
    make_ssl_loader,
    sample_classes,
    sample_shards,
    write_shards,
)
from smi_timm.data.testing import make_image_folder

CIFAR_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10"


def _ids(images):
    """Recover the image ids of flat grey test images from normalised eval batches."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    levels = ((images * std + mean) * 255).mean(dim=(1, 2, 3))
    return [round((float(v) - 8) / 5) for v in levels]


@pytest.fixture(scope="module")
def folder_shards(tmp_path_factory):
    """45 flat images (3 classes x 15) -> 3 shards of 16, 16, 13 samples, with index."""
    tmp = tmp_path_factory.mktemp("fs")
    truth = make_image_folder(tmp / "src", classes=("a", "b", "c"), per_class=15)
    summary = write_shards(tmp / "src", tmp / "shards" / "train-%06d.tar", maxcount=16, progress=False)
    assert summary.samples_per_shard == [16, 16, 13]
    return tmp, truth, summary


def test_eval_loader_reads_every_sample_once(folder_shards):
    tmp, truth, summary = folder_shards
    loader = make_eval_loader(str(tmp / "shards" / "train-{000000..000002}.tar"), batch_size=4, image_size=32,
                              num_workers=2)
    assert loader.num_workers == 2 and loader.num_samples == 45 and loader.classes == ["a", "b", "c"]
    batches = list(loader)
    assert len(batches) == len(loader)
    ids = [i for x, _ in batches for i in _ids(x)]
    labels = [int(y) for _, y in batches for y in y]
    assert sorted(ids) == list(range(45))  # each sample exactly once
    assert all(lab == i // 15 for i, lab in zip(ids, labels))  # folder order: a = 0..14, b = 15..29, c = 30..44
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and y.dtype == torch.long
    st = loader.stats()
    assert st["samples"] == 45 and st["shards"] == 3
    # deterministic: a second pass gives the same batches in the same order
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))


def test_eval_loader_more_workers_than_shards_and_resize(folder_shards):
    tmp, _, _ = folder_shards
    loader = make_eval_loader(str(tmp / "shards" / "train-000000.tar"), batch_size=5, image_size=48, num_workers=3)
    assert loader.num_workers == 1
    batches = list(loader)
    assert sum(len(y) for _, y in batches) == 16 and batches[0][0].shape[-2:] == (48, 48)


def test_eval_loader_image_folder(folder_shards, tmp_path):
    tmp, truth, _ = folder_shards
    (tmp / "src" / "a" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    try:
        loader = make_eval_loader(tmp / "src", batch_size=8, image_size=32, num_workers=2)
        assert loader.classes == ["a", "b", "c"]
        ids = [i for x, _ in loader for i in _ids(x)]
        assert sorted(ids) == list(range(45))
        assert loader.stats()["undecodable"] == 1
    finally:
        (tmp / "src" / "a" / "zz_broken.jpg").unlink()


def test_ssl_loader_round_trip(folder_shards):
    tmp, _, _ = folder_shards
    loader = make_ssl_loader(str(tmp / "shards" / "train-*.tar"), batch_size=8, image_size=40, augment="cifar",
                             num_workers=2, shuffle_buffer=20)
    assert len(loader) == 45 // 8
    batches = list(loader)
    assert len(batches) == 5
    a, b = batches[0]
    assert a.shape == b.shape == (8, 3, 40, 40) and a.dtype == torch.float32
    assert not torch.equal(a, b)
    st = loader.stats()
    assert st["samples"] == 40 and st["undecodable"] == 0
    assert loader.epoch == 1


def _run_rank(pattern, rank, world_size, num_workers, seed=0, epoch=0, **kw):
    loader = make_ssl_loader(pattern, batch_size=3, image_size=32, augment="cifar", num_workers=num_workers,
                             seed=seed, rank=rank, world_size=world_size, shuffle_buffer=8, **kw)
    loader.set_epoch(epoch)
    return loader, list(loader)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_multi_rank_uneven_shards_equal_batches(folder_shards, num_workers):
    tmp, _, _ = folder_shards
    pattern = str(tmp / "shards" / "train-{000000..000002}.tar")  # 3 shards, 45 samples, 2 ranks
    counts = []
    for rank in (0, 1):
        loader, batches = _run_rank(pattern, rank, 2, num_workers)
        assert len(loader) == 45 // (2 * 3) == 7
        counts.append(len(batches))
    assert counts == [7, 7]


def test_seeds_differ_per_rank_epoch_and_are_reproducible(folder_shards):
    tmp, _, _ = folder_shards
    pattern = str(tmp / "shards" / "train-*.tar")
    _, r0 = _run_rank(pattern, 0, 2, 0)
    _, r0_again = _run_rank(pattern, 0, 2, 0)
    _, r1 = _run_rank(pattern, 1, 2, 0)
    _, r0_e1 = _run_rank(pattern, 0, 2, 0, epoch=1)
    _, r0_s1 = _run_rank(pattern, 0, 2, 0, seed=1)
    first = r0[0][0]
    assert torch.equal(first, r0_again[0][0])
    for other in (r1, r0_e1, r0_s1):
        assert not torch.equal(first, other[0][0])
    # two workers of one rank produce different batches
    _, w2 = _run_rank(pattern, 0, 1, 2)
    assert not torch.equal(w2[0][0], w2[1][0])


def test_epoch_length_from_index_or_argument(folder_shards, tmp_path):
    tmp, _, _ = folder_shards
    shards = sorted(str(p) for p in (tmp / "shards").glob("*.tar"))
    loader = make_ssl_loader(shards, batch_size=4, image_size=32, num_workers=0, epoch_samples=20)
    assert len(loader) == 5 and len(list(loader)) == 5
    # copy the shards without their index: local shards are counted from their tar headers (and the source says so)
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in shards:
        (bare / Path(p).name).write_bytes(Path(p).read_bytes())
    counted = make_ssl_loader(str(bare / "train-*.tar"), batch_size=4, image_size=32, num_workers=0)
    assert counted.epoch_samples == 45 and "counted by reading the tar headers" in counted.source.how
    with pytest.raises(ValueError, match="shorter than one batch"):
        make_ssl_loader(shards, batch_size=64, image_size=32, num_workers=0, rank=0, world_size=1)
    # a stream of unknown length: --epoch-samples, or one epoch = the run (--max-steps)
    piped = f"pipe:cat {bare / 'train-000000.tar'}"
    with pytest.raises(ValueError, match="epoch length unknown.*--epoch-samples N.*--max-steps N"):
        make_ssl_loader(piped, batch_size=4, image_size=32, num_workers=0)
    assert len(make_ssl_loader(piped, batch_size=4, image_size=32, num_workers=0, run_batches=7)) == 7
    with pytest.raises(TypeError):
        len(make_eval_loader(piped, batch_size=4, image_size=32, num_workers=0))


def test_url_forms_tar_gz_list_and_pipe(folder_shards, tmp_path):
    tmp, _, _ = folder_shards
    s = write_shards(tmp / "src", tmp_path / "gz" / "val-%03d.tar.gz", maxcount=20, progress=False)
    assert [Path(p).name for p in s.shards] == ["val-000.tar.gz", "val-001.tar.gz", "val-002.tar.gz"]
    n = sum(len(y) for _, y in make_eval_loader(s.shards, batch_size=16, image_size=32, num_workers=0))
    assert n == 45
    n = sum(len(y) for _, y in make_eval_loader(str(tmp_path / "gz" / "val-00[01].tar.gz"), 16, 32, num_workers=0))
    assert n == 40
    if sys.platform != "win32":
        pipes = [f"pipe:cat {p}" for p in s.shards]
        loader = make_eval_loader(pipes, batch_size=16, image_size=32, num_workers=0)
        assert sum(len(y) for _, y in loader) == 45 and loader.num_samples is None
        ssl = make_ssl_loader(pipes[0], batch_size=4, image_size=32, num_workers=0, epoch_samples=8)
        assert len(list(ssl)) == 2


def test_start_up_errors(folder_shards, tmp_path):
    tmp, _, _ = folder_shards
    with pytest.raises(ValueError, match="no data given"):
        make_ssl_loader([], batch_size=4, image_size=32)
    with pytest.raises(ValueError, match="no data given"):
        make_eval_loader("", batch_size=4, image_size=32)
    with pytest.raises(FileNotFoundError, match="matched no files"):
        make_ssl_loader(str(tmp_path / "nothing-*.tar"), batch_size=4, image_size=32, epoch_samples=10)
    with pytest.raises(FileNotFoundError, match="matched no files"):
        make_eval_loader(str(tmp_path / "nothing-*.tar"), batch_size=4, image_size=32)
    with pytest.raises(FileNotFoundError, match="none of the 2 shard"):
        make_ssl_loader(str(tmp_path / "gone-{0..1}.tar"), batch_size=4, image_size=32, epoch_samples=10)
    # a folder is looked into: its shards are the data (the index beside them is metadata, not a shard)
    folder = make_ssl_loader(tmp / "shards", batch_size=4, image_size=32, epoch_samples=10)
    assert folder.source.kind == "shards" and len(folder.source.units) == 3 and not folder.source.ignored
    with pytest.raises(ValueError, match="is a folder among other data"):
        make_ssl_loader([str(tmp / "shards"), str(tmp / "shards" / "train-000000.tar")], batch_size=4, image_size=32)
    with pytest.raises(ValueError, match="unknown augment preset"):
        make_ssl_loader(str(tmp / "shards" / "train-*.tar"), batch_size=4, image_size=32, augment="simclr-ish")
    with pytest.raises(ValueError, match="rank"):
        make_ssl_loader(str(tmp / "shards" / "train-*.tar"), batch_size=4, image_size=32, rank=2, world_size=2)


def test_bundled_sample():
    train, test = sample_shards("train"), sample_shards("test")
    assert len(train) == 4 and len(test) == 2
    assert all(p.endswith(".tar.gz") and os.path.isfile(p) for p in train + test)
    assert sample_classes()[:2] == ["airplane", "automobile"] and len(sample_classes()) == 10
    index = json.loads((Path(train[0]).parent / "train.json").read_text())
    assert index["num_samples"] == 4000
    total = sum(p.stat().st_size for p in Path(train[0]).parent.iterdir())
    assert total <= 5 * 1024 * 1024
    with pytest.raises(ValueError, match="split"):
        sample_shards("val")
    loader = make_eval_loader(test, batch_size=250, image_size=32, num_workers=2)
    assert len(loader) == 4
    labels = torch.cat([y for _, y in loader])
    assert labels.numel() == 1000 and torch.bincount(labels, minlength=10).tolist() == [100] * 10
    ssl = make_ssl_loader(train, batch_size=500, image_size=32, augment="cifar", num_workers=1)
    assert len(ssl) == 8


def test_v2_backend_and_byol_preset(folder_shards):
    tmp, _, _ = folder_shards
    for backend in ("v2", "batched"):
        loader = make_ssl_loader(str(tmp / "shards" / "train-*.tar"), batch_size=4, image_size=48, augment="byol",
                                 num_workers=0, epoch_samples=8, backend=backend, shuffle_buffer=4)
        batches = list(loader)
        assert len(batches) == 2 and batches[0][0].shape == (4, 3, 48, 48)


@pytest.mark.skipif(not (CIFAR_DIR / "test-000000.tar.gz").is_file(), reason="CIFAR-10 shards not available")
def test_shared_cifar_shards_upscaled():
    loader = make_ssl_loader(str(CIFAR_DIR / "test-000000.tar.gz"), batch_size=16, image_size=64, augment="cifar",
                             num_workers=0, epoch_samples=32, shuffle_buffer=64)
    a, b = next(iter(loader))
    assert a.shape == (16, 3, 64, 64)


# ---------------------------------------------------------------------------------------------------------------------
# Data specs, resume without replay, paths, shutdown
# ---------------------------------------------------------------------------------------------------------------------


def test_sample_specs_are_understood_by_the_loaders():
    from smi_timm.data import expand_urls

    assert expand_urls("sample") == expand_urls("sample:train") == sample_shards("train")
    assert expand_urls(["sample:test"]) == sample_shards("test")
    assert expand_urls("sample:train::sample:test") == sample_shards("train") + sample_shards("test")
    with pytest.raises(ValueError, match="split"):
        expand_urls("sample:val")
    assert len(make_ssl_loader("sample", batch_size=500, image_size=32, num_workers=0)) == 8
    loader = make_eval_loader("sample:test", batch_size=250, image_size=32, num_workers=0)
    assert loader.num_samples == 1000 and len(loader.classes) == 10


def test_epoch_length_message_names_cli_and_python(folder_shards, tmp_path):
    tmp, _, _ = folder_shards
    piped = "pipe:cat " + str(next((tmp / "shards").glob("*.tar")))
    with pytest.raises(ValueError, match="--epoch-samples N on the command line, epoch_samples=N in Python"):
        make_ssl_loader(piped, batch_size=4, image_size=32, num_workers=0)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("augment_on,num_workers", [("cpu", 0), ("cpu", 2), ("device", 0), ("device", 3)])
def test_resume_without_replay_equals_uninterrupted(folder_shards, augment_on, num_workers):
    """set_epoch(e, start) yields exactly the batches an uninterrupted epoch yields from ``start`` on."""
    tmp, _, _ = folder_shards
    kw = dict(batch_size=3, image_size=32, augment="byol", num_workers=num_workers, seed=5, shuffle_buffer=7,
              epoch_samples=45, augment_on=augment_on, rank=1, world_size=2)
    loader = make_ssl_loader(str(tmp / "shards" / "train-*.tar"), **kw)
    loader.set_epoch(2)
    full = list(loader)
    assert len(full) == len(loader) == 7 and loader.epoch == 3 and loader.start_batch == 0
    for start in (1, 4, 6, 7):
        loader.set_epoch(2, start)
        part = list(loader)
        assert len(part) == 7 - start
        assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(part, full[start:])), start
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(2, 8)


def test_skipped_batches_are_not_decoded(folder_shards, monkeypatch):
    """Resuming reads the consumed part's bytes but decodes only the batches it yields."""
    import smi_timm.data.stream as stream

    calls = []
    real = stream.decode_image
    monkeypatch.setattr(stream, "decode_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    tmp, _, _ = folder_shards
    loader = make_ssl_loader(str(tmp / "shards" / "train-*.tar"), batch_size=3, image_size=32, num_workers=0,
                             epoch_samples=45, shuffle_buffer=4)
    loader.set_epoch(0, 12)
    assert len(list(loader)) == 3 and len(calls) == 9


def test_delivery_options(folder_shards):
    tmp, _, _ = folder_shards
    for on in ("cpu", "device"):
        loader = make_ssl_loader(str(tmp / "shards" / "train-*.tar"), batch_size=4, image_size=36, num_workers=0,
                                 epoch_samples=8, augment_on=on, out_dtype=torch.bfloat16, channels_last=True)
        assert loader.path == on and loader.augment.name == "byol"
        a, b = next(iter(loader))
        assert a.dtype == b.dtype == torch.bfloat16 and a.shape == (4, 3, 36, 36)
        assert a.is_contiguous(memory_format=torch.channels_last)
        loader.close()
    auto = make_ssl_loader(str(tmp / "shards" / "train-*.tar"), batch_size=4, image_size=32, num_workers=0)
    assert auto.path == "cpu" and auto.device == torch.device("cpu") and not auto.pin_memory
    with pytest.raises(ValueError, match="augment_on"):
        make_ssl_loader(str(tmp / "shards" / "train-*.tar"), batch_size=4, image_size=32, augment_on="gpu")
    with pytest.raises(ValueError, match="v2"):
        make_ssl_loader(str(tmp / "shards" / "train-*.tar"), batch_size=4, image_size=32, backend="v2",
                        augment_on="device")


def test_close_and_context_manager_stop_workers(folder_shards):
    import multiprocessing as mp

    tmp, _, _ = folder_shards
    with make_ssl_loader(str(tmp / "shards" / "train-*.tar"), batch_size=3, image_size=32, num_workers=2,
                         epoch_samples=45) as loader:
        it = iter(loader)
        next(it)
        assert len(mp.active_children()) == 2
    assert mp.active_children() == []
    with pytest.raises(StopIteration):
        next(it)
    assert len(list(loader)) == len(loader)  # still usable after close()
    assert mp.active_children() == []


def test_default_num_workers(monkeypatch):
    import smi_timm.data.loaders as loaders
    from smi_timm.data import default_num_workers

    monkeypatch.setattr(loaders, "_cpu_count", lambda: 16)
    assert default_num_workers(1) == 15 and default_num_workers(2) == 7 and default_num_workers(16) == 0
    assert default_num_workers(1, path="device") == 3 and default_num_workers(8, path="device") == 1
    monkeypatch.setattr(loaders, "_cpu_count", lambda: 256)
    assert default_num_workers(1) == loaders.MAX_CPU_WORKERS
