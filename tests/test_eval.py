"""Evaluation: feature extraction, weighted kNN, linear probe, feature cache and the smi-eval command."""
import json
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from smi_timm.eval.features import (
    extract_features,
    feature_cache_key,
    load_cached_features,
    save_cached_features,
)
from smi_timm.eval.knn import knn_classify, knn_classify_multi
from smi_timm.eval.linear import train_linear_probe

REPO_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data next to the repository


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _blobs(n, num_classes=10, dim=32, spread=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    labels = torch.arange(n) % num_classes
    return centers[labels] + spread * torch.randn(n, dim, generator=g), labels


def _shuffled(labels, seed=1):
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


# ---------------------------------------------------------------------------------------------------------------------
# kNN
# ---------------------------------------------------------------------------------------------------------------------

def test_knn_separable_and_chance():
    xtr, ytr = _blobs(1000)
    xte, yte = _blobs(500, seed=1)
    acc = knn_classify(xtr, ytr, xte, yte, k=20, T=0.1)
    assert acc["top1"] > 99 and acc["top5"] == 100
    chance = knn_classify(xtr, _shuffled(ytr), xte, yte, k=20, T=0.1)
    assert chance["top1"] < 25 and chance["top5"] < 75  # 10 classes: ~10% / ~50%


def test_knn_weights_and_chunking():
    # one test point; neighbours: class 0 very close (sim ~1), two class-1 points less similar
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.05]])
    # T small: the exp(sim/T) weight of the closest point dominates two farther votes
    assert knn_classify(train, labels, test, torch.tensor([0]), k=3, T=0.05)["top1"] == 100
    # T large: weights ~equal, majority (class 1) wins
    assert knn_classify(train, labels, test, torch.tensor([0]), k=3, T=100.0)["top1"] == 0
    # k larger than the bank is clipped; chunk size does not change results; multi-k == single k
    xtr, ytr = _blobs(300, spread=3.0)
    xte, yte = _blobs(97, spread=3.0, seed=2)
    a = knn_classify(xtr, ytr, xte, yte, k=1000, chunk_size=7)
    b = knn_classify(xtr, ytr, xte, yte, k=1000, chunk_size=4096)
    assert a == b
    multi = knn_classify_multi(xtr, ytr, xte, yte, ks=(200, 20))
    assert multi[20] == knn_classify(xtr, ytr, xte, yte, k=20)
    assert multi[200] == knn_classify(xtr, ytr, xte, yte, k=200)
    with pytest.raises(ValueError, match="same D"):
        knn_classify(xtr, ytr, xte[:, :5], yte)


# ---------------------------------------------------------------------------------------------------------------------
# linear probe
# ---------------------------------------------------------------------------------------------------------------------

def test_linear_probe_separable_and_chance():
    xtr, ytr = _blobs(2000, spread=2.0)
    xte, yte = _blobs(500, spread=2.0, seed=3)
    xtr, xte = xtr * 50 + 7, xte * 50 + 7  # badly scaled features: standardisation must handle them
    acc = train_linear_probe(xtr, ytr, xte, yte, epochs=10, lr=0.1, batch_size=256, progress=False)
    assert acc["top1"] > 95 and acc["train_top1"] > 95
    chance = train_linear_probe(xtr, _shuffled(ytr), xte, yte, epochs=10, batch_size=256, progress=False)
    assert chance["top1"] < 25
    again = train_linear_probe(xtr, ytr, xte, yte, epochs=10, lr=0.1, batch_size=256, progress=False)
    assert again == acc  # seeded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_linear_probe_on_cuda_matches_cpu():
    # CPU features probed on the GPU: the seeded initial weights and batch order are drawn on the CPU for any device
    xtr, ytr = _blobs(1000, spread=2.0)
    xte, yte = _blobs(300, spread=2.0, seed=3)
    cpu = train_linear_probe(xtr, ytr, xte, yte, epochs=3, batch_size=256, progress=False)
    gpu = train_linear_probe(xtr, ytr, xte, yte, epochs=3, batch_size=256, progress=False, device="cuda")
    assert gpu["top1"] == pytest.approx(cpu["top1"], abs=1.0)


def test_feature_cache_roundtrip(tmp_path):
    feats = (torch.randn(5, 3), torch.arange(5), torch.randn(2, 3), torch.arange(2))
    key = feature_cache_key(weights="abc", train=["a"], test=["b"], image_size=32)
    assert key != feature_cache_key(weights="abc", train=["a"], test=["b"], image_size=64)
    assert load_cached_features(key, tmp_path) is None
    path = save_cached_features(key, feats, tmp_path)
    assert path.is_file() and key in path.name
    loaded = load_cached_features(key, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded, feats))


