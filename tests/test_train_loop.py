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


@pytest.mark.parametrize("loss", ["barlow", "vicreg", "simclr"])
def test_baseline_losses_train(tmp_path, loss):
    res = train(tiny_config(tmp_path / loss, loss=loss, max_steps=2, export=False, optimizer="sgd", lr=0.05))
    assert res.status == "finished" and res.export_dir is None
    assert len(res.metrics_path.read_text().splitlines()) == 2


def test_a_new_loss_is_one_module_and_one_registry_line(tmp_path):
    """A loss written the way the library's are (hyper-parameters as keyword arguments with defaults, an Args
    docstring), registered with one line, is trained by name from the command line and described by the model card."""
    import torch.nn.functional as F
    from torch import nn

    from smi_timm.losses import LOSSES, create_loss
    from smi_timm.publish import model_card
    from smi_timm.train import build_parser, config_from_args

    class CosineAgreement(nn.Module):  # the "one module"
        """Cosine agreement of the two views (a test-only loss).

        Args:
            scale: multiplies the negative mean cosine similarity. Default 1.
        """

        def __init__(self, scale: float = 1.0, gather: bool = False):
            super().__init__()
            self.scale, self.gather = float(scale), gather

        def forward(self, za, zb):
            return -self.scale * F.cosine_similarity(za.float(), zb.float(), dim=1).mean()

    LOSSES.register("cosine-test", CosineAgreement, "Cosine agreement")  # the "one registry line"
    try:
        assert isinstance(create_loss("cosine-test", scale=3.0), CosineAgreement)
        assert LOSSES["cosine-test"].hparams["scale"].help.startswith("multiplies the negative mean")
        base = tiny_config(tmp_path / "run", max_steps=2)
        parser = build_parser({k: v for k, v in base.to_dict().items() if k not in ("loss", "loss_args")})
        assert "--scale" in parser.format_help()  # its flag, generated from the registry
        cfg = config_from_args(parser.parse_args(["--loss", "cosine-test", "--scale", "2"]))
        assert cfg.loss_args == {"scale": 2.0} and isinstance(cfg.create_loss(), CosineAgreement)
        res = train(cfg)
        assert res.status == "finished" and res.model is not None
        recorded = json.loads((res.run_dir / "run_config.json").read_text())["loss"]
        assert recorded == {"name": "cosine-test", "scale": 2.0, "gather": False}
        card = model_card(res.export_dir)
        assert "Cosine agreement (Cosine agreement of the two views" in card and "scale=2.0" in card
        with pytest.raises(ValueError, match=r"loss 'cosine-test' has no setting 'neg_weight'.*scale \(default 1.0\)"):
            TrainConfig(loss="cosine-test", loss_args={"neg_weight": 1.0})
    finally:
        LOSSES.unregister("cosine-test")


def test_resume_continues_exactly(tmp_path):
    full = train(tiny_config(tmp_path / "full"))

    def interrupt(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop: checkpoint, then a clean exit

    part = train(tiny_config(tmp_path / "part", save_every=100), on_step=interrupt)
    # the stop request is shared between ranks by the check that follows the log of step 3 (log_every=1)
    assert part.status == "interrupted" and part.step == 3
    assert [p.name for p in list_checkpoints(part.run_dir)] == ["step_000000003"]
    resumed = train(tiny_config(tmp_path / "part", save_every=100, resume="auto"))
    assert resumed.status == "finished" and resumed.step == 6
    a, b = _backbone_state(full.run_dir), _backbone_state(resumed.run_dir)
    assert a.keys() == b.keys()
    for key in a:  # same data order, augmentations, schedule and optimiser state: identical up to float noise
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


class NaNAtStep:
    """The SMI loss, made non-finite from the given optimiser step on (one micro-batch per step)."""

    def __init__(self, step):
        from smi_timm.losses import SMILoss

        self.step, self.calls, self.loss = step, 0, SMILoss(backend="torch")

    def __call__(self, za, zb):
        self.calls += 1
        loss = self.loss(za, zb)
        return loss * float("nan") if self.calls >= self.step else loss


@pytest.mark.parametrize("log_every, check_every, checked_at", [(1, None, 3), (4, 2, 4), (8, None, 4)])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, log_every, check_every, checked_at):
    # the flags are read every check_every (<= log_every) steps and before every checkpoint (save_every=2): a
    # non-finite loss at step 3 stops the run at the next check, before the step-4 checkpoint is written
    cfg = tiny_config(tmp_path / "nan", log_every=log_every, check_every=check_every)
    with pytest.raises(NonFiniteLossError, match=f"non-finite loss at step 3 \\(checked at step {checked_at},"):
        train(cfg, loss_fn=NaNAtStep(3))
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
                      output_dir=out + "/run", seed=0, sync_bn=True)
    res = train(cfg)
    state = PartialState()  # after train(): the Accelerator created there set up the (gloo) process group

    def digest(tensors):
        h = hashlib.sha256()
        for name, t in sorted(tensors):
            h.update(name.encode()); h.update(t.detach().cpu().float().numpy().tobytes())
        return h.hexdigest()

    syncbn = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in res.model.modules())
    with open(f"{out}/rank{state.process_index}.json", "w") as f:
        json.dump({"step": res.step, "world": state.num_processes, "params": digest(res.model.named_parameters()),
                   "syncbn": syncbn}, f)
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
    # --sync-bn: torch's SyncBatchNorm needs CUDA, so a CPU run keeps per-process BatchNorm (and says so)
    assert ranks[0]["syncbn"] == 0 and "SyncBatchNorm needs CUDA devices" in proc.stderr  # a logged warning
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_000000002", "step_000000003"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # written once, by the main process


