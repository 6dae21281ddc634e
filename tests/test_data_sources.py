"""Datasets as users have them: every layout the sources read (built here from tiny images), exact epochs on small
sets, and nothing dropped without a word."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from smi_timm.cli.eval import main as eval_main
from smi_timm.data import make_eval_loader, make_ssl_loader
from smi_timm.data.sources import open_data
from smi_timm.data.stream import SSLStream, StreamOptions
from smi_timm.data.testing import encode_image, write_samples


def _image(i: int, fmt: str = "JPEG") -> bytes:
    """A distinct tiny image per ``i`` (its bytes identify it)."""
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    if fmt == "JPEG":
        return encode_image(arr)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _photo_folder(root: Path, n: int, classes=None) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        d = root / classes[i % len(classes)] if classes else root
        d.mkdir(exist_ok=True)
        (d / f"p{i:03d}.jpg").write_bytes(_image(i))
    return root


def _stream(loader, epoch=0) -> SSLStream:
    o = loader.options
    return SSLStream(loader.source, StreamOptions(batch_size=o.batch_size, batches=o.batches_per_epoch,
                                                  augment=o.augment, image_size=o.image_size, seed=o.seed,
                                                  rank=o.rank, world_size=o.world_size,
                                                  shuffle_buffer=o.shuffle_buffer, mode="augment"), epoch, 0)


# ---------------------------------------------------------------------------------------------------------------------
# exact epochs on small sets
# ---------------------------------------------------------------------------------------------------------------------

def test_forty_images_one_epoch_reads_each_once_and_no_batch_repeats_one(tmp_path):
    folder = _photo_folder(tmp_path / "photos", 40)
    loader = make_ssl_loader(str(folder), batch_size=8, image_size=16, augment="cifar", num_workers=0, seed=1)
    assert len(loader) == 5 and loader.source.kind == "images" and loader.source.num_samples == 40
    batches = list(_stream(loader).batch_bytes())
    assert [k for k, _ in batches] == [0, 1, 2, 3, 4]
    assert all(len(set(b)) == 8 for _, b in batches)  # 5 batches of 8 distinct images
    assert len({x for _, b in batches for x in b}) == 40  # every image once
    views = list(loader)
    assert len(views) == 5 and views[0][0].shape == (8, 3, 16, 16)
    assert loader.stats()["samples"] == 40
    # the default buffer (2,000) is capped at the data: another epoch is another order, still each image once
    again = list(_stream(loader, epoch=1).batch_bytes())
    assert [b for _, b in again] != [b for _, b in batches] and len({x for _, b in again for x in b}) == 40


def test_two_ranks_and_two_workers_cover_every_image_once(tmp_path):
    folder = _photo_folder(tmp_path / "photos", 40)
    seen = []
    for rank in range(2):
        loader = make_ssl_loader(str(folder), batch_size=4, image_size=16, augment="cifar", num_workers=0,
                                 rank=rank, world_size=2)
        assert len(loader) == 5
        seen += [x for _, b in _stream(loader).batch_bytes() for x in b]
    assert len(seen) == 40 and len(set(seen)) == 40  # the two ranks' epochs together: every image, once
    loader = make_ssl_loader(str(folder), batch_size=8, image_size=16, augment="cifar", num_workers=2)
    stream = _stream(loader)
    by_worker = [list(stream.batch_bytes(w, 2)) for w in range(2)]
    assert [k for k, _ in by_worker[0]] == [0, 2, 4] and [k for k, _ in by_worker[1]] == [1, 3]
    images = [x for w in by_worker for _, b in w for x in b]
    assert len(images) == 40 and len(set(images)) == 40


def test_an_epoch_longer_than_the_data_never_repeats_an_image_within_a_batch(tmp_path):
    folder = _photo_folder(tmp_path / "photos", 12)
    loader = make_ssl_loader(str(folder), batch_size=8, image_size=16, augment="cifar", num_workers=0,
                             epoch_samples=48)
    batches = [b for _, b in _stream(loader).batch_bytes()]
    assert len(batches) == 6 and all(len(set(b)) == 8 for b in batches)
    # 48 samples from 4 passes over 12 images: each image 4 times in the epoch
    counts = {}
    for b in batches:
        for x in b:
            counts[x] = counts.get(x, 0) + 1
    assert sorted(counts.values()) == [4] * 12


def test_large_sets_keep_the_shuffle_buffer(tmp_path):
    samples = [(f"k{i:04d}", {"jpg": _image(i)}) for i in range(120)]
    shards = write_samples(tmp_path / "s" / "train-%06d.tar", samples, maxcount=30)
    loader = make_ssl_loader(shards, batch_size=10, image_size=16, augment="cifar", num_workers=0,
                             shuffle_buffer=50)
    assert loader.shuffle_buffer == 50 and len(loader) == 12
    assert len({x for _, b in _stream(loader).batch_bytes() for x in b}) == 120


# ---------------------------------------------------------------------------------------------------------------------
# layouts other tools write, and how the epoch length is found
# ---------------------------------------------------------------------------------------------------------------------

def _bare_shards(folder: Path, names, per_shard: int, start: int = 0):
    """Shards without our index (as other tools write them)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, name in enumerate(names):
        samples = [(f"s{j}-{i}", {"jpg": _image(start + j * per_shard + i)}) for i in range(per_shard)]
        (written,) = write_samples(folder / f"tmp{j}-%d.tar", samples, index=False)
        Path(written).rename(folder / name)
        paths.append(str(folder / name))
    return paths


