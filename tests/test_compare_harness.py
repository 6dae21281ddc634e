"""The comparison harness's selection and report logic on synthetic run records (the runs themselves are long)."""
import argparse
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("compare_methods", REPO / "benchmarks" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(out, name, record):
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{name}.json").write_text(json.dumps(record))


def test_selection_uses_validation_records_only(harness, tmp_path):
    base = dict(steps=300, seed=0, eval="val")
    for lr, acc in ((0.1, 30.0), (0.3, 41.0), (1.0, 35.0)):
        _write(tmp_path, f"smi_{lr}_val", dict(base, method="smi", lr=lr, extra={}, val_knn_top1=acc))
    for lr, acc in ((0.1, 44.0), (0.3, 40.0), (1.0, 20.0)):
        _write(tmp_path, f"barlow_{lr}_val", dict(base, method="barlow", lr=lr, extra={}, val_knn_top1=acc))
    for nw, eps, acc in ((1.0, 0.01, 40.0), (16.0, 0.1, 47.5), (64.0, 0.001, 45.0)):
        _write(tmp_path, f"smi_sweep_{nw}_{eps}_val",
               dict(base, method="smi", lr=0.3, extra={"neg_weight": nw, "eps": eps}, val_knn_top1=acc))
    # a test-split record with a higher score must not influence any choice
    _write(tmp_path, "smi_test", dict(base, eval="test", method="smi", lr=1.0, extra={}, val_knn_top1=99.0))
    val = harness._load(tmp_path, "val")
    assert len(val) == 9
    assert harness._best_lr(val, "smi", 300) == 0.3       # sweep records (extra != {}) are not lr candidates
    assert harness._best_lr(val, "barlow", 300) == 0.1
    assert harness._best_smi(val, 0.3, 300) == {"neg_weight": 16.0, "eps": 0.1}
    with pytest.raises(SystemExit, match="no learning-rate sweep results for vicreg"):
        harness._best_lr(val, "vicreg", 300)


def test_report_aggregates_seeds(harness, tmp_path):
    for seed, (k200, lin) in enumerate(((40.0, 50.0), (42.0, 54.0))):
        _write(tmp_path, f"smi_s{seed}_test", dict(
            method="smi", lr=0.3, seed=seed, steps=10, extra={}, eval="test", knn200_top1=k200, knn20_top1=k200,
            linear_top1=lin, train_seconds=60.0, monitor=[{"step": 5, "knn_top1": k200 - 5}]))
    args = argparse.Namespace(out=str(tmp_path), preset="smoke", methods=["smi", "barlow"])
    harness.phase_report(args, harness.PRESETS["smoke"])
    table = (tmp_path / "table.md").read_text()
    assert "| smi | 0.3 | – | 2 | 41.00 ± 1.41 | 41.00 ± 1.41 | 52.00 ± 2.83 | 1.0 |" in table
    assert (tmp_path / "knn_curves.png").stat().st_size > 1000


def test_smi_lr_recheck_and_final_settings_per_method(harness, tmp_path, monkeypatch):
    base = dict(steps=300, seed=0, eval="val")
    for method, accs in (("smi", (30.0, 41.0, 35.0, 20.0)), ("smi-square", (30.0, 32.0, 38.0, 36.0))):
        for lr, acc in zip((0.1, 0.3, 1.0, 3.0), accs):
            _write(tmp_path, f"{method}_{lr}_val", dict(base, method=method, lr=lr, extra={}, val_knn_top1=acc))
    for nw, eps, acc in ((1.0, 0.01, 40.0), (16.0, 0.1, 47.5)):
        _write(tmp_path, f"smi_sweep_{nw}_{eps}_val",
               dict(base, method="smi", lr=0.3, extra={"neg_weight": nw, "eps": eps}, val_knn_top1=acc))
    calls = []
    monkeypatch.setattr(harness, "_train_and_eval", lambda args, preset, splits, method, lr, seed, steps, extra,
                        mode: calls.append((method, lr, seed, steps, extra, mode)))
    preset = dict(harness.PRESETS["cpu"], lrs=[0.1, 0.3, 1.0, 3.0], seeds=[0], final_steps=9)
    # the re-check trains the grid neighbours of the lr-phase choice (0.3) at the chosen pair
    harness.phase_smi_lr(argparse.Namespace(out=str(tmp_path)), preset, {})
    best = {"neg_weight": 16.0, "eps": 0.1}
    assert calls == [("smi", 0.1, 0, 300, best, "val"), ("smi", 1.0, 0, 300, best, "val")]
    # a re-check run that beats the sweep moves SMI's final lr; the ablation keeps its own lr and SMI's neg_weight,
    # also when each method runs in its own process (--methods smi-square)
    _write(tmp_path, "smi_recheck_val", dict(base, method="smi", lr=1.0, extra=best, val_knn_top1=49.0))
    assert harness._smi_choice(harness._load(tmp_path, "val"), 300) == (1.0, best)
    # an ``investigate`` variant (another projector) never becomes the final setting
    _write(tmp_path, "smi_variant_val", dict(base, method="smi", lr=1.0, extra=dict(best, projector="512-512"),
                                              val_knn_top1=99.0))
    assert harness._smi_choice(harness._load(tmp_path, "val"), 300) == (1.0, best)
    for methods in (["smi", "smi-square"], ["smi-square"]):
        calls.clear()
        harness.phase_final(argparse.Namespace(out=str(tmp_path), sweep_from=None, methods=methods), preset, {})
        assert calls[-1] == ("smi-square", 1.0, 0, 9, {"neg_weight": 16.0}, "test")
    assert calls[0] == ("smi-square", 1.0, 0, 9, {"neg_weight": 16.0}, "test")
    calls.clear()
    harness.phase_final(argparse.Namespace(out=str(tmp_path), sweep_from=None, methods=["smi"]), preset, {})
    assert calls == [("smi", 1.0, 0, 9, best, "test")]


def test_run_settings_extra_overrides_method(harness):
    preset = harness.PRESETS["cpu"]
    s = harness._settings(preset, "smi", {"neg_weight": 64.0, "eps": 1e-3, "projector": "512-512"})
    assert (s["neg_weight"], s["eps"], s["projector"], s["transform"]) == (64.0, 1e-3, "512-512", "mi")
    assert harness._settings(preset, "smi", {})["neg_weight"] == 1.0  # the lr phase's pinned SMI settings
    assert "neg_weight" not in harness._settings(preset, "barlow", {})
