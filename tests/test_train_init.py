"""--init-from: a new pretraining run from an export, a run or checkpoint, a .safetensors file or timm weights."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from smi_timm.export import export_run
from smi_timm.models.registry import WeightsMismatchError
from smi_timm.train import TrainConfig, list_checkpoints, train


def tiny_config(out_dir, **overrides) -> TrainConfig:
    settings = dict(model="resnet10t", projector="32-32", image_size=32, augment="cifar", data=["sample:train"],
                    epoch_samples=64, batch_size=8, workers=0, loss="smi", optimizer="lars", lr=0.2, lr_biases=None,
                    max_steps=2, warmup_steps=1, save_every=2, log_every=1, progress=False, output_dir=str(out_dir),
                    seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A short run of seed 0: its run dir, checkpoint, backbone export and export with projector."""
    root = tmp_path_factory.mktemp("source")
    res = train(tiny_config(root / "run"))
    export_run(res.run_dir, root / "with_projector", with_projector=True)
    return res


def frozen(out_dir, **overrides):
    """A run that cannot move its parameters (lr 0): what it ends with is what it started from."""
    res = train(tiny_config(out_dir, lr=0.0, seed=1, **overrides))
    return res.model, json.loads((res.run_dir / "run_config.json").read_text())["init"]


def params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("kind", ["run", "checkpoint", "export", "export+projector", "file"])
def test_init_from_our_weights(tmp_path, source_run, kind, caplog):
    src_model = source_run.model
    sources = {"run": source_run.run_dir, "checkpoint": list_checkpoints(source_run.run_dir)[-1],
               "export": source_run.export_dir, "export+projector": source_run.run_dir.parent / "with_projector",
               "file": source_run.export_dir / "model.safetensors"}
    caplog.set_level("INFO", logger="smi_timm")
    model, init = frozen(tmp_path / kind, init_from=str(sources[kind]))
    assert_same(params(model.backbone), params(src_model.backbone))
    with_projector = kind in ("run", "checkpoint", "export+projector")
    assert init["loaded"] == (["backbone", "projector"] if with_projector else ["backbone"])
    if with_projector:
        assert_same(params(model.projector), params(src_model.projector))
    else:  # freshly initialised, and the log says so
        assert not torch.equal(model.projector[0].weight, src_model.projector[0].weight)
        assert "the projector starts fresh" in caplog.text


def test_init_from_timm_weights_file(tmp_path):
    torch.manual_seed(5)
    published = timm.create_model("resnet10t", num_classes=10)  # stands for timm's published weights (with a head)
    weights = tmp_path / "resnet10t.safetensors"
    save_file(published.state_dict(), str(weights))
    model, init = frozen(tmp_path / "timm", init_from="timm:resnet10t", weights_file=str(weights))
    ref = load_file(str(weights))
    for k, v in params(model.backbone).items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)
    assert init["kind"] == "timm" and init["loaded"] == ["backbone"]
    with pytest.raises(ValueError, match="different architecture from --model resnet10t"):
        train(tiny_config(tmp_path / "other", init_from="timm:resnet18", weights_file=str(weights)))


def test_init_from_mismatch_names_keys_and_shapes(tmp_path, source_run):
    # a narrower stem (timm kwarg) cannot take the source's stem weights: the error names the key and both shapes
    with pytest.raises(WeightsMismatchError, match=r"conv1\.0\.weight") as info:
        train(tiny_config(tmp_path / "stem", model_kwargs={"stem_width": 24}, init_from=str(source_run.export_dir)))
    assert "conv1.0.weight: file [24, 3, 3, 3] vs model [18, 3, 3, 3]" in str(info.value)
    # the source projector's widths differ from --projector: load the backbone only with --no-init-projector
    with pytest.raises(WeightsMismatchError, match="projector"):
        train(tiny_config(tmp_path / "proj", projector="64-64", init_from=str(source_run.run_dir)))
    model, init = frozen(tmp_path / "proj2", projector="64-64", init_from=str(source_run.run_dir),
                         init_projector=False)
    assert init["loaded"] == ["backbone"]
