"""smi-analyze: the metrics on known inputs, the metrics.jsonl reader, and the command end to end."""
import json
import math
import socket

import pytest
import torch

from smi_timm.analysis import (
    alignment,
    covariance_spectrum,
    effective_rank,
    rankme,
    redundancy,
    two_view_pair,
    uniformity,
)
from smi_timm.cli.analyze import main
from smi_timm.curves import read_metrics


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_rank_metrics():
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(4000, 16, generator=g)
    assert effective_rank(iso) > 15.0 and rankme(iso) > 15.0
    low = torch.randn(4000, 2, generator=g) @ torch.randn(2, 16, generator=g)  # rank 2 in 16 dims
    assert effective_rank(low) < 2.01 and rankme(low) < 2.5
    spec = covariance_spectrum(low)
    assert abs(float(spec.sum()) - 1) < 1e-5 and float(spec[2:].sum()) < 1e-6
    one_hot_var = torch.zeros(100, 8)
    one_hot_var[:, 0] = torch.randn(100, generator=g)
    assert abs(effective_rank(one_hot_var) - 1.0) < 1e-6


def test_alignment_uniformity_redundancy():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 32, generator=g)
    assert alignment(z, z) == 0.0
    assert alignment(z, -z) == pytest.approx(4.0)  # antipodal on the sphere: ||u - (-u)||^2 = 4
    assert alignment(z, z + 0.1 * torch.randn(500, 32, generator=g)) < 0.05
    same = torch.ones(50, 8)
    assert uniformity(same) == pytest.approx(0.0, abs=1e-9)  # all points equal: log E exp(0) = 0
    assert uniformity(z) < -3.0  # spread over the sphere
    assert uniformity(z) < uniformity(z + 5.0)  # a shifted cloud is less uniform
    assert redundancy(z) < 0.1
    dup = torch.cat([z[:, :1]] * 4, dim=1)
    assert redundancy(dup) == pytest.approx(1.0, abs=1e-5)


def test_centred_alignment_and_cross_view_correlation():
    from smi_timm.analysis import alignment_centered, cross_view_corr

    g = torch.Generator().manual_seed(1)
    za = torch.randn(400, 16, generator=g, dtype=torch.float64)
    zb = torch.randn(400, 16, generator=g, dtype=torch.float64)  # views unrelated to each other
    common = torch.full((1, 16), 20.0, dtype=torch.float64)
    # a large common mode makes unrelated views look aligned; the centred alignment does not reward it
    assert alignment(za + common, zb + common) < 0.05
    assert alignment_centered(za + common, zb + common) == pytest.approx(alignment(za, zb), abs=0.05)
    assert alignment_centered(za + common, zb + common) > 1.5  # ≈ 2: random directions
    assert alignment_centered(za, za) == pytest.approx(0.0, abs=1e-12)
    # cross-view correlation: 1 for identical views (invariant to per-feature affine maps), ≈ 0 for unrelated views
    scale = torch.linspace(0.1, 10.0, 16, dtype=torch.float64)
    assert cross_view_corr(za, za * scale + 3.0) == pytest.approx(1.0, abs=1e-12)
    assert abs(cross_view_corr(za, zb)) < 0.1
    noisy = za + 1.0 * torch.randn(400, 16, generator=g, dtype=torch.float64)  # corr = 1/sqrt(2)
    assert cross_view_corr(za, noisy) == pytest.approx(2 ** -0.5, abs=0.05)
    dead = za.clone()
    dead[:, :4] = 0.0  # dead units are left out, not counted as uncorrelated
    assert cross_view_corr(dead, dead.clone()) == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(cross_view_corr(torch.zeros(5, 3), torch.zeros(5, 3)))


def test_two_view_pair_shapes_and_difference():
    x = torch.randn(4, 3, 16, 16)
    a, b = two_view_pair(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and b.shape == x.shape and not torch.allclose(a, b)


def test_read_metrics_skips_bad_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 10, "loss": 1.0, "lr": 0.1}\nnot json\n{"no_step": 1}\n\n{"step": 20, "knn_top1": 40.0}\n')
    rows, bad = read_metrics(p)
    assert [r["step"] for r in rows] == [10, 20] and bad == 2


