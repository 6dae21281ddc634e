"""Fault tolerance of a training run: every fault either ends the process promptly with a clear message, or is
survived without losing anything. Subprocesses with timeouts, seconds each (CPU)."""
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from smi_timm.train import TrainConfig, list_checkpoints, train
from smi_timm.train.checkpoint import CheckpointWriteError, UnsafeCheckpointError, describe_write_error

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "resnet10t", "--projector", "32-32", "--image-size", "32", "--augment", "cifar",
        "--batch-size", "8", "--epoch-samples", "64", "--optimizer", "lars", "--lr", "0.2", "--lr-biases", "none",
        "--warmup-steps", "1", "--no-progress", "--seed", "0"]


def tiny_config(out_dir, **overrides) -> TrainConfig:
    settings = dict(model="resnet10t", projector="32-32", image_size=32, augment="cifar", data=["sample:train"],
                    epoch_samples=64, batch_size=8, workers=0, loss="smi", optimizer="lars", lr=0.2, lr_biases=None,
                    max_steps=6, warmup_steps=1, save_every=2, keep_last=3, log_every=1, progress=False,
                    output_dir=str(out_dir), seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def pretrain(args, timeout=60, **kw):
    """smi-pretrain in a subprocess; returns (CompletedProcess, seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "smi_timm.cli.pretrain", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)
    return proc, time.monotonic() - t0


def wait_gone(pids, seconds):
    deadline = time.monotonic() + seconds
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    return alive


@pytest.mark.parametrize("kind", ["random bytes", "a JPEG"])
def test_unusable_data_exits_promptly(tmp_path, kind):
    shard = tmp_path / "garbage.tar"
    if kind == "random bytes":
        shard.write_bytes(os.urandom(100_000))
    else:
        from smi_timm.data import sample_shards

        shutil.copy(sample_shards("test")[0], tmp_path / "x.tar.gz")
        from PIL import Image

        Image.new("RGB", (64, 64), (200, 30, 30)).save(shard, format="JPEG")
    proc, seconds = pretrain([*TINY, "--data", str(shard), "--max-steps", "1", "--workers", "1",
                              "--output-dir", str(tmp_path / "run")], timeout=90)
    assert proc.returncode != 0 and seconds < 30, (seconds, proc.stderr[-2000:])
    assert "gave no sample with an image" in proc.stderr, proc.stderr[-2000:]


EXCEPTION_SCRIPT = textwrap.dedent("""
    import os, sys
    import psutil
    from smi_timm.losses import SMILoss
    from smi_timm.train import TrainConfig, train

    class Boom:
        calls = 0
        def __call__(self, za, zb):
            self.calls += 1
            if self.calls == 3:
                kids = [p.pid for p in psutil.Process().children(recursive=True)]
                print("WORKERS", " ".join(map(str, kids)), flush=True)
                raise RuntimeError("boom in the training loop")
            return SMILoss(backend="torch")(za, zb)

    train(TrainConfig(model="resnet10t", projector="32-32", image_size=32, augment="cifar", data=["sample:train"],
                      epoch_samples=256, batch_size=8, workers=2, max_steps=20, warmup_steps=1, progress=False,
                      output_dir=sys.argv[1], save_every=0), loss_fn=Boom())
""")


def test_exception_in_the_loop_with_live_workers_exits(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text(EXCEPTION_SCRIPT)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=90, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0 and time.monotonic() - t0 < 30, proc.stderr[-2000:]
    assert "boom in the training loop" in proc.stderr
    workers = [int(p) for line in proc.stdout.splitlines() if line.startswith("WORKERS") for p in line.split()[1:]]
    assert workers, proc.stdout  # the loader had live worker processes when the exception was raised
    assert wait_gone(workers, 10) == []


def test_sigkill_of_the_trainer_leaves_no_worker(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "smi_timm.cli.pretrain", *TINY, "--data", "sample:train",
                             "--epoch-samples", "4000", "--max-steps", "500", "--workers", "2", "--log-every", "1",
                             "--save-every", "0", "--output-dir", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            metrics = run / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        workers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert workers, "no loader worker was running"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert wait_gone(workers, 15) == []


def test_kill_9_during_checkpointing_then_resume_finishes(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "--data", "sample:train", "--max-steps", "6", "--workers", "0", "--save-every", "1",
            "--keep-last", "2", "--log-every", "1", "--output-dir", str(run)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "smi_timm.cli.pretrain", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    killed_in_save = False
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            ckpts = run / "checkpoints"
            if ckpts.is_dir() and any(p.name.startswith(".tmp-step_000000003") for p in ckpts.iterdir()):
                proc.send_signal(signal.SIGKILL)
                killed_in_save = True
                break
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert killed_in_save, "the run ended before its third checkpoint was being written"
    proc2, _ = pretrain([*args, "--resume", "auto"], timeout=120)
    assert proc2.returncode == 0, proc2.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # one row per log step, no repeats
    assert (run / "export" / "model.safetensors").is_file()
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())


class FullDiskAt:
    """Wraps an Accelerator's ``save_state``: from the given call on, write part of the files, then fail as a full
    disk does (``OSError(ENOSPC)``)."""

    def __init__(self, accelerator, fail_from_call):
        self.real, self.calls, self.fail_from = accelerator.save_state, 0, fail_from_call

    def __call__(self, output_dir, **kwargs):
        self.calls += 1
        if self.calls < self.fail_from:
            return self.real(output_dir, **kwargs)
        os.makedirs(output_dir, exist_ok=True)
        Path(output_dir, "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(output_dir, "optimizer.bin"))


def test_full_disk_during_a_checkpoint_says_so_and_keeps_the_last_good_one(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.save_state = FullDiskAt(accelerator, fail_from_call=2)
    cfg = tiny_config(tmp_path / "run")
    with pytest.raises(CheckpointWriteError) as info:
        train(cfg, accelerator=accelerator)
    message = str(info.value)
    ckpts = list_checkpoints(cfg.output_dir)
    assert [p.name for p in ckpts] == ["step_000000002"]
    for text in ("step 4", "No space left on device", str(ckpts[0]), "--resume auto",
                 str(Path(cfg.output_dir) / "checkpoints")):
        assert text in message, (text, message)
    state = load_file(str(ckpts[0] / "model.safetensors"))  # the last good checkpoint is intact
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not any(p.name.startswith(".tmp-") for p in (Path(cfg.output_dir) / "checkpoints").iterdir())
    res = train(tiny_config(tmp_path / "run", resume="auto"))  # space freed: the run continues
    assert res.status == "finished" and res.step == 6


def test_write_errors_are_described_in_the_system_s_words(tmp_path):
    assert describe_write_error(OSError(errno.EACCES, "denied"), tmp_path) == os.strerror(errno.EACCES)
    wrapped = RuntimeError("serialising failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "x")
    assert describe_write_error(wrapped, tmp_path) == os.strerror(errno.ENOSPC)
    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert describe_write_error(rust, tmp_path) == os.strerror(28)


def test_full_tmpfs_during_a_checkpoint(tmp_path):
    """The same fault on a real full file system: a small tmpfs (needs the right to mount; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mnt)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        # resnet10t + a 32-32 projector: ~38 MB per checkpoint (weights + optimiser state): the third does not fit
        proc, _ = pretrain([*TINY, "--data", "sample:train", "--max-steps", "8", "--workers", "0", "--save-every",
                            "1", "--keep-last", "5", "--no-export", "--output-dir", str(mnt / "run")], timeout=120)
        assert proc.returncode == 4, proc.stderr[-2000:]
        assert "No space left on device" in proc.stderr and "--resume auto" in proc.stderr, proc.stderr[-2000:]
        good = list_checkpoints(mnt / "run")
        assert good and f"the last good checkpoint is {good[-1]}" in proc.stderr
        load_file(str(good[-1] / "model.safetensors"))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


class Payload:
    """Unpickling this creates a file: proof that arbitrary code would have run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("victim", ["optimizer.bin", "random_states_0.pkl"])
def test_resume_refuses_pickled_objects(tmp_path, victim):
    cfg = tiny_config(tmp_path / "run", max_steps=2, save_every=2)
    train(cfg)
    ckpt = list_checkpoints(cfg.output_dir)[-1]
    marker = tmp_path / "pwned"
    with open(ckpt / victim, "wb") as f:
        pickle.dump({"state": Payload(str(marker))}, f)
    with pytest.raises(UnsafeCheckpointError, match=f"{victim} is not a plain tensor file.*refusing to unpickle"):
        train(tiny_config(tmp_path / "run", max_steps=4, save_every=2, resume="auto"))
    assert not marker.exists()


TWO_RANKS_SCRIPT = textwrap.dedent("""
    import os, sys
    from smi_timm.train import TrainConfig, train

    good, garbage, out = sys.argv[1:4]
    data = garbage if os.environ["RANK"] == "1" else good  # rank 1's shards are all garbage
    train(TrainConfig(model="resnet10t", projector="32-32", image_size=32, augment="cifar", data=[data],
                      epoch_samples=128, batch_size=8, workers=1, max_steps=6, warmup_steps=1, progress=False,
                      output_dir=out, save_every=0, log_every=1))
""")


def test_one_rank_with_garbage_data_stops_both(tmp_path):
    from smi_timm.data import sample_shards

    script = tmp_path / "two.py"
    script.write_text(TWO_RANKS_SCRIPT)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(os.urandom(100_000))
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [shutil.which("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), str(script),
           sample_shards("train")[0], str(garbage), str(tmp_path / "run")]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=str(tmp_path))
    assert proc.returncode != 0 and time.monotonic() - t0 < 120
    assert "gave no sample with an image" in proc.stdout + proc.stderr