def test_timm_info_json(tmp_path):
    d = tmp_path / "hf"
    names = ["imagenet1k-train-0000.tar", "imagenet1k-train-0001.tar", "imagenet1k-validation-0000.tar"]
    _bare_shards(d, names, 6)
    (d / "_info.json").write_text(json.dumps({"name": "imagenet-1k", "splits": {
        "train": {"name": "train", "num_samples": 11, "filenames": names[:2], "shard_lengths": [6, 5]},
        "validation": {"name": "validation", "num_samples": 6, "filenames": names[2:], "shard_lengths": [6]}}}))
    src = open_data(str(d / "imagenet1k-train-{0000..0001}.tar"))
    assert src.num_samples == 11 and "_info.json" in src.how  # the metadata wins over counting
    assert open_data(str(d / "imagenet1k-validation-0000.tar")).num_samples == 6


def test_img2dataset_folder_with_parquet_and_stats(tmp_path):
    d = tmp_path / "i2d"
    _bare_shards(d, ["00000.tar", "00001.tar"], 5)
    for stem, n in (("00000", 5), ("00001", 4)):
        (d / f"{stem}_stats.json").write_text(json.dumps({"count": 6, "successes": n, "failed_to_download": 1}))
        (d / f"{stem}.parquet").write_bytes(b"PAR1 not a shard PAR1")
    (d / "notes.json").write_text("{}")
    for spec in (str(d), str(d / "*")):  # the folder, and a glob of everything in it
        src = open_data(spec)
        assert src.kind == "shards" and len(src.units) == 2 and src.num_samples == 9 and "stats.json" in src.how
        assert sum(src.ignored.values()) >= 2 and any(".parquet" in k for k in src.ignored)  # counted, never read
    loader = make_ssl_loader(str(d), batch_size=3, image_size=16, augment="cifar", num_workers=0)
    assert len(loader) == 3 and len(list(loader)) == 3 and loader.stats()["bad_shard"] == 0


def test_sizes_json_and_counting_tar_headers(tmp_path):
    d = tmp_path / "openclip"
    paths = _bare_shards(d, ["shard-000000.tar", "shard-000001.tar"], 4)
    (d / "sizes.json").write_text(json.dumps({"shard-000000.tar": 4, "shard-000001.tar": 3}))
    assert open_data(paths).num_samples == 7 and "sizes.json" in open_data(paths).how
    (d / "sizes.json").unlink()
    src = open_data(paths)
    assert src.num_samples == 8 and "counted by reading the tar headers" in src.how


def test_other_image_keys_and_formats(tmp_path):
    samples = [(f"a{i}", {"jpeg": _image(i)}) for i in range(4)] + \
              [(f"b{i}", {"png": _image(10 + i, "PNG")}) for i in range(4)] + \
              [(f"c{i}", {"webp": _image(20 + i, "WEBP")}) for i in range(4)]
    shards = write_samples(tmp_path / "k" / "train-%06d.tar", samples, index=False)
    loader = make_ssl_loader(shards, batch_size=4, image_size=16, augment="cifar", num_workers=0)
    assert len(list(loader)) == 3
    stats = loader.stats()
    assert stats["missing_image"] == 0 and stats["undecodable"] == 0 and stats["non_jpeg"] == 8


