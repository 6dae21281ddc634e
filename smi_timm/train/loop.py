"""The pretraining loop, driven by Hugging Face Accelerate.

Accelerate owns devices, DDP (one or many GPUs, one or many nodes), mixed precision, gradient accumulation and the
checkpoint state; this module owns the SSL step, the schedule, atomic checkpoints, logging and the end-of-run
export. Launch it with ``accelerate launch`` (any number of processes) or plain ``python`` (one process).

Data order is a function of ``(seed, epoch, rank)``: a resumed run re-opens the current epoch and skips the
micro-batches it already consumed, so that an interrupted run continues exactly where it stopped.
"""
from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from ..losses import create_loss
from ..models import create_ssl_model
from .checkpoint import latest_checkpoint, read_trainer_state, resolve_resume, save_checkpoint, write_json_atomic
from .config import TrainConfig
from .optim import build_optimizer, lr_at_step, set_lr

__all__ = ["train", "TrainResult", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    total_steps: int
    status: str  # "finished" or "interrupted"
    last_checkpoint: Optional[Path]
    export_dir: Optional[Path]
    metrics_path: Path
    curve_png: Optional[Path]
    final_knn: Optional[Dict[str, float]]
    images_per_s: float
    model: Optional[torch.nn.Module] = None  # the trained SSLModel (unwrapped from DDP)


class _StopFlag:
    """Turns SIGTERM / SIGINT into a flag checked at step boundaries (save, then exit cleanly)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _resolve_urls(urls: Optional[List[str]]) -> Optional[List[str]]:
    if urls is None:
        return None
    if list(urls) in (["sample"], ["sample:train"]):
        from ..data import sample_shards
        return sample_shards("train")
    if list(urls) == ["sample:test"]:
        from ..data import sample_shards
        return sample_shards("test")
    return list(urls)


def _loader_stats(loader) -> Dict[str, int]:
    stats = getattr(loader, "stats", None)
    if callable(stats):
        stats = stats()
    return dict(stats or {})


class _MetricsWriter:
    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        self._fh = open(path, "a", buffering=1) if enabled else None

    def write(self, record: Dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _knn_monitor(model, cfg: TrainConfig, device) -> Optional[Dict[str, float]]:
    """kNN accuracy of the backbone: bank = ``eval_train``, queries = ``eval_test``."""
    if not (cfg.eval_train and cfg.eval_test):
        return None
    from ..data import make_eval_loader
    from ..eval.features import extract_features
    from ..eval.knn import knn_classify

    size = cfg.eval_image_size or cfg.image_size
    workers = min(cfg.workers, 2)
    bank_loader = make_eval_loader(_resolve_urls(cfg.eval_train), batch_size=256, image_size=size,
                                   num_workers=workers)
    test_loader = make_eval_loader(_resolve_urls(cfg.eval_test), batch_size=256, image_size=size,
                                   num_workers=workers)
    bank, bank_labels = extract_features(model.backbone, bank_loader, device=device, progress=False)
    test, test_labels = extract_features(model.backbone, test_loader, device=device, progress=False)
    res = knn_classify(bank, bank_labels, test, test_labels, k=cfg.eval_k, T=0.1)
    return {"knn_top1": float(res["top1"]), "knn_top5": float(res["top5"])}


def _plot_curves(metrics_path: Path, out_png: Path) -> Optional[Path]:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "knn_top1" in r]
    if not train_rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 3 if eval_rows else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.2))
    axes[0].plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows])
    axes[0].set(xlabel="step", ylabel="loss", title="training loss")
    axes[1].plot([r["step"] for r in train_rows], [r["lr"] for r in train_rows])
    axes[1].set(xlabel="step", ylabel="lr", title="learning rate")
    if eval_rows:
        axes[2].plot([r["step"] for r in eval_rows], [r["knn_top1"] for r in eval_rows], marker="o")
        axes[2].set(xlabel="step", ylabel="top-1 (%)", title="kNN monitor")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png


def _export(model, run_dir: Path, run_config: Dict[str, Any]) -> Path:
    from ..export import export_backbone

    out = run_dir / "export"
    export_backbone(model, out, run_config)
    return out


def train(cfg: TrainConfig, accelerator=None,
          on_step: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> TrainResult:
    """Run (or resume) a pretraining run described by ``cfg``; returns where everything was written."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if cfg.data is None:
        raise ValueError("no training data: pass --data with WebDataset shards (or 'sample' for the bundled sample)")
    loss_kwargs = cfg.loss_kwargs()  # validates --loss
    run_dir = Path(cfg.output_dir)
    if accelerator is None:
        log_with = None
        if cfg.tensorboard:
            try:
                import tensorboard  # noqa: F401
                log_with = "tensorboard"
            except ImportError:
                print("warning: --tensorboard given but the tensorboard package is not installed; "
                      "pip install 'smi-timm[tensorboard]'")
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                                  log_with=log_with, project_dir=str(run_dir),
                                  dynamo_backend="inductor" if cfg.compile else None)
    is_main = accelerator.is_main_process
    device = accelerator.device

    # identical initial weights on every rank (DDP also broadcasts them), then rank-specific randomness
    set_seed(cfg.seed)
    model = create_ssl_model(cfg.model, cfg.projector, cifar_stem=cfg.cifar_stem, **(cfg.model_kwargs or {}))
    if cfg.sync_bn and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = create_loss(cfg.loss, **loss_kwargs)
    set_seed(cfg.seed, device_specific=True)

    from ..data import make_ssl_loader

    loader = make_ssl_loader(_resolve_urls(cfg.data), batch_size=cfg.batch_size, image_size=cfg.image_size,
                             augment=cfg.augment, num_workers=cfg.workers, seed=cfg.seed,
                             rank=accelerator.process_index, world_size=accelerator.num_processes,
                             epoch_samples=cfg.epoch_samples)
    micro_per_epoch = len(loader)
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"an epoch has {micro_per_epoch} batches per process, fewer than --grad-accum {cfg.grad_accum}: use a "
            f"smaller --batch-size or more data"
        )
    total_steps = int(cfg.max_steps) if cfg.max_steps else int(math.ceil(cfg.epochs * steps_per_epoch))
    warmup_steps = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_epochs * steps_per_epoch)
    warmup_steps = min(warmup_steps, max(0, total_steps - 1))
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum
    optimizer = build_optimizer(model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                global_batch=global_batch, lr_biases=cfg.lr_biases, momentum=cfg.momentum)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    run_config = {
        "model": cfg.model, "projector": unwrapped.projector_spec, "cifar_stem": cfg.cifar_stem,
        "timm_kwargs": dict(cfg.model_kwargs or {}), "image_size": cfg.image_size,
        "mean": list(loader.augment.mean), "std": list(loader.augment.std),
        "loss": {"name": cfg.loss, **{k: v for k, v in loss_kwargs.items() if k != "backend"}},
        "recipe": {**cfg.to_dict(), "global_batch": global_batch, "total_steps": total_steps,
                   "steps_per_epoch": steps_per_epoch, "num_processes": accelerator.num_processes},
    }

    step = 0
    ckpt = resolve_resume(cfg.resume, run_dir)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        step = int(read_trainer_state(ckpt)["step"])
        if is_main:
            print(f"resumed from {ckpt} at step {step}/{total_steps}")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "run_config.json", run_config)
        if log_with_tracker(accelerator):
            accelerator.init_trackers("smi", config={k: v for k, v in cfg.to_dict().items()
                                                     if isinstance(v, (int, float, str, bool))})
    metrics = _MetricsWriter(run_dir / "metrics.jsonl", enabled=is_main)
    accelerator.wait_for_everyone()

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not (is_main and cfg.progress), dynamic_ncols=True,
               desc=f"{cfg.loss}:{cfg.model}", unit="step")
    last_ckpt = latest_checkpoint(run_dir)
    status = "finished"
    window_images, window_start = 0, time.perf_counter()
    images_per_s = 0.0
    final_knn = None
    micro = step * cfg.grad_accum  # micro-batches consumed so far
    model.train()
    try:
        with _StopFlag() as stop:
            while step < total_steps:
                epoch, skip = divmod(micro, micro_per_epoch)
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(epoch)
                micro_at_start = micro
                for batch_idx, (view_a, view_b) in enumerate(loader):
                    if batch_idx < skip:
                        continue
                    if batch_idx >= micro_per_epoch or step >= total_steps:
                        break
                    view_a = view_a.to(device, non_blocking=True)
                    view_b = view_b.to(device, non_blocking=True)
                    if cfg.channels_last:
                        view_a = view_a.contiguous(memory_format=torch.channels_last)
                        view_b = view_b.contiguous(memory_format=torch.channels_last)
                    lr_factor = lr_at_step(step, total_steps, warmup_steps, cfg.min_lr_ratio)
                    rates = set_lr(optimizer, lr_factor)
                    with accelerator.accumulate(model):
                        # both views in one forward pass (BatchNorm statistics over the 2N images)
                        _, emb = model(torch.cat([view_a, view_b], dim=0))
                        emb_a, emb_b = emb.chunk(2, dim=0)
                        loss = loss_fn(emb_a, emb_b)
                        if cfg.inject_nan_at_step is not None and step == cfg.inject_nan_at_step:
                            loss = loss * float("nan")
                        # one collective per micro-step: every rank stops together (NaN anywhere, or a signal)
                        flags = torch.tensor([0.0 if torch.isfinite(loss) else 1.0, float(stop.requested)],
                                             device=device)
                        flags = accelerator.reduce(flags, reduction="sum")
                        if flags[0] > 0:
                            raise NonFiniteLossError(
                                f"non-finite loss ({loss.item()}) at step {step} (epoch {epoch}, lr {rates[0]:.4g}); "
                                f"no checkpoint was written over the last good one "
                                f"({last_ckpt if last_ckpt else 'none yet'}). Lower --lr, raise --eps, or use "
                                f"--mixed-precision no; resume with --resume auto."
                            )
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and cfg.clip_grad:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    micro += 1
                    window_images += view_a.shape[0] * accelerator.num_processes
                    if not accelerator.sync_gradients:
                        continue
                    step += 1
                    bar.update(1)
                    loss_value = loss.item()
                    if step % cfg.log_every == 0 or step == total_steps:
                        now = time.perf_counter()
                        images_per_s = window_images / max(now - window_start, 1e-9)
                        window_images, window_start = 0, now
                        record = {"step": step, "epoch": round(micro / micro_per_epoch, 4), "loss": loss_value,
                                  "lr": rates[0], "images_per_s": round(images_per_s, 2),
                                  **{f"data_{k}": v for k, v in _loader_stats(loader).items() if v}}
                        metrics.write(record)
                        if log_with_tracker(accelerator):
                            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{rates[0]:.3g}",
                                        img_s=f"{images_per_s:.0f}",
                                        skipped=sum(v for k, v in _loader_stats(loader).items()
                                                    if k.startswith("skipped")) or 0)
                        if on_step is not None:
                            on_step(step, record)
                    if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                        final_knn = _run_monitor(accelerator, unwrapped, cfg, device, step, metrics)
                        model.train()
                    if flags[1] > 0:
                        last_ckpt = save_checkpoint(accelerator, run_dir, step,
                                                    {"step": step, "epoch": micro / micro_per_epoch,
                                                     "reason": "signal"}, cfg.keep_last)
                        status = "interrupted"
                        if is_main:
                            bar.write(f"stop requested: saved {last_ckpt}; resume with --resume auto")
                        break
                    if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                        last_ckpt = save_checkpoint(accelerator, run_dir, step,
                                                    {"step": step, "epoch": micro / micro_per_epoch},
                                                    cfg.keep_last)
                if status == "interrupted":
                    break
                if step < total_steps and micro % micro_per_epoch:
                    # the loader ended the epoch early (skipped corrupt samples): start the next epoch
                    if micro == micro_at_start:
                        raise RuntimeError(
                            f"the training loader yielded no batch for epoch {epoch} (data stats: "
                            f"{_loader_stats(loader)}); check --data and the shards"
                        )
                    micro = (epoch + 1) * micro_per_epoch
    finally:
        bar.close()
    export_dir = curve = None
    if status == "finished":
        if last_ckpt is None or read_trainer_state(last_ckpt)["step"] != step:
            last_ckpt = save_checkpoint(accelerator, run_dir, step,
                                        {"step": step, "epoch": micro / micro_per_epoch, "reason": "end"},
                                        cfg.keep_last)
        if cfg.eval_train and cfg.eval_test:
            final_knn = _run_monitor(accelerator, unwrapped, cfg, device, step, metrics)
        if is_main and cfg.export:
            export_dir = _export(unwrapped, run_dir, run_config)
    metrics.close()
    if is_main:
        curve = _plot_curves(run_dir / "metrics.jsonl", run_dir / "training_curve.png")
    accelerator.wait_for_everyone()
    if log_with_tracker(accelerator):
        for tracker in accelerator.trackers:  # not end_training(): the caller may still use the process group
            tracker.finish()
    return TrainResult(run_dir=run_dir, step=step, total_steps=total_steps, status=status, last_checkpoint=last_ckpt,
                       export_dir=export_dir, metrics_path=run_dir / "metrics.jsonl", curve_png=curve,
                       final_knn=final_knn, images_per_s=images_per_s, model=unwrapped)


def log_with_tracker(accelerator) -> bool:
    return bool(getattr(accelerator, "log_with", None))


def _run_monitor(accelerator, model, cfg: TrainConfig, device, step: int, metrics: _MetricsWriter):
    """Online kNN on the main process; the other ranks wait."""
    result = None
    if accelerator.is_main_process:
        t0 = time.perf_counter()
        result = _knn_monitor(model, cfg, device)
        if result is not None:
            record = {"step": step, **result, "eval_seconds": round(time.perf_counter() - t0, 2)}
            metrics.write(record)
            if log_with_tracker(accelerator):
                accelerator.log(result, step=step)
    accelerator.wait_for_everyone()
    return result
