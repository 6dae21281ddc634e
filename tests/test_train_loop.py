"""End-to-end pretraining runs on tiny shards: single process, resume, NaN guard, 2-process accelerate, quick start."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smi_timm.train import NonFiniteLossError, TrainConfig, list_checkpoints, train

REPO = Path(__file__).resolve().parents[1]


def tiny_config(out_dir, **overrides) -> TrainConfig:
    """resnet10t (standard stem) at 32 px on 64 images of the bundled sample: a few seconds per run."""
    settings = dict(model="resnet10t", projector="64-64", image_size=32, augment="cifar", data=["sample:train"],
                    epoch_samples=64, batch_size=16, workers=0, loss="smi", optimizer="lars", lr=0.2,
                    lr_biases=None, weight_decay=1e-4, max_steps=6, warmup_steps=2, save_every=2, keep_last=2,
                    log_every=1, progress=False, output_dir=str(out_dir), seed=3)
    settings.update(overrides)
    return TrainConfig(**settings)


def _backbone_state(run_dir):
    return load_file(str(Path(run_dir) / "export" / "model.safetensors"))


def test_single_process_run_writes_everything(tmp_path):
    res = train(tiny_config(tmp_path / "run"))
    assert res.status == "finished" and res.step == 6 and res.total_steps == 6
    names = [p.name for p in list_checkpoints(res.run_dir)]
    assert names == ["step_000000004", "step_000000006"]  # keep_last=2
    assert (res.last_checkpoint / "model.safetensors").is_file()
    rows = [json.loads(line) for line in res.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[0]["lr"] < rows[1]["lr"]  # warmup
    state = _backbone_state(res.run_dir)
    assert not any(k.startswith("projector") or k.startswith("backbone.") for k in state)
    config = json.loads((res.run_dir / "run_config.json").read_text())
    assert config["model"] == "resnet10t" and config["loss"]["name"] == "smi"
    assert res.curve_png is not None and res.curve_png.is_file()


@pytest.mark.parametrize("loss", ["barlow", "vicreg"])
def test_baseline_losses_train(tmp_path, loss):
    res = train(tiny_config(tmp_path / loss, loss=loss, max_steps=2, export=False, optimizer="sgd", lr=0.05))
    assert res.status == "finished" and res.export_dir is None
    assert len(res.metrics_path.read_text().splitlines()) == 2


def test_resume_continues_exactly(tmp_path):
    full = train(tiny_config(tmp_path / "full"))

    def interrupt(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop: checkpoint, then a clean exit

    part = train(tiny_config(tmp_path / "part", save_every=100), on_step=interrupt)
    # the stop request is shared between ranks with the next step's collective: the run stops after step 4
    assert part.status == "interrupted" and part.step == 4
    assert [p.name for p in list_checkpoints(part.run_dir)] == ["step_000000004"]
    resumed = train(tiny_config(tmp_path / "part", save_every=100, resume="auto"))
    assert resumed.status == "finished" and resumed.step == 6
    a, b = _backbone_state(full.run_dir), _backbone_state(resumed.run_dir)
    assert a.keys() == b.keys()
    for key in a:  # same data order, augmentations, schedule and optimiser state: identical up to float noise
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path / "nan", inject_nan_at_step=3)
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* at step 3"):
        train(cfg)
    ckpts = list_checkpoints(cfg.output_dir)
    assert [p.name for p in ckpts] == ["step_000000002"]
    state = load_file(str(ckpts[-1] / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not (Path(cfg.output_dir) / "export").exists()


def test_stale_partial_checkpoint_is_ignored_on_resume(tmp_path):
    cfg = tiny_config(tmp_path / "crash", max_steps=2)
    train(cfg)
    # a crash in the middle of the next save leaves a partial directory behind
    partial = Path(cfg.output_dir) / "checkpoints" / ".tmp-step_000000004"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    res = train(tiny_config(tmp_path / "crash", max_steps=4, resume="auto"))
    assert res.step == 4 and not partial.exists()


TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    from accelerate import PartialState
    from smi_timm.train import TrainConfig, train

    out = sys.argv[1]
    cfg = TrainConfig(model="resnet10t", projector="32-32", image_size=32, augment="cifar", data=["sample:train"],
                      epoch_samples=64, batch_size=8, workers=0, loss="smi", gather=True, optimizer="lars", lr=0.2,
                      lr_biases=None, max_steps=3, warmup_steps=1, save_every=2, log_every=1, progress=False,
                      output_dir=out + "/run", seed=0)
    res = train(cfg)
    state = PartialState()  # after train(): the Accelerator created there set up the (gloo) process group
    digest = hashlib.sha256()
    for name, p in sorted(res.model.named_parameters()):  # BN running stats are per-rank buffers
        digest.update(name.encode()); digest.update(p.detach().cpu().float().numpy().tobytes())
    with open(f"{out}/rank{state.process_index}.json", "w") as f:
        json.dump({"step": res.step, "world": state.num_processes, "params": digest.hexdigest()}, f)
    state.wait_for_everyone()
    state.destroy_process_group()
""")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_launch(tmp_path):
    script = tmp_path / "two_proc.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    accelerate = shutil.which("accelerate")
    assert accelerate, "accelerate CLI not on PATH"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 and r["step"] == 3 for r in ranks)
    assert ranks[0]["params"] == ranks[1]["params"]  # DDP kept the replicas identical
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_000000002", "step_000000003"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # written once, by the main process