# ---------------------------------------------------------------------------------------------------------------------
# feature extraction
# ---------------------------------------------------------------------------------------------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).mean(dim=(2, 3))


def test_extract_features_modes_flip_amp():
    torch.manual_seed(0)
    net = _Net().train()
    batches = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])), (torch.randn(3, 3, 8, 8), [1, 1, 0])]
    feats, labels = extract_features(net, batches, progress=False)
    assert net.training  # restored
    assert feats.shape == (7, 4) and feats.dtype == torch.float32 and labels.dtype == torch.int64
    assert labels.tolist() == [0, 1, 2, 3, 1, 1, 0]
    net.eval()
    with torch.no_grad():
        ref = net(batches[0][0])
        ref_flip = net(batches[0][0].flip(-1))
    assert torch.allclose(feats[:4], ref, atol=1e-6)
    f2, l2 = extract_features(net, batches, flip=True, progress=False)
    assert f2.shape == (14, 4) and l2.tolist() == labels.tolist() * 2
    assert torch.allclose(f2[7:11], ref_flip, atol=1e-6)
    f3, _ = extract_features(net, batches, max_batches=1, progress=False)
    assert f3.shape == (4, 4)
    f4, _ = extract_features(net, batches, amp_dtype="bf16", progress=False)
    assert f4.dtype == torch.float32 and torch.allclose(f4, feats, atol=0.1)
    # tuple outputs (SSLModel) use output_index
    two = nn.Module()
    two.forward = lambda x: (net(x), net(x) * 2)
    f5, _ = extract_features(two, batches, output_index=1, progress=False)
    assert torch.allclose(f5, 2 * feats, atol=1e-5)
    with pytest.raises(ValueError, match="no batches"):
        extract_features(net, [], progress=False)


def test_knn_evaluate_one_path_with_cache(tmp_path):
    from smi_timm.eval.features import extract_pair
    from smi_timm.eval.knn import knn_evaluate

    torch.manual_seed(0)
    net = _Net()
    g = torch.Generator().manual_seed(1)
    bank = [(torch.randn(6, 3, 8, 8, generator=g), torch.arange(6) % 3) for _ in range(3)]
    query = [(torch.randn(5, 3, 8, 8, generator=g), torch.arange(5) % 3) for _ in range(2)]
    res = knn_evaluate(net, bank, query, ks=(4, 2), T=0.5, image_size=8)
    bank_f, bank_l = extract_features(net, bank, progress=False)
    query_f, query_l = extract_features(net, query, progress=False)
    assert res.accuracy == knn_classify_multi(bank_f, bank_l, query_f, query_l, ks=(4, 2), T=0.5)
    assert torch.equal(res.features.bank, bank_f) and res.features.num_classes == 3 and not res.features.cached
    assert res.monitor(2) == {"knn_top1": res.accuracy[2]["top1"], "knn_top5": res.accuracy[2]["top5"]}
    assert set(res.features.times) == {"extract_train_s", "extract_test_s"}
    # the on-disk cache: a hit extracts nothing (the loaders are not even iterated)
    first = knn_evaluate(net, bank, query, ks=(4,), image_size=8, cache_key="k1", cache_dir=tmp_path)
    again = knn_evaluate(net, iter(()), iter(()), ks=(4,), image_size=8, cache_key="k1", cache_dir=tmp_path)
    assert again.features.cached and again.accuracy == first.accuracy
    assert (tmp_path / "features-k1.safetensors").is_file()
    flipped = extract_pair(net, bank, query, image_size=8, flip=True)
    assert flipped.bank.shape[0] == 36 and flipped.query.shape[0] == 10 and flipped.flipped
    plain = flipped.unflipped()  # kNN's view: the originals only
    assert torch.equal(plain.bank, bank_f) and torch.equal(plain.bank_labels, bank_l) and not plain.flipped


# ---------------------------------------------------------------------------------------------------------------------
# smi-eval end to end on the bundled sample
# ---------------------------------------------------------------------------------------------------------------------

def _sample():
    from smi_timm.data import sample_shards

    return sample_shards("train"), sample_shards("test")


