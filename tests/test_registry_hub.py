"""timm registry names and torch.hub entry points: offline loading, published-weights flow, error messages."""
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch as st
import timm
import torch

import smi_timm  # noqa: F401  (registers the smi_* names)
from smi_timm.export import export_backbone
from smi_timm.models import create_ssl_model, registry
from smi_timm.models.hub import WeightsHashError, load_model
from smi_timm.models.registry import SMI_MODELS, WeightsMismatchError, WeightsNotPublishedError

REPO = Path(__file__).resolve().parents[1]
HUB_ENTRIES = ["smi_resnet18", "smi_resnet50", "smi_vit_small_patch16_224", "smi_resnet18_cifar", "smi_resnet50_cifar"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails at once instead of hanging."""
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def _save_backbone(model, path):
    st.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_names_registered_headless():
    for name in SMI_MODELS:
        assert timm.is_model(name), name
    m = timm.create_model("smi_resnet18_cifar")
    assert m.num_classes == 0 and m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, torch.nn.Identity)
    assert timm.create_model("smi_resnet18").conv1.kernel_size == (7, 7)
    cfg = timm.create_model("smi_resnet50").pretrained_cfg
    assert cfg["hf_hub_id"] == "smi-timm/smi_resnet50.in1k" and cfg["num_classes"] == 0


def test_timm_pretrained_with_file_resnet50(tmp_path):
    ssl = create_ssl_model("resnet50", projector="16", cifar_stem=False).eval()
    out = tmp_path / "export"
    export_backbone(ssl, out, {"model": "resnet50", "image_size": 64})
    model = timm.create_model("smi_resnet50", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    ref = ssl.backbone.state_dict()
    got = model.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), ssl.backbone(x), atol=1e-5)
    # num_classes > 0: the backbone keeps the weights, the head is new
    clf = timm.create_model("smi_resnet50", pretrained=True, num_classes=7,
                            pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    assert clf.fc.out_features == 7
    assert torch.equal(clf.layer4[2].conv3.weight, ref["layer4.2.conv3.weight"])


def test_timm_pretrained_accepts_full_ssl_state_dict(tmp_path):
    ssl = create_ssl_model("resnet18", projector="32-16", cifar_stem=True)
    path = tmp_path / "ckpt.safetensors"
    st.save_file({k: v.contiguous() for k, v in ssl.state_dict().items()}, str(path))
    model = timm.create_model("smi_resnet18_cifar", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.conv1.weight, ssl.backbone.conv1.weight)


def test_timm_pretrained_without_file_raises_not_published():
    with pytest.raises(WeightsNotPublishedError, match="no SMI weights have been published.*weights="):
        timm.create_model("smi_resnet18", pretrained=True)


def test_stem_mismatch_names_conv1(tmp_path):
    path = _save_backbone(timm.create_model("smi_resnet18_cifar"), tmp_path / "cifar.safetensors")
    msg = r"conv1\.weight: file \[64, 3, 3, 3\] vs model \[64, 3, 7, 7\].*_cifar"
    with pytest.raises(WeightsMismatchError, match=msg):
        timm.create_model("smi_resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize("entry", HUB_ENTRIES)
def test_hub_load_local_random(entry):
    model = torch.hub.load(str(REPO), entry, source="local", pretrained=False, trust_repo=True)
    assert model.num_classes == 0
    assert model.pretrained_cfg["architecture"] == entry


def test_hub_load_local_with_weights(tmp_path, hub_dir):
    src = timm.create_model("smi_resnet18_cifar")
    path = _save_backbone(src, tmp_path / "w.safetensors")
    model = torch.hub.load(str(REPO), "smi_resnet18_cifar", source="local", weights=str(path), trust_repo=True)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # a folder holding model.safetensors works too, and num_classes adds a head
    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copy(path, folder / "model.safetensors")
    clf = torch.hub.load(str(REPO), "smi_resnet18_cifar", source="local", weights=str(folder), num_classes=3,
                         trust_repo=True)
    assert clf.fc.out_features == 3 and torch.equal(clf.conv1.weight, src.conv1.weight)


def test_hub_url_with_hash(tmp_path, hub_dir):
    src = timm.create_model("smi_resnet18")
    path = _save_backbone(src, tmp_path / "w.safetensors")
    url = path.as_uri()
    model = load_model("smi_resnet18", weights=url, sha256=_sha(path), progress=False)
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    cached = list((hub_dir / "checkpoints").iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("w.safetensors")
    with pytest.raises(WeightsHashError, match="does not match sha256"):
        load_model("smi_resnet18", weights=url, sha256="0" * 64, progress=False)  # cached copy, wrong hash


def test_hub_wrong_hash_fresh_download(tmp_path, hub_dir):
    path = _save_backbone(timm.create_model("smi_resnet18"), tmp_path / "x.safetensors")
    with pytest.raises(WeightsHashError, match="does not match sha256 deadbeef"):
        load_model("smi_resnet18", weights=path.as_uri(), sha256="deadbeef", progress=False)
    assert not any((hub_dir / "checkpoints").glob("*x.safetensors"))  # nothing half-written stays in the cache
    with pytest.raises(WeightsHashError, match="sha256 of"):  # local files are checked too
        load_model("smi_resnet18", weights=str(path), sha256="deadbeef")


def test_hub_published_flow(tmp_path, hub_dir, monkeypatch):
    src = timm.create_model("smi_resnet18")
    path = _save_backbone(src, tmp_path / "model.safetensors")
    monkeypatch.setitem(registry.PUBLISHED_SHA256, "smi_resnet18.in1k", _sha(path))
    monkeypatch.setattr(registry, "weights_url", lambda name_tag: path.as_uri())
    model = torch.hub.load(str(REPO), "smi_resnet18", source="local", pretrained=True, progress=False,
                           trust_repo=True)
    assert torch.equal(model.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    monkeypatch.setitem(registry.PUBLISHED_SHA256, "smi_resnet18.in1k", "f" * 64)
    shutil.rmtree(hub_dir / "checkpoints")
    with pytest.raises(WeightsHashError):
        load_model("smi_resnet18", pretrained=True, progress=False)


def test_hub_errors(tmp_path):
    with pytest.raises(WeightsNotPublishedError, match="weights="):
        torch.hub.load(str(REPO), "smi_resnet50", source="local", trust_repo=True)  # pretrained=True default
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("smi_resnet18", weights=str(tmp_path / "missing.safetensors"))
    pth = tmp_path / "weights.pth"
    torch.save({"a": torch.zeros(1)}, pth)
    with pytest.raises(ValueError, match="pickle"):
        load_model("smi_resnet18", weights=str(pth))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model("smi_resnet18", weights=str(junk))
    # tensors of another architecture: names the keys
    r18 = _save_backbone(timm.create_model("smi_resnet18"), tmp_path / "r18.safetensors")
    with pytest.raises(WeightsMismatchError) as info:
        load_model("smi_resnet50", weights=str(r18))
    msg = str(info.value)
    assert "smi_resnet50" in msg and "missing key" in msg and "layer1.0.conv3.weight" in msg
    assert "layer1.0.conv1.weight: file [64, 64, 3, 3] vs model [64, 64, 1, 1]" in msg
    partial = tmp_path / "partial.safetensors"
    sd = timm.create_model("smi_resnet18").state_dict()
    sd.pop("layer4.1.bn2.weight")
    sd["extra.weight"] = torch.zeros(2)
    st.save_file({k: v.contiguous() for k, v in sd.items()}, str(partial))
    with pytest.raises(WeightsMismatchError, match=r"missing key\(s\) \(layer4\.1\.bn2\.weight\).*unexpected key"
                                                   r"\(s\) \(extra\.weight\)"):
        load_model("smi_resnet18", weights=str(partial))


def test_hubconf_imports_light_from_plain_clone(tmp_path):
    """hubconf works from a copy of the repository (package not installed) and pulls no heavy modules."""
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(REPO / "hubconf.py", clone / "hubconf.py")
    shutil.copytree(REPO / "smi_timm", clone / "smi_timm", ignore=shutil.ignore_patterns("__pycache__"))
    script = textwrap.dedent(f"""
        import sys, torch
        m = torch.hub.load({str(clone)!r}, "smi_resnet18_cifar", source="local", pretrained=False,
                           trust_repo=True)
        import smi_timm
        assert smi_timm.__file__.startswith({str(clone)!r}), smi_timm.__file__
        heavy = sorted(k for k in sys.modules if k.split(".")[0] in ("webdataset", "accelerate")
                       or k.startswith(("smi_timm.kernels", "smi_timm.data", "smi_timm.losses", "smi_timm.train")))
        assert not heavy, heavy
        print("ok", m.num_classes)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok 0" in proc.stdout
