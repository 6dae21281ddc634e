"""Shard writer: folder / text-file sources, index, skipped files, determinism, CLI."""
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from smi_timm.cli.make_shards import main
from smi_timm.data import write_shards
from smi_timm.data.reading import iter_shard
from smi_timm.data.shards import split_name
from smi_timm.data.stats import DataStats
from smi_timm.data.testing import encode_image, flat_image, make_image_folder, noise_image


def _digest(paths):
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


@pytest.fixture()
def messy_folder(tmp_path):
    """3 classes x 4 flat JPEGs, plus a PNG (RGBA), a grayscale JPEG, a truncated JPEG, a text file, an empty file."""
    root = tmp_path / "src"
    make_image_folder(root, classes=("cat", "dog", "emu"), per_class=4)
    rng = np.random.default_rng(0)
    (root / "cat" / "extra.png").write_bytes(encode_image(noise_image(rng), fmt="PNG", mode="RGBA"))
    (root / "dog" / "gray.jpg").write_bytes(encode_image(noise_image(rng), mode="L"))
    good = encode_image(noise_image(rng))
    (root / "dog" / "broken.jpg").write_bytes(good[: len(good) // 2])
    (root / "emu" / "notes.txt").write_text("not an image\n")
    (root / "emu" / "empty.jpg").write_bytes(b"")
    return root


def test_folder_to_shards_index_and_summary(messy_folder, tmp_path):
    out = tmp_path / "out"
    summary = write_shards(messy_folder, out / "train-%06d.tar", maxcount=5, progress=False)
    # 12 flat + png + gray = 14 images; broken, notes.txt, empty.jpg skipped
    assert summary.num_samples == 14
    assert summary.samples_per_shard == [5, 5, 4]
    assert summary.reencoded == 1
    assert sorted(Path(p).name for p, _ in summary.skipped) == ["broken.jpg", "empty.jpg", "notes.txt"]
    assert summary.num_skipped == 3
    assert summary.classes == ["cat", "dog", "emu"]
    index = json.loads((out / "train.json").read_text())
    assert index["split"] == "train"
    assert index["num_samples"] == 14
    assert index["classes"] == ["cat", "dog", "emu"]
    assert [s["name"] for s in index["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s["samples"] for s in index["shards"]] == [5, 5, 4]
    # The shards hold jpg + cls per sample, keys in order; labels cover all three classes.
    stats = DataStats()
    samples = [s for p in summary.shards for s in iter_shard(p, stats)]
    assert len(samples) == 14 and stats.problems() == {}
    assert all(set(s) == {"__key__", "__url__", "jpg", "cls"} for s in samples)
    assert all(s["jpg"][:2] == b"\xff\xd8" for s in samples)  # the PNG was re-encoded
    assert sorted({int(s["cls"]) for s in samples}) == [0, 1, 2]
    with tarfile.open(summary.shards[0]) as tf:
        for m in tf.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")


def test_original_jpeg_bytes_are_kept(tmp_path):
    root = tmp_path / "src"
    make_image_folder(root, classes=("x",), per_class=3)
    originals = sorted((root / "x").iterdir())
    summary = write_shards(root, tmp_path / "o" / "s-%03d.tar", shuffle_seed=None, progress=False)
    stats = DataStats()
    stored = [s["jpg"] for s in iter_shard(summary.shards[0], stats)]
    assert stored == [p.read_bytes() for p in originals]


def test_writer_is_deterministic(messy_folder, tmp_path):
    a = write_shards(messy_folder, tmp_path / "a" / "train-%06d.tar.gz", maxcount=4, shuffle_seed=3, progress=False)
    b = write_shards(messy_folder, tmp_path / "b" / "train-%06d.tar.gz", maxcount=4, shuffle_seed=3, progress=False,
                     workers=2)
    c = write_shards(messy_folder, tmp_path / "c" / "train-%06d.tar.gz", maxcount=4, shuffle_seed=4, progress=False)
    assert len(a.shards) == len(b.shards) == 4
    assert _digest(a.shards) == _digest(b.shards)
    assert (tmp_path / "a" / "train.json").read_bytes() == (tmp_path / "b" / "train.json").read_bytes()
    assert _digest(a.shards) != _digest(c.shards)
    # gzip output is a real .tar.gz that tarfile and the reader both accept
    with tarfile.open(a.shards[0], "r:gz") as tf:
        assert len(tf.getnames()) == 2 * a.samples_per_shard[0]


def test_maxsize_rolls_shards(tmp_path):
    root = tmp_path / "src"
    make_image_folder(root, classes=("x",), per_class=6)
    s = write_shards(root, tmp_path / "o" / "t-%06d.tar", maxsize=3000, progress=False)
    assert len(s.shards) == 6 and s.num_samples == 6  # each sample needs > 1500 bytes of tar


def test_text_file_source(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.jpg").write_bytes(encode_image(flat_image(40 * i + 10)))
    lines = ["imgs/0.jpg\tzebra", "imgs/1.jpg\tant", "# comment", "", "imgs/2.jpg\tzebra", "bad line without tab",
             f"{root / '3.jpg'}\tant", "imgs/missing.jpg\tant"]
    listing = tmp_path / "list.tsv"
    listing.write_text("\n".join(lines) + "\n")
    s = write_shards(listing, tmp_path / "o" / "val-%04d.tar", progress=False)
    assert s.classes == ["ant", "zebra"]
    assert s.num_samples == 4
    reasons = dict(s.skipped)
    assert any("malformed" in r for r in reasons.values())
    assert any(p.endswith("missing.jpg") and r.startswith("unreadable") for p, r in s.skipped)
    stats = DataStats()
    labels = sorted(int(x["cls"]) for x in iter_shard(s.shards[0], stats))
    assert labels == [0, 0, 1, 1]

    numeric = tmp_path / "num.tsv"
    numeric.write_text("imgs/0.jpg\t7\nimgs/1.jpg\t2\n")
    s2 = write_shards(numeric, tmp_path / "o2" / "val-%04d.tar", progress=False)
    assert s2.classes is None and s2.num_classes == 8
    index = json.loads((tmp_path / "o2" / "val.json").read_text())
    assert index["num_classes"] == 8 and index["classes"] is None


def test_split_name():
    assert split_name("out/train-%06d.tar") == "train"
    assert split_name("val_%03d.tar.gz") == "val"
    assert split_name("%06d.tar") == "shards"


def test_cli_main(messy_folder, tmp_path, capsys):
    rc = main([str(messy_folder), str(tmp_path / "o" / "train-%06d.tar"), "--maxcount", "10", "--no-progress",
               "--summary-json", str(tmp_path / "summary.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "wrote 14 samples" in out and "skipped: 3" in out and "re-encoded to JPEG: 1" in out
    assert json.loads((tmp_path / "summary.json").read_text())["num_skipped"] == 3
    assert main([str(tmp_path / "nope"), str(tmp_path / "o2" / "x-%06d.tar"), "--no-progress"]) == 2
    assert main([str(messy_folder), str(tmp_path / "o3" / "no-pattern.tar"), "--no-progress"]) == 2
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.txt").write_text("x")
    assert main([str(empty), str(tmp_path / "o4" / "x-%06d.tar"), "--no-progress"]) == 1


def test_cli_subprocess(tmp_path):
    """The installed console script (or ``python -m smi_timm.cli.make_shards`` when it is not installed)."""
    root = tmp_path / "src"
    make_image_folder(root, classes=("a", "b"), per_class=2)
    exe = shutil.which("smi-make-shards")
    cmd = [exe] if exe else [sys.executable, "-m", "smi_timm.cli.make_shards"]
    r = subprocess.run(cmd + [str(root), str(tmp_path / "o" / "tr-%06d.tar"), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote 4 samples" in r.stdout
    assert (tmp_path / "o" / "tr.json").is_file()


def test_unlabeled_folder_to_shards(tmp_path):
    """A folder without class sub-folders gives label-free shards; --unlabeled takes every image recursively; the
    SSL loader trains on them, the eval loader refuses them."""
    from smi_timm.data import make_eval_loader, make_ssl_loader

    flat = tmp_path / "photos"
    flat.mkdir()
    for i in range(5):
        (flat / f"p{i}.jpg").write_bytes(encode_image(flat_image(20 + 30 * i)))
    (flat / "notes.txt").write_text("not an image\n")
    s = write_shards(flat, tmp_path / "u" / "train-%06d.tar", progress=False)
    assert s.num_samples == 5 and not s.labeled and s.classes is None and s.num_classes == 0
    assert "unlabeled" in s.format() and s.num_skipped == 1
    index = json.loads((tmp_path / "u" / "train.json").read_text())
    assert index["labeled"] is False and index["num_samples"] == 5 and index["classes"] is None
    stats = DataStats()
    assert all(set(x) == {"__key__", "__url__", "jpg"} for x in iter_shard(s.shards[0], stats))
    ssl = make_ssl_loader(s.shards, batch_size=2, image_size=32, num_workers=0)
    assert len(ssl) == 2 and len(list(ssl)) == 2
    with pytest.raises(ValueError, match="evaluation needs labels"):
        make_eval_loader(s.shards, batch_size=2, image_size=32)
    # a nested folder: sub-folders would be classes unless --unlabeled; the loose photos next to them have no class,
    # so the writer refuses them (naming the fix) instead of dropping them
    (flat / "2024" / "june").mkdir(parents=True)
    (flat / "2024" / "june" / "q.jpg").write_bytes(encode_image(flat_image(90)))
    with pytest.raises(ValueError, match=r"5 image\(s\) directly in it.*next to 1 class folder.*--unlabeled"):
        write_shards(flat, tmp_path / "l" / "train-%06d.tar", progress=False)
    assert main([str(flat), str(tmp_path / "l" / "train-%06d.tar"), "--no-progress"]) == 2
    assert main([str(flat), str(tmp_path / "r" / "train-%06d.tar"), "--unlabeled", "--no-progress"]) == 0
    assert json.loads((tmp_path / "r" / "train.json").read_text())["num_samples"] == 6
    with pytest.raises(SystemExit):  # mutually exclusive
        main([str(flat), str(tmp_path / "x" / "t-%06d.tar"), "--labeled", "--unlabeled"])
    with pytest.raises(ValueError, match="no class sub-folders"):
        write_shards(tmp_path / "u", tmp_path / "y" / "t-%06d.tar", progress=False, unlabeled=False)


def test_eval_loader_refuses_shards_without_labels_and_no_index(tmp_path):
    """Label-free shards without an index: the eval loader says so at the end of its pass."""
    from smi_timm.data import make_eval_loader
    from smi_timm.data.testing import write_samples

    samples = [(f"k{i}", {"jpg": encode_image(flat_image(10 * i))}) for i in range(4)]
    (path,) = write_samples(tmp_path / "n-%06d.tar", samples, index=False)
    loader = make_eval_loader(path, batch_size=2, image_size=32, num_workers=0)
    with pytest.raises(ValueError, match="no usable label: the evaluation looked for the 'cls' entry and found it "
                                         "missing in 4"):
        list(loader)