def test_cli_knn_linear_and_export_dir(tmp_path, capsys):
    from smi_timm.cli.eval import main
    from smi_timm.eval import EvalSettings, run_knn
    from smi_timm.export import export_backbone
    from smi_timm.models import create_ssl_model
    from smi_timm.resolve import BackboneSource

    train, test = _sample()
    common = ["--train", train[0], "--test", test[0], "--batch-size", "32", "--max-batches", "2", "--workers", "0",
              "--no-progress"]
    out = tmp_path / "knn.json"
    table = tmp_path / "table.md"
    rc = main(["knn", "--model", "resnet18", "--weights", "random", "--image-size", "32", "--out", str(out),
               "--table", str(table), "--cache-dir", str(tmp_path / "cache"), *common])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["num_train"] == 64 and res["num_test"] == 64 and res["num_features"] == 512
    assert set(res["results"]) == {"k=200", "k=20"} and 0 <= res["top1"] <= 100
    assert res["k"] == 200 and res["T"] == 0.1 and res["weights"] == "random (seed 0)"
    assert {"extract_train_s", "extract_test_s", "knn_s", "total_s"} <= set(res["times"])
    printed = capsys.readouterr().out
    assert res["table_row"] in printed
    assert table.read_text().startswith("| model |") and table.read_text().count("\n") == 3

    # linear probe reuses the cached features (same weights, data and size)
    rc = main(["linear", "--model", "resnet18", "--weights", "random", "--image-size", "32", "--epochs", "3",
               "--out", str(tmp_path / "lin.json"), "--table", str(table), "--cache-dir", str(tmp_path / "cache"),
               *common])
    lin = json.loads((tmp_path / "lin.json").read_text())
    assert rc == 0 and lin["features_cached"] is True and lin["epochs"] == 3 and 0 <= lin["top1"] <= 100
    assert table.read_text().count("\n") == 4  # header written once

    # an export folder supplies model, stem and image size; same weights -> same features as the file itself
    ssl = create_ssl_model("resnet18", projector="none", cifar_stem=True)
    export_backbone(ssl, tmp_path / "export", {"model": "resnet18", "cifar_stem": True, "image_size": 32})
    quick = EvalSettings(batch_size=16, max_batches=1, workers=0, k=5, progress=False)
    r1 = run_knn(str(tmp_path / "export"), train[0], test[0], quick)
    assert r1["model"] == "resnet18" and r1["cifar_stem"] and r1["image_size"] == 32
    assert r1["weights_sha256"] == json.loads((tmp_path / "export" / "config.json").read_text())["sha256"]
    r2 = run_knn(BackboneSource(str(tmp_path / "export" / "model.safetensors"), model="resnet18", cifar_stem=True),
                 train[0], test[0], quick)
    assert r2["results"] == r1["results"] and "table_row" not in r2  # the library returns results, no table

    # clear errors
    assert main(["knn", "--weights", "random", *common]) == 2
    assert "needs --model" in capsys.readouterr().err
    assert main(["knn", "--weights", str(tmp_path / "nothing"), *common]) == 2
    assert main(["knn", "--weights", "timm:resnet18", *common]) == 2
    assert "--weights-file" in capsys.readouterr().err


