"""The comparison harness's selection, process split and report logic on synthetic run records (the runs themselves
are long), and its transfer phase with the evaluation stubbed."""
import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harness():
    # run as a script, compare_methods.py finds benchmarks/_common.py next to it; here the folder is added by hand
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("compare_methods", REPO / "benchmarks" / "compare_methods.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def _write(out, name, record):
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{name}.json").write_text(json.dumps(record))


def _val(method, lr, knn, linear=None, extra=None, steps=300):
    rec = dict(method=method, lr=lr, seed=0, steps=steps, eval="val", extra=extra or {}, val_knn_top1=knn)
    if linear is not None:
        rec["val_linear_top1"] = linear
    return rec


def _ns(out, **kw):
    return argparse.Namespace(**dict(dict(out=str(out), sweep_from=None, methods=["smi", "barlow"], shard=None,
                                          select="linear", fixed_settings=False), **kw))


def test_selection_by_each_criterion_on_validation_records_only(harness, tmp_path):
    # kNN prefers smi lr 0.3 and barlow 0.1; the linear probe prefers smi lr 1.0 and barlow 0.3
    for lr, knn, lin in ((0.1, 30.0, 40.0), (0.3, 41.0, 42.0), (1.0, 35.0, 45.0)):
        _write(tmp_path, f"smi_{lr}_val", _val("smi", lr, knn, lin))
    for lr, knn, lin in ((0.1, 44.0, 50.0), (0.3, 40.0, 52.0), (1.0, 20.0, 30.0)):
        _write(tmp_path, f"barlow_{lr}_val", _val("barlow", lr, knn, lin))
    for nw, eps, knn, lin in ((1.0, 0.01, 40.0, 47.0), (16.0, 0.1, 47.5, 44.0), (64.0, 0.001, 45.0, 48.0)):
        _write(tmp_path, f"smi_sweep_{nw}_{eps}_val", _val("smi", 0.3, knn, lin, {"neg_weight": nw, "eps": eps}))
    # a test-split record with higher scores must not influence any choice
    _write(tmp_path, "smi_test", dict(_val("smi", 3.0, 99.0, 99.0), eval="test"))
    val = harness.load_records(tmp_path, "val")
    assert len(val) == 9
    assert harness.best_lr(val, "smi", 300, "knn") == 0.3       # sweep records (extra != {}) are not lr candidates
    assert harness.best_lr(val, "smi", 300) == 1.0              # default criterion: the linear probe
    assert harness.best_lr(val, "barlow", 300, "knn") == 0.1
    assert harness.best_lr(val, "barlow", 300, "linear") == 0.3
    assert harness.best_smi(val, 0.3, 300, "knn") == {"neg_weight": 16.0, "eps": 0.1}
    assert harness.best_smi(val, 0.3, 300, "linear") == {"neg_weight": 64.0, "eps": 0.001}
    assert harness.final_settings(val, 300, ["smi", "barlow"], "knn") == {
        "smi": (0.3, {"neg_weight": 16.0, "eps": 0.1}), "barlow": (0.1, {})}
    with pytest.raises(SystemExit, match="no learning-rate sweep results for vicreg"):
        harness.best_lr(val, "vicreg", 300)


def test_records_without_the_linear_probe_are_refused_by_that_criterion(harness, tmp_path):
    for lr, knn in ((0.1, 30.0), (0.3, 41.0)):
        _write(tmp_path, f"smi_{lr}_val", _val("smi", lr, knn))  # written before the probe was measured
    val = harness.load_records(tmp_path, "val")
    assert harness.best_lr(val, "smi", 300, "knn") == 0.3
    with pytest.raises(SystemExit, match="val_linear_top1.*--select knn"):
        harness.best_lr(val, "smi", 300, "linear")


def test_report_aggregates_seeds_per_budget(harness, tmp_path, monkeypatch):
    for seed, (k200, lin) in enumerate(((40.0, 50.0), (42.0, 54.0))):
        _write(tmp_path, f"smi_s{seed}_test", dict(
            method="smi", lr=0.3, seed=seed, steps=10, extra={}, eval="test", knn200_top1=k200, knn20_top1=k200,
            linear_top1=lin, train_seconds=60.0, monitor=[{"step": 5, "knn_top1": k200 - 5}],
            test_metrics={"features": {"rankme": 100.0 + seed, "alignment": 0.5, "uniformity": -2.0}}))
    # the same method at other settings (e.g. the other criterion's choice) gets its own row
    _write(tmp_path, "smi_other_test", dict(
        method="smi", lr=1.0, seed=0, steps=10, extra={"neg_weight": 64.0}, eval="test", knn200_top1=30.0,
        knn20_top1=30.0, linear_top1=30.0, train_seconds=60.0, monitor=[]))
    # a shorter earlier run of the same method is reported in its own table, not averaged in
    _write(tmp_path, "smi_short_test", dict(method="smi", lr=3.0, seed=0, steps=5, extra={}, eval="test",
                                            knn200_top1=1.0, knn20_top1=1.0, linear_top1=1.0, train_seconds=6.0,
                                            monitor=[]))
    # a batch-size study run has more steps at another batch: its curve is not the final runs' plot
    _write(tmp_path, "smi_b32_test", dict(method="smi", lr=0.3, seed=0, steps=40, extra={"batch_size": 32},
                                          eval="test", knn200_top1=9.0, knn20_top1=9.0, linear_top1=9.0,
                                          train_seconds=6.0, monitor=[{"step": 20, "knn_top1": 8.0}]))
    import smi_timm.curves

    plotted = []
    real_plot = smi_timm.curves.plot_curves
    monkeypatch.setattr(smi_timm.curves, "plot_curves",
                        lambda monitors, *a, **kw: (plotted.append(sorted(monitors)), real_plot(monitors, *a, **kw)))
    harness.phase_report(_ns(tmp_path, preset="smoke"), harness.PRESETS["smoke"])
    assert plotted == [["smi (seed 0)", "smi (seed 1)"]]
    table = (tmp_path / "table.md").read_text()
    assert ("| smi | 0.3 | – | 2 | 41.00 ± 1.41 | 41.00 ± 1.41 | 52.00 ± 2.83 | 100.50 ± 0.71 | 0.50 ± 0.00 | "
            "-2.00 ± 0.00 | 1.0 |") in table
    assert "| smi | 3 | – | 1 | 1.00 | 1.00 | 1.00 | – | – | – | 0.1 |" in table
    assert "| smi | 1 | neg_weight 64 | 1 | 30.00 | 30.00 | 30.00 | – | – | – | 1.0 |" in table
    assert table.index("10 steps") < table.index("5 steps")
    assert (tmp_path / "knn_curves.png").stat().st_size > 1000


def test_curve_labels_keep_every_run(harness):
    runs = [dict(method="smi", lr=1.0, seed=0, extra={"neg_weight": 64.0}, monitor=[1]),
            dict(method="smi", lr=3.0, seed=0, extra={"neg_weight": 64.0}, monitor=[2]),
            dict(method="smi", lr=1.0, seed=1, extra={"neg_weight": 64.0}, monitor=[3]),
            dict(method="barlow", lr=1.0, seed=0, extra={}, monitor=[4])]
    # a method at two settings: the settings name its curves apart; a method at one: method and seed only
    assert harness.curve_labels(runs) == {
        "smi lr 1, neg_weight 64 (seed 0)": [1], "smi lr 3, neg_weight 64 (seed 0)": [2],
        "smi lr 1, neg_weight 64 (seed 1)": [3], "barlow (seed 0)": [4]}


def test_smi_lr_recheck_per_criterion_and_final_settings_per_method(harness, tmp_path, monkeypatch):
    for method, accs in (("smi", (30.0, 41.0, 35.0, 20.0)), ("smi-square", (30.0, 32.0, 38.0, 36.0))):
        for lr, acc in zip((0.1, 0.3, 1.0, 3.0), accs):
            _write(tmp_path, f"{method}_{lr}_val", _val(method, lr, acc, acc))
    # the two criteria choose different pairs at lr 0.3
    knn_pair, lin_pair = {"neg_weight": 16.0, "eps": 0.1}, {"neg_weight": 64.0, "eps": 0.001}
    _write(tmp_path, "smi_sweep_a_val", _val("smi", 0.3, 47.5, 40.0, knn_pair))
    _write(tmp_path, "smi_sweep_b_val", _val("smi", 0.3, 45.0, 48.0, lin_pair))
    calls = []
    monkeypatch.setattr(harness, "train_and_eval", lambda args, preset, splits, method, lr, seed, steps, extra,
                        mode: calls.append((method, lr, seed, steps, extra, mode)))
    preset = dict(harness.PRESETS["cpu"], lrs=[0.1, 0.3, 1.0, 3.0], seeds=[0], final_seeds={}, final_steps=9)
    # the re-check trains the grid neighbours of the lr the grid ran at (0.3) at the pair of each criterion, the
    # selected criterion's first
    harness.phase_smi_lr(_ns(tmp_path), preset, {})
    assert calls == [("smi", 0.1, 0, 300, lin_pair, "val"), ("smi", 1.0, 0, 300, lin_pair, "val"),
                     ("smi", 0.1, 0, 300, knn_pair, "val"), ("smi", 1.0, 0, 300, knn_pair, "val")]
    # also when a criterion's own lr-phase choice is not where the grid ran (kNN prefers lr 1.0 here)
    _write(tmp_path, "smi_knn_lr_val", _val("smi", 1.0, 60.0, 10.0, {}))
    calls.clear()
    harness.phase_smi_lr(_ns(tmp_path, select="knn"), preset, {})
    assert calls == [("smi", 0.1, 0, 300, knn_pair, "val"), ("smi", 1.0, 0, 300, knn_pair, "val"),
                     ("smi", 0.1, 0, 300, lin_pair, "val"), ("smi", 1.0, 0, 300, lin_pair, "val")]
    (tmp_path / "runs" / "smi_knn_lr_val.json").unlink()
    # a re-check run that beats the sweep moves SMI's final lr; the ablation keeps its own lr and SMI's neg_weight,
    # also when each method runs in its own process (--methods smi-square)
    _write(tmp_path, "smi_recheck_val", _val("smi", 1.0, 30.0, 49.0, lin_pair))
    assert harness.smi_choice(harness.load_records(tmp_path, "val"), 300) == (1.0, lin_pair)
    assert harness.smi_choice(harness.load_records(tmp_path, "val"), 300, "knn") == (0.3, knn_pair)
    # an ``investigate`` variant (another projector) never becomes the final setting
    _write(tmp_path, "smi_variant_val", _val("smi", 1.0, 99.0, 99.0, dict(lin_pair, projector="512-512")))
    assert harness.smi_choice(harness.load_records(tmp_path, "val"), 300) == (1.0, lin_pair)
    for methods in (["smi", "smi-square"], ["smi-square"]):
        calls.clear()
        harness.phase_final(_ns(tmp_path, methods=methods), preset, {})
        assert calls[-1] == ("smi-square", 1.0, 0, 9, {"neg_weight": 64.0}, "test")
    calls.clear()
    harness.phase_final(_ns(tmp_path, methods=["smi"]), preset, {})
    assert calls == [("smi", 1.0, 0, 9, lin_pair, "test")]


def test_shards_split_a_phase_and_final_seeds_per_method(harness, tmp_path, monkeypatch):
    for method in ("smi", "smi-square", "barlow", "vicreg"):
        _write(tmp_path, f"{method}_val", _val(method, 1.0, 30.0, 40.0))
    with pytest.raises(SystemExit, match="no SMI neg_weight x eps sweep"):  # SMI would run at neg_weight 1
        harness.final_settings(harness.load_records(tmp_path, "val"), 300, ["smi-square", "barlow"])
    assert harness.final_settings(harness.load_records(tmp_path, "val"), 300, ["barlow"]) == {"barlow": (1.0, {})}
    _write(tmp_path, "smi_grid_val", _val("smi", 1.0, 35.0, 45.0, {"neg_weight": 64.0, "eps": 0.001}))
    calls = []
    monkeypatch.setattr(harness, "train_and_eval", lambda args, preset, splits, method, lr, seed, steps, extra,
                        mode: calls.append((method, seed)))
    preset = json.loads(json.dumps(harness.PRESETS["cpu"]))
    methods = ["smi", "smi-square", "barlow", "vicreg"]
    shards = []
    for shard in ("0/2", "1/2"):
        calls.clear()
        harness.phase_final(_ns(tmp_path, methods=methods, shard=shard), preset, {})
        shards.append(list(calls))
    # SMI and Barlow Twins 2 seeds, VICReg and SMI-square 1; seed 0 of every method first; the two shards split the
    # six runs without overlap
    assert shards[0] + shards[1] != [] and not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted([("smi", 0), ("smi", 1), ("barlow", 0), ("barlow", 1),
                                                    ("vicreg", 0), ("smi-square", 0)])
    assert shards[0] == [("smi", 0), ("barlow", 0), ("smi", 1)]
    with pytest.raises(SystemExit, match="I/N"):
        harness.parse_shard("2")
    with pytest.raises(SystemExit, match="0 <= I < N"):
        harness.parse_shard("2/2")


def test_smi_phase_waits_for_a_complete_lr_phase(harness, tmp_path, monkeypatch):
    _write(tmp_path, "smi_0.1_val", _val("smi", 0.1, 30.0, 40.0))  # the other shard has not written lr 0.3 yet
    monkeypatch.setattr(harness, "train_and_eval", lambda *a: pytest.fail("must not train"))
    preset = dict(harness.PRESETS["cpu"], lrs=[0.1, 0.3])
    with pytest.raises(SystemExit, match=r"lr phase of smi is incomplete \(no record at lr \[0.3\]\)"):
        harness.phase_smi(_ns(tmp_path), preset, {})


def test_final_from_other_sweeps_and_fixed_settings(harness, tmp_path, monkeypatch):
    from smi_timm.losses.smi import DEFAULT_EPS, DEFAULT_NEG_WEIGHT

    sweeps = tmp_path / "cpu"
    for lr, lin in ((1.0, 40.0), (3.0, 45.0)):  # the CPU grid's best lr (3.0) is not on the gpu preset's grid
        _write(sweeps, f"barlow_{lr}_val", _val("barlow", lr, 30.0, lin))
    calls = []
    monkeypatch.setattr(harness, "train_and_eval", lambda args, preset, splits, method, lr, seed, steps, extra,
                        mode: calls.append((method, lr, seed, steps, extra, mode)))
    preset = dict(json.loads(json.dumps(harness.PRESETS["gpu"])), final_steps=50, seeds=[0])
    args = _ns(tmp_path / "gpu", methods=["barlow"], sweep_from=str(sweeps))
    harness.phase_final(args, preset, {})
    assert calls == [("barlow", 3.0, 0, 50, {}, "test")]     # sweeps at 300 steps choose for the gpu preset
    assert "300-step sweeps" in args.selection
    calls.clear()
    smoke = json.loads(json.dumps(harness.PRESETS["smoke"]))
    harness.phase_final(_ns(tmp_path / "none", methods=["smi", "smi-square", "barlow"], fixed_settings=True),
                        smoke, {})
    lr0 = smoke["lrs"][0]
    assert calls == [("smi", lr0, 0, 3, {"neg_weight": DEFAULT_NEG_WEIGHT, "eps": DEFAULT_EPS}, "test"),
                     ("smi-square", lr0, 0, 3, {"neg_weight": DEFAULT_NEG_WEIGHT}, "test"),
                     ("barlow", lr0, 0, 3, {}, "test")]


def _transfer_result(acc):
    ev = lambda size: dict(image_size=size, knn={"k=20": {"top1": acc}, "k=5": {"top1": acc + 1}},  # noqa: E731
                           linear={"top1": acc + 2}, num_train=720, num_test=240, num_classes=12)
    return dict(ks=[20, 5], T=0.1, probe={"epochs": 100}, test_label="flowers12/test-000000.tar",
                evals=[ev(32), ev(64)])


def test_transfer_phase_every_final_export_and_the_floor(harness, tmp_path, monkeypatch):
    import smi_timm.eval.transfer as transfer

    tdir = tmp_path / "flowers"
    tdir.mkdir()
    (tdir / "train-000000.tar").write_bytes(b"")
    (tdir / "test-000000.tar").write_bytes(b"")
    out = tmp_path / "out"
    for method, seed in (("smi", 0), ("smi", 1), ("barlow", 0)):
        rid = f"{method}_s{seed}"
        _write(out, f"{rid}_test", dict(method=method, lr=1.0, seed=seed, steps=10, extra={}, eval="test",
                                        run_id=rid, knn200_top1=1.0, knn20_top1=1.0, linear_top1=1.0,
                                        train_seconds=1.0, monitor=[]))
        harness.export_dir(out, rid).mkdir(parents=True)
    seen = []

    def fake(source, train, test, settings, image_sizes):
        weights = source.weights
        seen.append((Path(weights).parent.name if weights != "random" else "random", image_sizes, source.model))
        return _transfer_result(50.0 + 10 * len(seen))

    monkeypatch.setattr(transfer, "run_transfer", fake)
    args = _ns(out, transfer_dir=str(tdir), preset="cpu")
    harness.phase_transfer(args, harness.PRESETS["cpu"])
    assert seen == [("barlow_s0", [32, 64], None), ("smi_s0", [32, 64], None), ("smi_s1", [32, 64], None),
                    ("random", [32, 64], "resnet18")]
    harness.phase_transfer(args, harness.PRESETS["cpu"])  # every record exists: nothing runs again
    assert len(seen) == 4
    harness.phase_report(args, harness.PRESETS["cpu"])
    table = (out / "table.md").read_text()
    assert "| smi | lr 1 | 10 | 2 | 75.00 ± 7.07 | 76.00 ± 7.07 | 77.00 ± 7.07 | 75.00 ± 7.07 |" in table
    assert "| random-init | – | – | 1 | 90.00 | 91.00 | 92.00 | 90.00 | 91.00 | 92.00 |" in table
    with pytest.raises(SystemExit, match="--transfer-dir"):
        harness.phase_transfer(_ns(out, transfer_dir=str(tmp_path / "missing")), harness.PRESETS["cpu"])


def test_spatial_phase_keeps_rows_of_removed_backbones_and_the_trial_reads_them_by_run(harness, tmp_path,
                                                                                        monkeypatch):
    import smi_timm.spatial as spatial

    tdir = tmp_path / "flowers"
    tdir.mkdir()
    for split in ("train", "test"):
        (tdir / f"{split}-000000.tar").write_bytes(b"")
    out = tmp_path / "out"
    default, w16 = {"neg_weight": 64.0, "eps": 1e-3}, {"neg_weight": 16.0, "eps": 1e-3}
    gone, here = _trial_record("smi", 0, default, 47.0, 52.0), _trial_record("smi", 0, w16, 44.0, 51.0)
    for r in (gone, here):
        _write(out, f"{r['run_id']}_test", r)
    harness.export_dir(out, here["run_id"]).mkdir(parents=True)
    # a batch-size study run has more steps, and its backbone is here: not the final runs' budget, left out
    batch = _trial_record("smi", 0, dict(default, batch_size=32, warmup_steps=400), 40.0, 45.0, steps=16000)
    _write(out, f"{batch['run_id']}_test", batch)
    harness.export_dir(out, batch["run_id"]).mkdir(parents=True)
    # written before rows named their run: the default's export was removed since, a third run's too
    row = lambda label, weights, mass: dict(label=label, weights=weights, map_size=[4, 4],  # noqa: E731
                                            uniform_top_mass=0.25, norm=dict(top_mass=mass, top_mass_std=0.0,
                                                                             entropy=0.9, entropy_std=0.0),
                                            cosine=dict(top_mass=mass, top_mass_std=0.0, entropy=0.9, entropy_std=0.0))
    (out / "spatial").mkdir()
    (out / "spatial" / "spatial.json").write_text(json.dumps(dict(backbones=[
        row("smi (lr 1, eps 0.001, neg_weight 64)", f"OUT/train/{gone['run_id']}/export", 0.33),
        row("smi (lr 1, eps 0.001, neg_weight 16)", f"OUT/train/{here['run_id']}/export", 0.99),
        row("random init", "random (seed 0)", 0.37)])))
    seen = []

    def fake(sources, data, out_dir, *, labels, **kw):
        seen.append(list(sources))
        res = dict(image_size=128, num_images=240, top_frac=0.2,
                   backbones=[row(lb, src, m) for lb, src, m in zip(labels, sources, (0.30, 0.36))])
        (Path(out_dir) / "spatial.json").write_text(json.dumps(res))
        return res

    monkeypatch.setattr(spatial, "run_spatial", fake)
    args = _ns(out, transfer_dir=str(tdir), preset="cpu", methods=["smi"])
    harness.phase_spatial(args, harness.PRESETS["cpu"])
    assert seen == [[str(harness.export_dir(out, here["run_id"])), "random"]]
    rows = json.loads((out / "spatial" / "spatial.json").read_text())["backbones"]
    assert [(b["run_id"], b["norm"]["top_mass"], b.get("kept", False)) for b in rows] == [
        (here["run_id"], 0.30, False), (gone["run_id"], 0.33, True), (None, 0.36, False)]
    (out / "spatial" / "spatial.json").unlink()  # nothing earlier to keep: the rows on disk still name their run
    harness.phase_spatial(args, harness.PRESETS["cpu"])
    rows = json.loads((out / "spatial" / "spatial.json").read_text())["backbones"]
    assert [b["run_id"] for b in rows] == [here["run_id"], None]
    (out / "spatial" / "spatial.json").write_text(json.dumps(dict(backbones=rows + [
        row("smi (lr 1, eps 0.001, neg_weight 64)", f"OUT/train/{gone['run_id']}/export", 0.33)])))
    table = "\n".join(harness._trial_table(args, harness.PRESETS["cpu"], harness.load_records(out, "test"), [], out))
    assert "| smi | lr 1, eps 0.001, neg_weight 64 | 1 | 47.00 |" in table and "| – | 0.330 |" in table
    assert "| smi-w16 | lr 1, eps 0.001, neg_weight 16 | 1 | 44.00 |" in table and "| – | 0.300 |" in table


def test_run_settings_extra_overrides_method(harness):
    preset = harness.PRESETS["cpu"]
    s = harness.run_settings(preset, "smi", {"neg_weight": 64.0, "eps": 1e-3, "projector": "512-512"})
    assert (s["neg_weight"], s["eps"], s["projector"], s["transform"]) == (64.0, 1e-3, "512-512", "mi")
    assert harness.run_settings(preset, "smi", {})["neg_weight"] == 1.0  # the lr phase's pinned SMI settings
    assert "neg_weight" not in harness.run_settings(preset, "barlow", {})


def test_simclr_temperature_phase_trial_and_batch_jobs(harness, tmp_path, monkeypatch):
    for lr, lin in ((0.1, 40.0), (0.3, 47.0), (1.0, 44.0), (3.0, 20.0)):
        _write(tmp_path, f"simclr_{lr}_val", _val("simclr", lr, 30.0, lin))
    calls = []
    monkeypatch.setattr(harness, "train_and_eval", lambda args, preset, splits, method, lr, seed, steps, extra,
                        mode: calls.append((method, lr, seed, steps, extra, mode)))
    preset = json.loads(json.dumps(harness.PRESETS["cpu"]))
    args = _ns(tmp_path, methods=["simclr"], configs=None)
    # the temperature grid runs at the selected lr, without the pinned temperature the lr phase already ran
    harness.phase_simclr(args, preset, {})
    assert calls == [("simclr", 0.3, 0, 300, {"temperature": 0.1}, "val"),
                     ("simclr", 0.3, 0, 300, {"temperature": 0.5}, "val")]
    # before the grid: the lr-phase run (temperature 0.2) is the choice; a better grid run takes over; a grid run at
    # another lr never does
    val = harness.load_records(tmp_path, "val")
    assert harness.simclr_choice(val, 300) == (0.3, {"temperature": 0.2})
    _write(tmp_path, "simclr_t05_val", _val("simclr", 0.3, 30.0, 49.0, {"temperature": 0.5}))
    _write(tmp_path, "simclr_t01_val", _val("simclr", 1.0, 30.0, 99.0, {"temperature": 0.1}))
    assert harness.simclr_choice(harness.load_records(tmp_path, "val"), 300) == (0.3, {"temperature": 0.5})
    # the trial: fixed configurations (SimCLR's from the sweep), seed-major
    calls.clear()
    harness.phase_trial(_ns(tmp_path, configs=["smi", "feature_row", "simclr"]), preset, {})
    assert calls == [
        ("smi", 1.0, 0, 4000, {"neg_weight": 64.0, "eps": 1e-3}, "test"),
        ("smi", 1.0, 0, 4000, {"neg_weight": 64.0, "eps": 1e-3, "standardize": "feature_row"}, "test"),
        ("simclr", 0.3, 0, 4000, {"temperature": 0.5}, "test"),
        ("smi", 1.0, 1, 4000, {"neg_weight": 64.0, "eps": 1e-3}, "test"),
        ("smi", 1.0, 1, 4000, {"neg_weight": 64.0, "eps": 1e-3, "standardize": "feature_row"}, "test"),
        ("simclr", 0.3, 1, 4000, {"temperature": 0.5}, "test")]
    # the batch study: equal epochs (4,000 steps at 128 = 16,000 at 32 = 1,000 at 512), warmup in images
    calls.clear()
    harness.phase_batch(_ns(tmp_path, configs=["smi", "barlow"]), preset, {})
    assert calls == [
        ("smi", 1.0, 0, 16000, {"neg_weight": 64.0, "eps": 1e-3, "batch_size": 32, "warmup_steps": 400}, "test"),
        ("barlow", 1.0, 0, 16000, {"batch_size": 32, "warmup_steps": 400}, "test"),
        ("smi", 1.0, 0, 1000, {"neg_weight": 64.0, "eps": 1e-3, "batch_size": 512, "warmup_steps": 25}, "test"),
        ("barlow", 1.0, 0, 1000, {"batch_size": 512, "warmup_steps": 25}, "test")]
    assert harness.run_name("barlow", 1.0, 0, 16000, calls[1][4]) == "barlow_lr1_s0_n16000_batch_size32_warmup_steps400"
    assert harness.run_settings(preset, "barlow", calls[1][4])["batch_size"] == 32


def _trial_record(method, seed, extra, knn, linear, steps=4000, run_id=None):
    rid = run_id or f"{method}_{'_'.join(f'{k}{v}' for k, v in extra.items())}_s{seed}_n{steps}"
    return dict(method=method, lr=1.0, seed=seed, steps=steps, extra=extra, eval="test", run_id=rid,
                knn200_top1=knn, knn20_top1=knn, linear_top1=linear, train_seconds=1.0, monitor=[],
                test_metrics={"features": {"rankme": 100.0, "alignment": 0.5, "alignment_centered": 0.9,
                                           "cross_view_corr": 0.6}})


def test_default_rule_and_the_trial_and_batch_tables(harness, tmp_path):
    out = tmp_path
    preset = harness.PRESETS["cpu"]
    default, w16, fr = ({"neg_weight": 64.0, "eps": 1e-3}, {"neg_weight": 16.0, "eps": 1e-3},
                        {"neg_weight": 64.0, "eps": 1e-3, "standardize": "feature_row"})
    recs = {
        # default: kNN 47 ± 1.41, linear 52 ± 1.41
        "smi": [_trial_record("smi", 0, default, 46.0, 51.0), _trial_record("smi", 1, default, 48.0, 53.0)],
        # +6 on both probes against 2σ = 2.83: passes, unless flowers12 drops by more than 2σ
        "smi-w16": [_trial_record("smi", 0, w16, 52.0, 57.0), _trial_record("smi", 1, w16, 54.0, 59.0)],
        # +2 on both: within 2σ, the default stays
        "feature_row": [_trial_record("smi", 0, fr, 48.0, 53.0), _trial_record("smi", 1, fr, 50.0, 55.0)],
    }
    for rs in recs.values():
        for r in rs:
            _write(out, f"{r['run_id']}_test", r)
    # flowers12 linear (mean over sizes = acc + 2): default 60 / 62, smi-w16 40 / 42 (20 points worse)
    transfer = []
    for r, acc in zip(recs["smi"] + recs["smi-w16"] + recs["feature_row"], (58, 60, 38, 40, 58, 60)):
        transfer.append(dict(run_id=r["run_id"], transfer=_transfer_result(float(acc))))
    rule = harness.default_rule(recs["smi"], recs["smi-w16"], transfer)
    assert rule["knn200_top1"]["passes"] and rule["linear_top1"]["passes"]
    assert rule["flowers12_linear"]["gain"] == pytest.approx(-20.0) and not rule["flowers12_linear"]["passes"]
    assert rule["becomes_default"] is False
    rule = harness.default_rule(recs["smi"], recs["feature_row"], transfer)
    assert rule["linear_top1"]["gain"] == pytest.approx(2.0)
    assert rule["linear_top1"]["pooled_std"] == pytest.approx(2 ** 0.5)
    assert rule["linear_top1"]["passes"] is False and rule["becomes_default"] is False
    good = harness.default_rule(recs["smi"], recs["smi-w16"], [])  # no transfer yet: not decided
    assert good["becomes_default"] is None
    # a probe that fails over 2 seeds decides without flowers12
    assert harness.default_rule(recs["smi"], recs["feature_row"], [])["becomes_default"] is False
    assert harness.default_rule(recs["smi"], recs["smi-w16"][:1], transfer)["becomes_default"] is None
    # the report's sections from the records on disk: the trial's mean ± std, the rule, the batch-size table
    batch = _trial_record("smi", 0, dict(default, batch_size=32, warmup_steps=400), 40.0, 45.0, steps=16000)
    _write(out, "smi_b32_test", batch)
    args = _ns(out)
    lines = harness._trial_table(args, preset, harness.load_records(out, "test"), [], out)
    table = "\n".join(lines)
    assert "| smi | lr 1, eps 0.001, neg_weight 64 | 2 | 47.00 ± 1.41 | 52.00 ± 1.41 | 100.00 ± 0.00 |" in table
    assert "| smi-w16 | +6.00 (2.83) | +6.00 (2.83) | – | not decided (needs 2 seeds with flowers12 each) |" in table
    lines = harness._batch_table(args, preset, harness.load_records(out, "test"), out)
    assert lines[2:] == ["| configuration | batch 32 | batch 128 |", "|---|---:|---:|",
                         "| smi | 45.00 (40.00) | 51.00 (46.00) |"]
    assert (out / "batch_size.png").is_file()


def _absolute_paths(value) -> list:
    """Every whitespace-separated token of the strings in ``value`` (a JSON document) that reads as an absolute
    path: a leading ``/`` (or a drive letter) and at least one more separator."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in _absolute_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _absolute_paths(v)]
    if not isinstance(value, str):
        return []
    tokens = (t.strip("\"'`(),[]") for t in value.split())
    return [t for t in tokens
            if (t.startswith("/") and "/" in t[1:]) or (len(t) > 3 and t[1:3] in (":\\", ":/") and t[0].isalpha())]


def test_committed_records_name_no_absolute_path():
    # records say where their files were relative to the repository (``results/...``, ``../shared/...``): an
    # absolute path would name the machine a run was made on and mean nothing in another clone
    listed = subprocess.run(["git", "ls-files", "-z", "results"], cwd=REPO, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the committed records are not known")
    found = {}
    for name in sorted(n for n in listed.stdout.decode().split("\0") if n.endswith(".json")):
        path = REPO / name
        if not path.is_file():  # removed in the working tree, not committed yet
            continue
        hits = _absolute_paths(json.loads(path.read_text()))
        if hits:
            found[str(path.relative_to(REPO))] = sorted(set(hits))[:2]
    assert not found, f"absolute paths in run records (write them relative to the repository root): {found}"


def test_the_absolute_path_check_sees_one():
    assert _absolute_paths({"a": ["x /srv/data/train-0.tar y"], "b": "results/x", "c": "32 / 64 px"}) == [
        "/srv/data/train-0.tar"]
    assert _absolute_paths("C:\\runs\\x") == ["C:\\runs\\x"]