def test_quickstart_shortened(tmp_path):
    from smi_timm.export import load_export
    from smi_timm.quickstart import main

    out = tmp_path / "qs"
    assert main(["--steps", "3", "--output-dir", str(out), "--no-progress", "--workers", "0"]) == 0
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["steps"] == 3
    assert set(summary["knn"]) == {"pretrained", "random_init"}
    assert 0.0 <= summary["knn"]["pretrained"]["k200_top1"] <= 100.0
    backbone = load_export(out / "export")
    feats = backbone(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 512)
    assert Path(summary["curve"]).is_file()


def test_cli_help_lists_everything():
    import runpy

    from smi_timm.train import build_parser

    flags = ("--model", "--loss", "--neg-weight", "--gather", "--resume", "--save-every", "--sync-bn",
             "--channels-last", "--compile", "--projector", "--cifar-stem", "--mixed-precision")
    # one real `script --help` (the __main__ path), the others through their DEFAULTS in-process
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "pretrain_r50.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(flag in proc.stdout for flag in flags)
    assert "accelerate launch --multi_gpu --num_processes 8" in proc.stdout  # the docstring's commands
    for script in ("pretrain_vit_s16.py", "pretrain_cifar10.py"):
        module = runpy.run_path(str(REPO / "recipes" / script), run_name="recipe")
        text = build_parser(module["DEFAULTS"], description=module["__doc__"]).format_help()
        assert all(flag in text for flag in flags), script


def test_grad_accumulation_and_knn_monitor(tmp_path):
    res = train(tiny_config(tmp_path / "accum", grad_accum=2, max_steps=2, save_every=1, log_every=1,
                            eval_train=["sample:train"], eval_test=["sample:test"], eval_every=1, eval_k=20))
    assert res.status == "finished" and res.step == 2
    rows = [json.loads(line) for line in res.metrics_path.read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    knn_rows = [r for r in rows if "knn_top1" in r]
    assert [r["step"] for r in train_rows] == [1, 2]  # optimiser steps, not micro-batches
    assert train_rows[-1]["epoch"] == pytest.approx(4 * 16 / 64)  # 4 micro-batches of 16 out of 64 samples
    assert [r["step"] for r in knn_rows] == [1, 2]  # every step, and once at the end
    assert all(10.0 <= r["knn_top1"] <= 100.0 for r in knn_rows)
    assert res.final_knn["knn_top1"] == knn_rows[-1]["knn_top1"]