def test_cli_timm_weights_file_and_image_folder(tmp_path):
    import safetensors.torch as st
    import timm
    from PIL import Image

    from smi_timm.eval import EvalSettings, run_linear
    from smi_timm.resolve import BackboneSource

    for split in ("train", "test"):
        for c, color in enumerate(((250, 10, 10), (10, 10, 250))):
            d = tmp_path / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(6):
                noise = torch.randint(0, 20, (32, 32, 3), generator=torch.Generator().manual_seed(i + 10 * c))
                arr = (torch.tensor(color).view(1, 1, 3) + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(d / f"{i}.png")
    src = timm.create_model("resnet18", num_classes=1000)  # a classifier checkpoint: its head is ignored
    st.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    res = run_linear(BackboneSource("timm:resnet18", weights_file=str(tmp_path / "r18.safetensors")),
                     str(tmp_path / "train"), str(tmp_path / "test"),
                     EvalSettings(image_size=32, probe_epochs=20, batch_size=8, workers=0, progress=False))
    assert res["num_train"] == 12 and res["num_test"] == 12 and res["num_classes"] == 2
    assert res["top1"] == 100.0  # red vs blue
    assert res["weights"] == "timm:resnet18" and len(res["weights_sha256"]) == 64


# ---------------------------------------------------------------------------------------------------------------------
# transfer
# ---------------------------------------------------------------------------------------------------------------------

def test_run_transfer_resolves_once_and_extracts_once_per_size(monkeypatch):
    import smi_timm.eval.run as run
    import smi_timm.resolve as resolve
    from smi_timm.eval import EvalSettings, run_knn, run_linear
    from smi_timm.eval.transfer import parse_image_sizes, run_transfer
    from smi_timm.resolve import BackboneSource

    train, test = _sample()
    source = BackboneSource("random", model="resnet10t")
    settings = EvalSettings(batch_size=32, max_batches=2, workers=0, progress=False, k=20, extra_k=(5,),
                            probe_epochs=3, flip=True)
    calls = {"resolve": 0, "extract": []}
    real_resolve, real_extract = resolve.resolve_backbone, run.extract_pair

    def counting_resolve(*a, **kw):
        calls["resolve"] += 1
        return real_resolve(*a, **kw)

    def counting_extract(model, bank, query, **kw):
        calls["extract"].append((kw["image_size"], kw["flip"]))
        return real_extract(model, bank, query, **kw)

    monkeypatch.setattr(resolve, "resolve_backbone", counting_resolve)
    monkeypatch.setattr(run, "extract_pair", counting_extract)
    res = run_transfer(source, train[0], test[0], settings, image_sizes=(32, 48))
    # one resolution (one read and hash of the weights); one extraction per size, shared by kNN and the probe,
    # with the flipped training images extracted in the same pass
    assert calls == {"resolve": 1, "extract": [(32, True), (48, True)]}
    assert [ev["image_size"] for ev in res["evals"]] == [32, 48]
    assert all(set(ev["knn"]) == {"k=20", "k=5"} and ev["num_train"] == 64 for ev in res["evals"])
    # the same numbers as the single evaluations (kNN never sees the flipped copies)
    knn = run_knn(source, train[0], test[0], settings.replace(image_size=48))
    lin = run_linear(source, train[0], test[0], settings.replace(image_size=48))
    assert res["evals"][1]["knn"] == knn["results"] and res["evals"][1]["linear"]["top1"] == lin["top1"]
    assert lin["flip"] is True and lin["num_train"] == 64
    assert len(res["table_rows"]) == 6 and "| 48 | kNN k=5, T=0.1 |" in res["table_rows"][4]
    assert parse_image_sizes(["native", "64"]) == [None, 64]
    with pytest.raises(ValueError, match="'abc'"):
        parse_image_sizes(["abc"])


def test_cli_transfer_several_backbones(tmp_path, capsys):
    from smi_timm.cli.eval import main
    from smi_timm.export import export_backbone
    from smi_timm.models import create_ssl_model
    from smi_timm.resolve import resolve_backbone

    train, test = _sample()
    ssl = create_ssl_model("resnet10t", projector="none")
    export_backbone(ssl, tmp_path / "export", {"model": "resnet10t", "cifar_stem": False, "image_size": 32})
    common = ["--train", train[0], "--test", test[0], "--batch-size", "32", "--max-batches", "1", "--workers", "0",
              "--no-progress", "--epochs", "2"]
    # --model applies to the random floor only; the export records its own architecture and size ("native")
    table = tmp_path / "t.md"
    rc = main(["transfer", "--weights", str(tmp_path / "export"), "--weights", "random", "--model", "resnet10t",
               "--image-sizes", "native", "40", "--k", "10", "5", "--out", str(tmp_path / "t.json"),
               "--table", str(table), *common])
    assert rc == 0
    assert table.read_text().count("| model |") == 1 and table.read_text().count("\n") == 2 + 12
    res = json.loads((tmp_path / "t.json").read_text())["backbones"]
    assert [r["model"] for r in res] == ["resnet10t", "resnet10t"]
    assert [ev["image_size"] for ev in res[0]["evals"]] == [32, 40]
    native = resolve_backbone("random", model="resnet10t").default_image_size()  # timm's size for resnet10t
    assert [ev["image_size"] for ev in res[1]["evals"]] == [native, 40]
    assert capsys.readouterr().out.count("| kNN k=10, T=0.1 |") == 4
    assert main(["transfer", "--weights", "random", "--model", "resnet10t", "--image-sizes", "big", *common]) == 2
    assert "'big'" in capsys.readouterr().err


@pytest.mark.skipif(not (REPO_DATA / "flowers12" / "test-000000.tar").is_file(), reason="no ../shared/data/flowers12")
def test_transfer_reads_shards_without_an_index():
    from smi_timm.eval import EvalSettings
    from smi_timm.eval.transfer import run_transfer
    from smi_timm.resolve import BackboneSource

    d = REPO_DATA / "flowers12"
    res = run_transfer(BackboneSource("random", model="resnet10t"), str(d / "train-000000.tar"),
                       str(d / "test-000000.tar"), EvalSettings(k=5, extra_k=(), probe_epochs=1, batch_size=24,
                                                                max_batches=1, workers=0, progress=False),
                       image_sizes=(32,))
    assert res["evals"][0]["num_train"] == 24 and res["evals"][0]["num_test"] == 24
