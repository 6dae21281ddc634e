"""Spatial localisation (smi_timm.spatial, smi-analyze --spatial): maps, concentration scalars, ResNet and ViT
feature maps, the refusal of maps under 4x4, and the command end to end on the bundled sample."""
import json
import math
import socket

import pytest
import timm
import torch

from smi_timm.cli.analyze import main
from smi_timm.spatial import concentration, feature_map, run_spatial, spatial_maps


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_concentration_uniform_peak_and_negative_values():
    uniform = torch.ones(2, 5, 5)
    c = concentration(uniform, top_frac=0.2)
    assert torch.allclose(c["top_mass"], torch.full((2,), 5 / 25)) and torch.allclose(c["entropy"], torch.ones(2))
    peak = torch.zeros(1, 4, 4)
    peak[0, 1, 2] = 3.0
    c = concentration(peak)
    assert c["top_mass"].item() == pytest.approx(1.0) and c["entropy"].item() == pytest.approx(0.0, abs=1e-6)
    half = torch.zeros(1, 4, 4)
    half[0, :2] = 1.0  # mass spread evenly over 8 of 16 locations
    c = concentration(half, top_frac=0.25)
    assert c["top_mass"].item() == pytest.approx(0.5)
    assert c["entropy"].item() == pytest.approx(math.log(8) / math.log(16))
    negative = -torch.ones(1, 4, 4)  # a cosine map pointing away everywhere counts as uniform
    assert concentration(negative)["entropy"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="top_frac"):
        concentration(uniform, top_frac=0.0)


def test_maps_norm_and_cosine():
    fmap = torch.zeros(1, 2, 2, 2)
    fmap[0, :, 0, 0] = torch.tensor([3.0, 4.0])   # norm 5, along the pooled direction
    fmap[0, :, 1, 1] = torch.tensor([0.0, -1.0])  # norm 1, cosine -0.8
    m = spatial_maps(fmap, torch.tensor([[3.0, 4.0]]))
    assert m["norm"][0, 0, 0] == pytest.approx(5.0) and m["norm"][0, 1, 1] == pytest.approx(1.0)
    assert m["cosine"][0, 0, 0] == pytest.approx(1.0) and m["cosine"][0, 1, 1] == pytest.approx(-0.8)


def test_feature_map_resnet_and_vit_patch_tokens():
    torch.manual_seed(0)
    resnet = timm.create_model("resnet10t", num_classes=0).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        fm = feature_map(resnet, x)
        pooled = resnet(x)
    assert fm["map"].shape == (2, 512, 4, 4) and fm["prefix"] == 0 and fm["pre_norm"] is fm["map"]
    assert torch.allclose(fm["pooled"], pooled, atol=1e-5)  # the backbone's own pooled output
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, reg_tokens=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fm = feature_map(vit, x)
        tokens = vit.forward_features(x)
        pooled = vit(x)
    assert fm["prefix"] == 3  # class token + 2 registers dropped
    assert fm["map"].shape == (2, 192, 4, 4)
    # location (i, j) is patch token 3 + 4 i + j
    assert torch.equal(fm["map"][1, :, 2, 1], tokens[1, 3 + 4 * 2 + 1])
    assert torch.allclose(fm["pooled"], pooled, atol=1e-5)
    # activation norms are read before the final LayerNorm (after it every token has about the same norm)
    post, pre = fm["map"].norm(dim=1), fm["pre_norm"].norm(dim=1)
    assert post.std() < 0.01 * pre.std()


def test_run_spatial_compares_backbones_and_refuses_small_maps(tmp_path):
    res = run_spatial(["random", "random"], "sample:test", tmp_path / "sp", labels=["a", "b"], image_size=128,
                      model="resnet10t", num_images=2, num_samples=8, workers=0, seed=3)
    assert [b["label"] for b in res["backbones"]] == ["a", "b"] and res["num_images"] == 8
    a, b = res["backbones"]
    assert a["map_size"] == [4, 4] and a["uniform_top_mass"] == pytest.approx(4 / 16)
    assert a["norm"] == b["norm"]  # the same weights on the same images
    assert 4 / 16 <= a["norm"]["top_mass"] <= 1 and 0 < a["norm"]["entropy"] <= 1
    saved = json.loads((tmp_path / "sp" / "spatial.json").read_text())
    assert saved["backbones"][0]["norm"] == a["norm"]
    assert (tmp_path / "sp" / "spatial.png").stat().st_size > 5000
    with pytest.raises(ValueError, match=r"1x1 at 32 px, smaller than 4x4.*--image-size 128"):
        run_spatial(["random"], "sample:test", tmp_path / "small", model="resnet10t", image_size=32, workers=0,
                    num_samples=4)
    with pytest.raises(ValueError, match="one --label per --weights"):
        run_spatial(["random"], "sample:test", tmp_path / "x", labels=["a", "b"], model="resnet10t")


def test_cli_spatial(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["--spatial", "--weights", "random", "--model", "vit_tiny_patch16_224", "--timm-kwargs",
               '{"img_size": 32, "patch_size": 8}', "--label", "vit", "--data", "sample:test", "--num-samples", "4",
               "--num-images", "2", "--workers", "0", "--out-dir", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "| vit | 4x4 |" in text and (out / "spatial.png").is_file()
    rc = main(["--spatial", "--weights", "random", "--model", "resnet10t", "--data", "sample:test", "--image-size",
               "32", "--num-samples", "2", "--workers", "0", "--out-dir", str(tmp_path / "small")])
    assert rc == 2 and "smaller than 4x4" in capsys.readouterr().err
    rc = main(["--weights", "random", "--weights", "random", "--model", "resnet10t", "--data", "sample:test"])
    assert rc == 2 and "only with --spatial" in capsys.readouterr().err