def _fake_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = []
    for step in range(10, 110, 10):
        lines.append({"step": step, "epoch": step / 100, "loss": -0.3 - step / 1000, "lr": 0.1 * (1 - step / 200),
                      "images_per_s": 100.0})
        if step % 50 == 0:
            lines.append({"step": step, "knn_top1": 20.0 + step / 10, "knn_top5": 70.0})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{truncated")
    return run


def test_curves_only(tmp_path, capsys):
    run = _fake_run(tmp_path)
    out = tmp_path / "out"
    assert main(["--run", str(run), "--curves-only", "--out-dir", str(out)]) == 0
    res = json.loads((out / "analysis.json").read_text())
    assert res["curves"]["last_step"] == 100 and res["curves"]["best_knn_top1"] == 30.0
    assert res["curves"]["skipped_lines"] == 1
    assert (out / "curves.png").stat().st_size > 1000
    assert main(["--curves-only", "--out-dir", str(out)]) == 2
    assert "needs a run directory" in capsys.readouterr().err


def test_analyze_run_dir_with_projector(tmp_path, monkeypatch):
    """End to end on a run directory (checkpoint with projector + metrics.jsonl) with a synthetic loader: all plots,
    metrics for features and embeddings, and the run's curves."""
    import safetensors.torch as st

    import smi_timm.eval.features as features
    from smi_timm.models import create_ssl_model

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(12, 3, 32, 32, generator=g), torch.arange(12) % 4) for _ in range(2)]
    monkeypatch.setattr(features, "eval_loader", lambda *args, **kwargs: batches)
    run = _fake_run(tmp_path)
    ssl = create_ssl_model("resnet18", projector="64-32")
    (run / "run_config.json").write_text(json.dumps({"model": "resnet18", "projector": "64-32", "cifar_stem": False,
                                                     "timm_kwargs": {}, "image_size": 32}))
    ckpt = run / "checkpoints" / "step_000000100"
    ckpt.mkdir(parents=True)
    st.save_file({k: v.contiguous() for k, v in ssl.state_dict().items()}, str(ckpt / "model.safetensors"))
    out = tmp_path / "ana"
    rc = main(["--weights", str(run), "--data", "x", "--num-samples", "20", "--batch-size", "12",
               "--heatmap-size", "8", "--views", "crop-flip", "--out-dir", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "analysis.json").read_text())
    assert res["num_samples"] == 20 and res["views"].startswith("random resized crop")
    assert res["projector"] == "64-32" and res["projector_weights"] == "loaded"
    assert set(res["metrics"]) == {"features", "embeddings"}
    f, e = res["metrics"]["features"], res["metrics"]["embeddings"]
    assert f["dim"] == 512 and e["dim"] == 32
    for m in (f, e):
        assert 1.0 <= m["effective_rank"] <= 20 and m["alignment"] >= 0 and m["uniformity"] <= 0
        assert 0 <= m["redundancy"] <= 1 and math.isfinite(m["dependency_diag_mean"])
    assert len(res["spectra"]["features"]["eigenvalues"]) == 20
    assert res["heatmap_size"] == 8 and res["curves"]["last_step"] == 100  # curves found in the run dir
    for name in ("summary.png", "spectrum.png", "correlation.png", "dependency.png", "curves.png"):
        assert (out / name).stat().st_size > 1000, name


def test_analyze_bundled_sample_ssl_views(tmp_path):
    from smi_timm.data import sample_shards

    test = sample_shards("test")[0]
    out = tmp_path / "ana"
    rc = main(["--weights", "random", "--model", "resnet18", "--image-size", "32", "--projector", "16",
               "--data", test, "--num-samples", "32", "--batch-size", "32", "--workers", "0", "--out-dir", str(out),
               "--no-progress"])
    assert rc == 0
    res = json.loads((out / "analysis.json").read_text())
    assert res["views"] == "ssl loader (augment=cifar)" and res["num_samples"] == 32
    assert res["projector_weights"] == "random" and res["metrics"]["embeddings"]["dim"] == 16
