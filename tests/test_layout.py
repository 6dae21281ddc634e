"""smi_timm.layout (run / export file layout, checkpoint discovery, atomic writes) and smi_timm.curves."""
import json
import os

import pytest

from smi_timm.curves import metric_series, plot_curves, read_metrics, summarize_curves
from smi_timm.layout import (
    TRAINER_STATE,
    WEIGHTS_NAME,
    atomic_write_bytes,
    find_run_config,
    is_export_dir,
    is_run_dir,
    latest_checkpoint,
    list_checkpoints,
    load_run_config,
    locate_weights,
    step_dir_name,
    step_of,
    write_json_atomic,
)


def _run(tmp_path):
    """steps 1 and 3: trainer state + weights; 2: weights only; 4: trainer state only; 5: a save in progress."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    for step, files in ((1, (TRAINER_STATE, WEIGHTS_NAME)), (2, (WEIGHTS_NAME,)), (3, (TRAINER_STATE, WEIGHTS_NAME)),
                        (4, (TRAINER_STATE,))):
        (ckpts / step_dir_name(step)).mkdir(parents=True)
        for f in files:
            (ckpts / step_dir_name(step) / f).write_text("{}")
    (ckpts / f".tmp-{step_dir_name(5)}").mkdir()
    (ckpts / f".tmp-{step_dir_name(5)}" / TRAINER_STATE).write_text("{}")
    (run / "run_config.json").write_text(json.dumps({"model": "resnet18", "image_size": 32}))
    return run


def test_checkpoint_discovery_keys_on_what_the_caller_reads(tmp_path):
    run = _run(tmp_path)
    assert step_dir_name(1000) == "step_000001000"
    assert [p.name for p in list_checkpoints(run)] == [step_dir_name(s) for s in (1, 3, 4)]
    assert [p.name for p in list_checkpoints(run, needs=WEIGHTS_NAME)] == [step_dir_name(s) for s in (1, 2, 3)]
    assert latest_checkpoint(run).name == step_dir_name(4)
    assert latest_checkpoint(run, needs=WEIGHTS_NAME).name == step_dir_name(3)
    assert latest_checkpoint(tmp_path / "nothing") is None and list_checkpoints(tmp_path / "nothing") == []
    assert step_of(run / "checkpoints" / step_dir_name(3) / WEIGHTS_NAME) == 3
    assert step_of(run / "checkpoints" / step_dir_name(3)) == 3 and step_of(run) is None
    assert is_run_dir(run) and not is_run_dir(run / "checkpoints") and not is_export_dir(run)


def test_run_config_and_weights_lookup(tmp_path):
    run = _run(tmp_path)
    ckpt = run / "checkpoints" / step_dir_name(2)
    assert find_run_config(ckpt / WEIGHTS_NAME) == (run / "run_config.json").resolve()
    assert load_run_config(run)["model"] == "resnet18" == load_run_config(ckpt)["model"]
    weights, cfg = locate_weights(run)
    assert weights == run / "checkpoints" / step_dir_name(3) / WEIGHTS_NAME and cfg["image_size"] == 32
    assert locate_weights(ckpt)[0] == ckpt / WEIGHTS_NAME
    assert locate_weights(ckpt / WEIGHTS_NAME)[0] == ckpt / WEIGHTS_NAME
    with pytest.raises(FileNotFoundError, match="does not exist"):
        locate_weights(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        locate_weights(run / "checkpoints")
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / WEIGHTS_NAME).write_text("{}")
    with pytest.raises(FileNotFoundError, match="no run_config.json"):
        locate_weights(tmp_path / "orphan")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a run config"):
        load_run_config(tmp_path / "bad.json")


def test_atomic_writes(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "f.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    write_json_atomic(path, {"b": 1, "a": 2}, sort_keys=False)
    assert list(json.loads(path.read_text())) == ["b", "a"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new")
    assert json.loads(path.read_text()) == {"b": 1, "a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]  # no temporary file left


def _rows():
    rows = [{"step": s, "loss": 1.0 / s, "lr": 0.1} for s in (10, 20, 30)]
    rows.insert(1, {"step": 15, "knn_top1": 40.0, "knn_top5": 80.0})
    rows.append({"step": 30, "knn_top1": 45.0})
    rows.append({"step": 40, "loss": float("nan")})
    return rows


def test_metrics_reader_and_summary(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in _rows()) + '\n{"step": "x"}\n[1]\n{"loss": 1}\n{"step": 50, "lo')
    rows, bad = read_metrics(p)
    assert len(rows) == 6 and bad == 4
    assert metric_series(rows, "loss") == ([10.0, 20.0, 30.0], [0.1, 0.05, 1 / 30])  # NaN left out
    assert summarize_curves(rows) == {"rows": 6, "last_step": 30.0, "final_loss": 1 / 30, "best_knn_top1": 45.0,
                                      "final_knn_top1": 45.0}


def test_plot_curves_one_run_several_runs_and_nothing(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in _rows()))
    out = plot_curves(p, tmp_path / "curve.png")
    assert out == tmp_path / "curve.png" and out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 1000
    two = plot_curves({"a": _rows(), "b": _rows()[:2]}, tmp_path / "two.png", keys=("knn_top1",), title="t")
    assert two.stat().st_size > 1000
    assert plot_curves(_rows(), tmp_path / "none.png", keys=("images_per_s",)) is None
    assert not (tmp_path / "none.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png", "metrics.jsonl", "two.png"]
