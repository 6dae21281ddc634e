"""Optimisers, the schedule, checkpoint bookkeeping and the CLI of the training package (no training run)."""
import json
import math

import pytest
import torch
from torch import nn

from smi_timm.train.checkpoint import list_checkpoints, resolve_resume, write_json_atomic
from smi_timm.train.config import TrainConfig, build_parser, config_from_args, parse_kv
from smi_timm.train.optim import LARS, build_optimizer, lr_at_step, param_groups


def _toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_param_groups_exclude_biases_and_norms():
    groups = param_groups(_toy(), weight_decay=0.1, lr_weights=1.0, lr_biases=0.01)
    weights, others = groups
    assert [p.ndim for p in weights["params"]] == [2, 2]
    assert all(p.ndim == 1 for p in others["params"]) and len(others["params"]) == 4  # 2 biases + BN weight/bias
    assert weights["lars_adapt"] and not others["lars_adapt"] and others["weight_decay"] == 0.0


def test_lars_step_matches_formula():
    model = _toy()
    opt = build_optimizer(model, "lars", lr=0.2, weight_decay=1e-2, global_batch=512, lr_biases=0.01, momentum=0.9)
    assert isinstance(opt, LARS)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4) and opt.param_groups[1]["lr"] == pytest.approx(0.02)
    w, b = model[0].weight, model[0].bias
    w0, b0 = w.detach().clone(), b.detach().clone()
    model(torch.randn(6, 4)).pow(2).mean().backward()
    gw, gb = w.grad.clone(), b.grad.clone()
    opt.step()
    dw = gw + 1e-2 * w0
    q = 0.001 * w0.norm() / dw.norm()
    torch.testing.assert_close(w.detach(), w0 - 0.4 * q * dw)
    torch.testing.assert_close(b.detach(), b0 - 0.02 * gb)  # no decay, no adaptation, own lr


def test_adamw_and_sgd_scale_lr_and_skip_decay_on_biases():
    for name, cls in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)):
        opt = build_optimizer(_toy(), name, lr=1e-3, weight_decay=0.05, global_batch=128)
        assert isinstance(opt, cls)
        assert opt.param_groups[0]["lr"] == pytest.approx(5e-4) and opt.param_groups[0]["weight_decay"] == 0.05
        assert opt.param_groups[1]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="unknown optimizer 'adam'.*'lars', 'adamw', 'sgd'"):
        build_optimizer(_toy(), "adam", lr=1.0, weight_decay=0.0, global_batch=256)


def test_schedule_warmup_then_cosine():
    total, warm = 100, 10
    f = [lr_at_step(s, total, warm, 0.001) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay after warmup
    assert f[55] == pytest.approx(0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_at_step(total, total, warm, 0.001) == pytest.approx(0.001)


def test_checkpoint_listing_ignores_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step_000000010", True), ("step_000000020", True), (".tmp-step_000000030", True),
                           ("step_000000040", False)):
        (root / name).mkdir(parents=True)
        if complete:
            write_json_atomic(root / name / "trainer_state.json", {"step": int(name[-2:])})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000010", "step_000000020"]
    assert resolve_resume("auto", tmp_path).name == "step_000000020"
    assert resolve_resume(str(tmp_path), tmp_path / "other").name == "step_000000020"
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        resolve_resume(str(root / "step_000000040"), tmp_path)
    assert json.loads((root / "step_000000010" / "trainer_state.json").read_text()) == {"step": 10}


def test_parser_has_every_field_and_recipe_defaults():
    parser = build_parser({"model": "resnet18", "lr": 0.3})
    args = parser.parse_args(["--data", "a.tar", "b.tar", "--no-progress", "--model-kwargs", "img_size=32",
                              "drop_path_rate=0.1", "--gather"])
    cfg = config_from_args(args)
    assert cfg.model == "resnet18" and cfg.lr == 0.3 and cfg.data == ["a.tar", "b.tar"] and cfg.gather
    assert cfg.model_kwargs == {"img_size": 32, "drop_path_rate": 0.1} and cfg.progress is False
    assert parser.parse_args([]).channels_last is None  # auto: on for CUDA
    assert parser.parse_args(["--no-channels-last"]).channels_last is False
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        build_parser({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_kv(["img_size"])
    with pytest.raises(ValueError, match="unknown loss 'byol'"):
        TrainConfig(loss="byol").loss_kwargs()


def test_optional_numeric_flags_accept_none():
    from smi_timm.train.config import build_parser

    parser = build_parser()
    assert parser.parse_args(["--lr-biases", "none"]).lr_biases is None  # LARS: biases at the weights' rate
    assert parser.parse_args(["--lr-biases", "0.01"]).lr_biases == 0.01
    assert parser.parse_args(["--max-steps", "None"]).max_steps is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr-biases", "fast"])