def test_quickstart_shortened(tmp_path):
    from smi_timm.cli.quickstart import main
    from smi_timm.export import load_export

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


# ops that make the host wait for the device on CUDA (a CPU dispatch mode sees them; `.tolist()` it does not, which
# tests/test_train_cuda.py covers with torch.cuda.set_sync_debug_mode)
HOST_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "masked_select", "_unique2",
                 "unique_dim", "unique_consecutive", "repeat_interleave", "bincount"}


class CountedLoss:
    """The SMI loss (torch backend) counting its calls: the clock that attributes each dispatched op to a step."""

    def __init__(self):
        from smi_timm.losses import SMILoss

        self.calls, self.loss = 0, SMILoss(backend="torch")

    def __call__(self, za, zb):
        self.calls += 1
        return self.loss(za, zb)


def test_no_host_sync_between_log_steps(tmp_path):
    from torch.utils._python_dispatch import TorchDispatchMode

    loss = CountedLoss()
    syncs = []

    class SyncCounter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in HOST_SYNC_OPS:
                syncs.append((loss.calls, func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    # log (and check) every 4 steps, no checkpoint or evaluation in between; a loader worker process does the CPU
    # augmentation (its ops are not this process's)
    cfg = tiny_config(tmp_path / "sync", max_steps=8, log_every=4, save_every=0, workers=1, epoch_samples=128)
    with SyncCounter():
        res = train(cfg, loss_fn=loss)
    assert res.step == 8 and loss.calls == 8
    # ops after the loss of step k (its backward, optimiser step, cadence, the next batch) are attributed to k
    steps_with_syncs = sorted({calls for calls, _ in syncs if 1 <= calls <= 7})
    assert set(steps_with_syncs) <= {4}, syncs  # only the log/check step may read from the device


def test_collapse_monitor():
    from smi_timm.train.monitor import CollapseMonitor, normalized_std, rankme_tensor

    g = torch.Generator().manual_seed(0)
    healthy = torch.randn(64, 32, generator=g)
    point = torch.ones(64, 32) + 1e-4 * torch.randn(64, 32, generator=g)  # everything maps to (almost) one point
    line = torch.randn(64, 1, generator=g) * torch.randn(1, 32, generator=g)  # one direction
    assert 0.8 < float(normalized_std(healthy)) < 1.2 and float(normalized_std(point)) < 0.01
    assert float(rankme_tensor(line)) < 1.01 and float(rankme_tensor(healthy)) > 20
    mon = CollapseMonitor()
    for z, collapsed in ((healthy, False), (point, True), (line, True)):
        mon.keep(z)
        values = dict(zip(mon.KEYS, mon.stats().tolist()))
        assert (mon.warning(7, values) is not None) == collapsed, values
    mon.keep(line)
    values = dict(zip(mon.KEYS, mon.stats().tolist()))
    assert "step 7: the embeddings look collapsed (emb_rankme" in mon.warning(7, values)


def test_throughput_is_recorded_per_window_and_summarised(tmp_path):
    res = train(tiny_config(tmp_path / "tp", max_steps=6, log_every=2, save_every=0, export=False))
    rows = [json.loads(line) for line in res.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        assert r["images_per_s"] > 0 and 0.0 <= r["data_wait_frac"] <= 1.0 and r["step_time_ms"] > 0
        assert "peak_mem_mib" not in r  # CUDA only
        assert 0.0 < r["emb_std"] < 2.0 and 1.0 <= r["emb_rankme"] <= 16  # batch 16 x 64-d embeddings
    summary = json.loads((res.run_dir / "train_summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 6 and summary["windows"] == 2  # first excluded
    assert res.throughput == {k: v for k, v in summary.items() if k not in ("status", "step", "total_steps", "data")}
    assert summary["data"] == res.data and res.data["samples"] == 6 * 16  # what the loader read, and any skipped
    from smi_timm.cli.pretrain import format_throughput

    assert "two-view images/s" in format_throughput(res.throughput)


def test_mixed_precision_resolution(monkeypatch):
    from smi_timm.train.loop import resolve_mixed_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_mixed_precision("auto", cpu) == "no"
    assert resolve_mixed_precision("fp16", cpu) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_mixed_precision("auto", cuda) == "bf16"
    assert resolve_mixed_precision("no", cuda) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate launch --mixed_precision fp16
    assert resolve_mixed_precision("auto", cuda) == "fp16"
    with pytest.raises(ValueError, match="no, fp16, bf16 or auto"):
        resolve_mixed_precision("fp8", cuda)


def test_log_with_checks_trackers(monkeypatch, tmp_path):
    import accelerate.tracking

    from smi_timm.train.loop import resolve_trackers

    assert resolve_trackers(TrainConfig()) is None
    with pytest.raises(ValueError, match="not a tracker accelerate supports; choose from .*wandb"):
        resolve_trackers(TrainConfig(log_with=["neptune"]))
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ValueError, match="the 'wandb' package is not installed; pip install wandb"):
        resolve_trackers(TrainConfig(log_with=["wandb"]))
    with pytest.raises(ValueError, match="pip install 'smi-timm\\[tensorboard\\]'"):
        train(tiny_config(tmp_path / "tb", tensorboard=True))  # the alias, checked before anything runs


def test_tensorboard_tracker_logs(tmp_path):
    pytest.importorskip("tensorboard")
    res = train(tiny_config(tmp_path / "tb", log_with=["TensorBoard"], tensorboard=True, max_steps=2, export=False))
    events = list((res.run_dir / "smi-timm").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
