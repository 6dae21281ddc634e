"""smi-export: folder layout, config format, timm `local-dir:` round trips, run directories, atomic writes."""
import hashlib
import json
import socket
import warnings
from pathlib import Path

import pytest
import safetensors.torch as st
import timm
import torch

import smi_timm  # noqa: F401  (registers the *_cifar names used as `architecture`)
from smi_timm.cli.export import main
from smi_timm.export import export_backbone, export_run, load_export
from smi_timm.layout import WEIGHTS_NAME, latest_checkpoint
from smi_timm.models import build_projector, create_ssl_model
from smi_timm.models.registry import WeightsMismatchError


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _run_config(model="resnet18", cifar_stem=True, image_size=32, timm_kwargs=None, projector="32-16"):
    return {"model": model, "projector": projector, "cifar_stem": cifar_stem, "timm_kwargs": timm_kwargs or {},
            "image_size": image_size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "loss": {"name": "smi", "eps": 1e-3}, "recipe": {"epochs": 1, "batch_size": 8, "lr": 0.1}}


def _same_outputs(a, b, size):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-5)


def _perturb_bn(model):
    """Non-trivial running statistics so that the round trip checks buffers too."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def test_export_cifar_resnet_local_dir(tmp_path):
    ssl = _perturb_bn(create_ssl_model("resnet18", projector="32-16", cifar_stem=True))
    out = tmp_path / "out"
    cfg = export_backbone(ssl, out, _run_config(), with_projector=True, step=7)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "projector.safetensors"]
    on_disk = json.loads((out / "config.json").read_text())
    assert on_disk == json.loads(json.dumps(cfg))
    assert on_disk["architecture"] == "smi_resnet18_cifar" and on_disk["num_classes"] == 0
    assert on_disk["num_features"] == 512 and on_disk["cifar_stem"] is True
    pc = on_disk["pretrained_cfg"]
    assert pc["input_size"] == [3, 32, 32] and pc["mean"] == [0.485, 0.456, 0.406] and pc["crop_pct"] == 1.0
    assert pc["interpolation"] == "bicubic" and pc["num_classes"] == 0
    assert "url" not in pc and "hf_hub_id" not in pc
    assert on_disk["sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert on_disk["smi"]["step"] == 7 and on_disk["smi"]["loss"]["name"] == "smi"
    keys = set(st.load_file(str(out / "model.safetensors")))
    assert keys == set(ssl.backbone.state_dict()) and not any(k.startswith(("backbone.", "projector.")) for k in keys)

    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert model.num_classes == 0 and model.conv1.kernel_size == (3, 3)
    assert _same_outputs(model, ssl.backbone, 32)
    clf = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=5).eval()
    assert torch.equal(clf.layer4[1].bn2.running_var, ssl.backbone.layer4[1].bn2.running_var)
    assert clf(torch.randn(2, 3, 32, 32)).shape == (2, 5)

    proj = build_projector(512, [32, 16])
    proj.load_state_dict(st.load_file(str(out / "projector.safetensors")))
    for k, v in ssl.projector.state_dict().items():
        assert torch.equal(proj.state_dict()[k], v)
    proj_sha = hashlib.sha256((out / "projector.safetensors").read_bytes()).hexdigest()
    assert on_disk["smi"]["projector_sha256"] == proj_sha

    # re-export without the projector removes the stale projector file; no temporary files stay behind
    export_backbone(ssl, out, _run_config())
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_export_standard_resnet_and_vit_local_dir(tmp_path):
    ssl = create_ssl_model("resnet18", projector="none")
    export_backbone(ssl.backbone, tmp_path / "r18", _run_config(cifar_stem=False, image_size=64))
    cfg = json.loads((tmp_path / "r18" / "config.json").read_text())
    assert cfg["architecture"] == "resnet18"  # plain timm name: loads without smi_timm
    assert _same_outputs(timm.create_model(f"local-dir:{tmp_path / 'r18'}", pretrained=True), ssl.backbone, 64)

    kw = {"img_size": 32, "patch_size": 8, "depth": 2, "drop_path_rate": 0.1}
    vit = create_ssl_model("vit_small_patch16_224", projector="16", **kw)
    cfg = export_backbone(vit, tmp_path / "vit", _run_config("vit_small_patch16_224", False, 32, kw))
    assert cfg["model_args"] == {"img_size": 32, "patch_size": 8, "depth": 2}  # training-only kwargs dropped
    assert cfg["smi"]["timm_kwargs"] == kw
    loaded = timm.create_model(f"local-dir:{tmp_path / 'vit'}", pretrained=True)
    assert _same_outputs(loaded, vit.backbone, 32)


def test_export_unregistered_cifar_stem_warns_and_load_export_works(tmp_path):
    kw = {"layers": [1, 1, 1, 1]}  # small: only the unregistered-name path matters here
    ssl = create_ssl_model("resnet34", projector="none", cifar_stem=True, **kw)
    with pytest.warns(UserWarning, match="no registered timm name"):
        export_backbone(ssl, tmp_path / "r34", _run_config("resnet34", timm_kwargs=kw))
    model = load_export(tmp_path / "r34")
    assert _same_outputs(model, ssl.backbone, 32)
    # load_export checks the recorded hash
    cfg_path = tmp_path / "r34" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["sha256"] = "0" * 64
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="records"):
        load_export(tmp_path / "r34")


def test_export_rejects_mismatched_weights(tmp_path):
    ssl = create_ssl_model("resnet18", projector="none", cifar_stem=True)
    with pytest.raises(WeightsMismatchError, match="conv1.weight"):
        export_backbone(ssl, tmp_path / "bad", _run_config(cifar_stem=False))
    with pytest.raises(WeightsMismatchError, match="missing key"), pytest.warns(UserWarning):
        export_backbone(ssl, tmp_path / "bad", _run_config(model="resnet34"))
    assert not (tmp_path / "bad" / "config.json").exists()
    with pytest.raises(ValueError, match="no projector"):
        export_backbone(ssl, tmp_path / "bad", _run_config(), with_projector=True)


def _make_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps(_run_config()))
    models = {}
    for step in (100, 200, 300):
        torch.manual_seed(step)
        ssl = create_ssl_model("resnet18", projector="32-16", cifar_stem=True)
        name = f"step_{step:09d}" if step != 300 else f".tmp-step_{step:09d}"  # 300: incomplete, must be ignored
        (run / "checkpoints" / name).mkdir()
        st.save_file({k: v.contiguous() for k, v in ssl.state_dict().items()},
                     str(run / "checkpoints" / name / "model.safetensors"))
        models[step] = ssl
    (run / "checkpoints" / "step_000000400").mkdir()  # no weights yet: incomplete
    return run, models


def test_export_run_latest_and_cli(tmp_path, capsys):
    run, models = _make_run(tmp_path)
    assert latest_checkpoint(run, needs=WEIGHTS_NAME).name == "step_000000200"
    cfg = export_run(run, tmp_path / "out", with_projector=True)
    assert cfg["smi"]["step"] == 200
    w = st.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(w["conv1.weight"], models[200].backbone.conv1.weight)
    cfg = export_run(run / "checkpoints" / "step_000000100", tmp_path / "out100")
    assert cfg["smi"]["step"] == 100

    assert main([str(run), str(tmp_path / "cli"), "--with-projector"]) == 0
    printed = capsys.readouterr().out
    assert "local-dir:" in printed and (tmp_path / "cli" / "projector.safetensors").is_file()
    model = timm.create_model(f"local-dir:{tmp_path / 'cli'}", pretrained=True)
    assert _same_outputs(model, models[200].backbone, 32)

    assert main([str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "run_config.json").write_text(json.dumps(_run_config()))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        export_run(empty, tmp_path / "y")


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    import smi_timm.export as ex

    ssl = create_ssl_model("resnet18", projector="none", cifar_stem=True)
    export_backbone(ssl, tmp_path / "o", _run_config())
    before = (tmp_path / "o" / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ex.os, "replace", boom)
    torch.manual_seed(1)
    other = create_ssl_model("resnet18", projector="none", cifar_stem=True)
    with pytest.raises(OSError, match="disk full"), warnings.catch_warnings():
        export_backbone(other, tmp_path / "o", _run_config())
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["config.json", "model.safetensors"]
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == before


def test_export_unwraps_ddp_style_wrappers(tmp_path):
    ssl = create_ssl_model("resnet18", projector="16", cifar_stem=True)
    wrapper = torch.nn.Module()
    wrapper.module = ssl  # what DistributedDataParallel / accelerate wrapping looks like
    a = export_backbone(ssl, tmp_path / "a", _run_config(), with_projector=True)
    b = export_backbone(wrapper, tmp_path / "b", _run_config(), with_projector=True)
    assert a["sha256"] == b["sha256"] and a["smi"]["projector_sha256"] == b["smi"]["projector_sha256"]


class FakeHfApi:
    """Stands for huggingface_hub.HfApi: records the calls, uploads nothing (the tests run offline)."""

    def __init__(self, *args, **kwargs):
        self.calls = []
        FakeHfApi.last = self

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        self.files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        return "https://huggingface.co/org/name/commit/0123"


def test_push_to_hub_uploads_the_export_with_a_model_card(tmp_path, monkeypatch):
    import huggingface_hub

    from smi_timm.cli.export import main
    from smi_timm.train import TrainConfig, train

    res = train(TrainConfig(model="resnet10t", projector="32-32", image_size=32, augment="cifar",
                            data=["sample:train"], epoch_samples=64, batch_size=8, workers=0, max_steps=2,
                            warmup_steps=1, log_every=1, progress=False, output_dir=str(tmp_path / "run"),
                            eval_train=["sample:train"], eval_test=["sample:test"], eval_k=20, export=False))
    result = tmp_path / "knn.json"
    result.write_text(json.dumps({"task": "knn", "table_row": "| resnet10t | export | sample:train | sample:test "
                                                              "| kNN k=200 | 31.00 | 80.00 | |"}))
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    out = tmp_path / "out"
    assert main([str(res.run_dir), str(out), "--push-to-hub", "org/name", "--private", "--results", str(result)]) == 0
    api = FakeHfApi.last
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == "org/name" and api.calls[0][2]["private"] is True
    assert {"model.safetensors", "config.json", "README.md"} <= set(api.files)
    card = (out / "README.md").read_text()
    for text in ("library_name: timm", "timm.create_model('hf-hub:org/name', pretrained=True)",
                 "Semantic Mutual Information loss", "neg_weight=64.0", "eps=0.001", "sample:train", "optimizer lars",
                 "Online kNN monitor at step 2",
                 "| resnet10t | export | sample:train | sample:test | kNN k=200 | 31.00 |"):
        assert text in card, text
    # an upload that fails says so, and keeps the export
    monkeypatch.setattr(FakeHfApi, "upload_folder", lambda self, **kw: (_ for _ in ()).throw(OSError("offline")))
    assert main([str(res.run_dir), str(tmp_path / "out2"), "--push-to-hub", "org/name"]) == 1
    assert (tmp_path / "out2" / "model.safetensors").is_file()
