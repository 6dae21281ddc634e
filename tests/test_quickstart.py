"""The quick start's report: the method label follows --loss (training and kNN replaced by stand-ins here; the real
run is tests/test_train_loop.py::test_quickstart_shortened)."""
import json
from types import SimpleNamespace

import pytest

import smi_timm.cli.quickstart as quickstart
from smi_timm.export import export_backbone
from smi_timm.models import create_ssl_model


@pytest.mark.parametrize("loss,label", [("smi", "SMI"), ("barlow", "Barlow Twins")])
def test_quickstart_names_the_loss_it_trained(tmp_path, monkeypatch, capsys, loss, label):
    out = tmp_path / "qs"
    export_backbone(create_ssl_model("resnet18", projector="none"), out / "export",
                    {"model": "resnet18", "image_size": 32})
    seen = {}

    def fake_train(cfg):
        seen["loss"] = cfg.loss
        return SimpleNamespace(status="finished", step=cfg.max_steps, export_dir=out / "export", images_per_s=1.0,
                               metrics_path=out / "metrics.jsonl", curve_png=None)

    def fake_knn(backbone, model, cifar_stem, image_size, seed=0, workers=1):
        assert backbone.num_features == 512 and (model, cifar_stem, image_size) == ("resnet18", False, 32)
        scores = {"k200_top1": 30.0, "k200_top5": 70.0, "k20_top1": 31.0, "k20_top5": 71.0}
        return {"pretrained": scores, "random_init": dict(scores, k200_top1=20.0)}

    monkeypatch.setattr(quickstart, "train", fake_train)
    monkeypatch.setattr(quickstart, "knn_pretrained_vs_random", fake_knn)
    assert quickstart.main(["--loss", loss, "--steps", "2", "--output-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert seen["loss"] == loss
    assert f"smi-timm quick start: {label} on the bundled" in printed
    assert f"| resnet18 {label}-pretrained | 30.0 | 31.0 |" in printed
    assert ("SMI-pretrained" in printed) == (loss == "smi")
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["steps"] == 2 and summary["config"]["loss"] == loss
