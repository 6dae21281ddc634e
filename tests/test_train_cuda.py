"""The training loop on a CUDA device: GPU defaults, no host synchronisation in steady state, --compile.

Skipped without CUDA; run by section b of ``benchmarks/gpu_check.sh`` (``pytest -m cuda``).
"""
import json

import pytest
import torch

from smi_timm.losses import SMILoss
from smi_timm.train import TrainConfig, train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def cuda_config(out_dir, **overrides) -> TrainConfig:
    settings = dict(model="resnet10t", projector="256-256", image_size=32, augment="cifar", data=["sample:train"],
                    epoch_samples=512, batch_size=64, loss="smi", optimizer="lars", lr=0.2, lr_biases=None,
                    max_steps=8, warmup_steps=2, save_every=0, log_every=4, progress=False, output_dir=str(out_dir),
                    seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_gpu_defaults_bf16_channels_last_and_throughput(tmp_path):
    res = train(cuda_config(tmp_path / "defaults", export=False))
    config = json.loads((res.run_dir / "run_config.json").read_text())
    expected = "bf16" if torch.cuda.is_bf16_supported() else "no"
    assert config["recipe"]["mixed_precision"] == expected
    conv = next(m for m in res.model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.backends.cudnn.benchmark
    rows = [json.loads(line) for line in res.metrics_path.read_text().splitlines()]
    assert all(r["peak_mem_mib"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert res.throughput["peak_mem_mib"] > 0


class SyncGuard:
    """The SMI loss; from the loss of step ``first`` until the loss of step ``last`` (non-log steps in between)
    every synchronising CUDA call raises (``torch.cuda.set_sync_debug_mode('error')``)."""

    def __init__(self, first, last):
        self.first, self.last, self.calls = first, last, 0
        self.loss = SMILoss()

    def __call__(self, za, zb):
        self.calls += 1
        if self.calls == self.first:
            torch.cuda.set_sync_debug_mode("error")
        elif self.calls == self.last:
            torch.cuda.set_sync_debug_mode("default")
        return self.loss(za, zb)


@pytest.mark.parametrize("augment_device", ["device", "cpu"])
def test_no_host_sync_between_log_steps(tmp_path, augment_device):
    # log every 4 steps: steps 5, 6, 7 (and the data for steps 6-8) must not synchronise; step 8 logs
    guard = SyncGuard(first=5, last=8)
    try:
        res = train(cuda_config(tmp_path / augment_device, augment_device=augment_device, workers=2, export=False),
                    loss_fn=guard)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert res.step == 8 and guard.calls == 8


def test_compile_on_cuda(tmp_path):
    res = train(cuda_config(tmp_path / "compiled", compile=True, max_steps=4, log_every=2, export=False))
    rows = [json.loads(line) for line in res.metrics_path.read_text().splitlines()]
    assert res.step == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