def test_list_files_and_mixed_folders(tmp_path):
    _photo_folder(tmp_path / "photos", 6)
    (tmp_path / "images.txt").write_text("# my photos\n" + "".join(f"photos/p{i:03d}.jpg\n" for i in range(6)))
    src = open_data("@" + str(tmp_path / "images.txt"))
    assert src.kind == "images" and src.num_samples == 6
    shards = write_samples(tmp_path / "s" / "train-%06d.tar", [(f"k{i}", {"jpg": _image(i)}) for i in range(5)])
    (tmp_path / "shards.txt").write_text("\n".join(Path(p).relative_to(tmp_path).as_posix() for p in shards) + "\n")
    src = open_data("@" + str(tmp_path / "shards.txt"))
    assert src.kind == "shards" and src.num_samples == 5
    (tmp_path / "mixed.txt").write_text("photos/p000.jpg\n" + shards[0] + "\n")
    with pytest.raises(ValueError, match="mixes them"):
        open_data("@" + str(tmp_path / "mixed.txt"))
    with pytest.raises(FileNotFoundError, match="list file"):
        open_data("@" + str(tmp_path / "nothing.txt"))
    # loose photos next to class folders: pretraining takes them all, and says so; other files are counted
    mixed = _photo_folder(tmp_path / "mixed", 4, classes=["cat", "dog"])
    for i in range(3):
        (mixed / f"loose{i}.jpg").write_bytes(_image(100 + i))
    (mixed / "readme.md").write_text("hi")
    src = open_data(str(mixed))
    assert src.num_samples == 7 and "3 loose image(s)" in src.how and src.ignored == {".md file(s), not images": 1}
    with pytest.raises(ValueError, match="no shards .* and no images"):
        (tmp_path / "empty").mkdir()
        open_data(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------------------------------
# labels for evaluation, and what is dropped
# ---------------------------------------------------------------------------------------------------------------------

def _labelled_shards(path: Path, labels, key="cls", json_key=None):
    samples = []
    for i, lab in enumerate(labels):
        entries = {"jpg": _image(200 + i)}
        if json_key is not None:
            entries["json"] = json.dumps({json_key: lab}).encode()
        elif lab is not None:
            entries[key] = str(lab).encode()
        samples.append((f"s{i:03d}", entries))
    return write_samples(path, samples, index=False)


def test_eval_labels_missing_bad_json_and_class_names(tmp_path, capsys):
    # 15 samples: 8 with an integer cls, 3 without, 4 with a non-integer one
    labels = [0, 1, 0, 1, 0, 1, 0, 1, None, None, None, "cat", "dog", "x", "y"]
    shards = _labelled_shards(tmp_path / "t" / "test-%06d.tar", labels)
    loader = make_eval_loader(shards, batch_size=4, image_size=16, num_workers=0)
    n = sum(len(y) for _, y in loader)
    stats = loader.stats()
    assert n == 8 and stats["read"] == 15 and stats["missing_label"] == 3 and stats["bad_label"] == 4
    # class names mapped through classes.txt
    (tmp_path / "t" / "classes.txt").write_text("cat\ndog\n")
    loader = make_eval_loader(shards, batch_size=4, image_size=16, num_workers=0)
    ys = torch.cat([y for _, y in loader])
    assert len(ys) == 10 and loader.stats()["bad_label"] == 2  # "x", "y" are not classes
    # labels in a json field
    js = _labelled_shards(tmp_path / "j" / "val-%06d.tar", [0, 1, 2, 1], json_key="label")
    loader = make_eval_loader(js, batch_size=4, image_size=16, num_workers=0, label_key="label")
    assert torch.cat([y for _, y in loader]).tolist() == [0, 1, 2, 1]
    # every label unusable: refused, naming where it looked and the ways out
    bad = _labelled_shards(tmp_path / "b" / "val-%06d.tar", ["a", "b", "c"])
    with pytest.raises(ValueError, match="no usable label.*'cls' entry.*not a class index in 3.*--label-key"):
        list(make_eval_loader(bad, batch_size=4, image_size=16, num_workers=0))
    # smi-eval: says what it read, evaluated and dropped, and exits 2 when nothing is usable
    common = ["--weights", "random", "--model", "resnet10t", "--image-size", "16", "--workers", "0", "--no-progress",
              "--batch-size", "8"]
    assert eval_main(["knn", "--train", shards[0], "--test", shards[0], "--k", "3", *common]) == 0
    err = capsys.readouterr().err
    assert "test: read 15 samples, evaluated 10, dropped 5 (3 missing label, 2 bad label)" in err
    assert eval_main(["knn", "--train", bad[0], "--test", bad[0], *common]) == 2
    assert "no usable label" in capsys.readouterr().err
    assert eval_main(["knn", "--train", js[0], "--test", js[0], "--label-key", "label", "--k", "2", *common]) == 0


def test_pretrain_from_another_tools_layout_without_epoch_samples(tmp_path):
    """smi-pretrain on an img2dataset folder (epoch length from *_stats.json) and on a pipe: stream with --max-steps
    (one epoch = the run): both train and report what they read."""
    from smi_timm.cli.pretrain import main

    d = tmp_path / "i2d"
    _bare_shards(d, ["00000.tar"], 8)
    (d / "00000_stats.json").write_text(json.dumps({"successes": 8}))
    common = ["--model", "resnet10t", "--projector", "16-16", "--image-size", "16", "--augment", "cifar",
              "--batch-size", "4", "--workers", "0", "--optimizer", "sgd", "--lr", "0.01", "--no-progress",
              "--log-every", "1", "--save-every", "100", "--no-export"]
    assert main([*common, "--data", str(d), "--epochs", "1", "--output-dir", str(tmp_path / "r1")]) == 0
    summary = json.loads((tmp_path / "r1" / "train_summary.json").read_text())
    assert summary["step"] == 2 and summary["data"]["samples"] == 8
    assert main([*common, "--data", f"pipe:cat {d / '00000.tar'}", "--max-steps", "3",
                 "--output-dir", str(tmp_path / "r2")]) == 0
    assert json.loads((tmp_path / "r2" / "train_summary.json").read_text())["step"] == 3
