"""smi_timm.resolve: one backbone resolver for random / timm:NAME / export / run / checkpoint / .safetensors."""
import json
import socket

import pytest
import safetensors.torch as st
import torch

from smi_timm.export import export_backbone
from smi_timm.layout import step_dir_name
from smi_timm.models import create_ssl_model
from smi_timm.models.registry import WeightsMismatchError
from smi_timm.resolve import resolve_backbone

RUN_CONFIG = {"model": "resnet18", "projector": "32-16", "cifar_stem": True, "timm_kwargs": {}, "image_size": 32,
              "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def ssl():
    torch.manual_seed(3)
    return create_ssl_model("resnet18", projector="32-16", cifar_stem=True)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _save(state, path):
    st.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_random_is_seeded_and_leaves_the_global_rng_alone():
    before = torch.random.get_rng_state()
    a = resolve_backbone("random", model="resnet18", cifar_stem=True, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert _same(a.backbone, resolve_backbone("random", model="resnet18", cifar_stem=True, seed=1).backbone)
    assert not _same(a.backbone, resolve_backbone("random", model="resnet18", cifar_stem=True, seed=2).backbone)
    torch.manual_seed(0)  # the same weights as create_ssl_model after manual_seed (the quick start's random init)
    assert _same(resolve_backbone("random", model="resnet18", seed=0).backbone,
                 create_ssl_model("resnet18", "none").backbone)
    assert a.kind == "random" and a.weights == "random (seed 1)" and a.projector_state is None
    assert a.default_image_size() == 32 and a.num_features == 512
    assert resolve_backbone("random", model="resnet18").default_image_size() == 224
    with pytest.raises(ValueError, match="needs --model"):
        resolve_backbone("random")


def test_export_with_projector_and_load_into(tmp_path, ssl):
    export_backbone(ssl, tmp_path / "exp", RUN_CONFIG, with_projector=True, step=5)
    r = resolve_backbone(tmp_path / "exp")
    assert (r.kind, r.model, r.cifar_stem, r.image_size, r.step) == ("export", "resnet18", True, 32, 5)
    assert r.mean == [0.5, 0.5, 0.5] and r.projector_spec == "32-16" and len(r.weights_sha256) == 64
    assert _same(r.backbone, ssl.backbone)
    proj, status = r.build_projector()
    assert status == "loaded" and _same(proj, ssl.projector)
    fresh, status = r.build_projector("8", seed=1)
    assert status == "random" and fresh[-1].out_features == 8

    # pretraining from an export: backbone and projector, or only the backbone
    target = create_ssl_model("resnet18", projector="32-16", cifar_stem=True)
    assert r.load_into(target) == ["backbone", "projector"] and _same(target, ssl)
    other = create_ssl_model("resnet18", projector="64", cifar_stem=True)
    with pytest.raises(WeightsMismatchError, match=r"projector.*0\.weight: file \[32, 512\] vs model \[64, 512\]"):
        r.load_into(other)
    assert r.load_into(other, projector=False) == ["backbone"] and _same(other.backbone, ssl.backbone)
    imagenet_stem = create_ssl_model("resnet18", projector="32-16")
    with pytest.raises(WeightsMismatchError, match=r"conv1\.weight: file \[64, 3, 3, 3\] vs model \[64, 3, 7, 7\]"):
        r.load_into(imagenet_stem)
    with pytest.raises(ValueError, match="contradicts the export"):
        resolve_backbone(tmp_path / "exp", model="resnet50")

    export_backbone(ssl, tmp_path / "bare", RUN_CONFIG)  # exported without the projector
    assert resolve_backbone(tmp_path / "bare").build_projector() == (None, None)


def test_run_dir_checkpoint_and_bare_file(tmp_path, ssl):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / step_dir_name(40)
    ckpt.mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps(RUN_CONFIG))
    _save(ssl.state_dict(), ckpt / "model.safetensors")
    r = resolve_backbone(run)
    assert (r.kind, r.step, r.image_size, r.projector_spec) == ("run", 40, 32, "32-16")
    assert _same(r.backbone, ssl.backbone) and r.weights_file == ckpt / "model.safetensors"
    assert r.build_projector()[1] == "loaded"
    for source in (ckpt, ckpt / "model.safetensors"):
        c = resolve_backbone(source)
        assert c.kind == "checkpoint" and c.step == 40 and c.config["model"] == "resnet18"
    with pytest.raises(ValueError, match="contradicts the run config"):
        resolve_backbone(run, model="resnet34")

    bare = _save(ssl.backbone.state_dict(), tmp_path / "backbone.safetensors")
    b = resolve_backbone(bare, model="resnet18", cifar_stem=True)
    assert b.kind == "file" and b.projector_state is None and _same(b.backbone, ssl.backbone)
    with pytest.raises(FileNotFoundError, match="pass --model NAME"):
        resolve_backbone(bare)
    with pytest.raises(WeightsMismatchError, match=r"conv1\.weight: file \[64, 3, 3, 3\] vs model \[64, 3, 7, 7\]"):
        resolve_backbone(bare, model="resnet18")


def test_refusals(tmp_path, ssl):
    pth = tmp_path / "weights.pth"
    torch.save(ssl.backbone.state_dict(), pth)
    for kwargs in ({}, {"model": "resnet18"}):
        with pytest.raises(ValueError, match="pickle"):
            resolve_backbone(pth, **kwargs)
    with pytest.raises(ValueError, match="--weights-file"):
        resolve_backbone("timm:resnet18")
    with pytest.raises(ValueError, match="unknown timm model"):
        resolve_backbone("random", model="no_such_net")
    with pytest.raises(FileNotFoundError, match="is not 'random'"):
        resolve_backbone(tmp_path / "missing")
    r18 = _save(ssl.backbone.state_dict(), tmp_path / "r18.safetensors")
    with pytest.raises(WeightsMismatchError, match="missing key"):
        resolve_backbone("timm:resnet34", weights_file=r18, cifar_stem=True)
