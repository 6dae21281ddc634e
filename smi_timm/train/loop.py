"""The pretraining loop, driven by Hugging Face Accelerate.

Accelerate owns devices, DDP (one or many GPUs, one or many nodes), mixed precision, gradient accumulation and the
checkpoint state; this module owns the SSL step, the schedule, atomic checkpoints, logging and the end-of-run
export. Launch it with ``accelerate launch`` (any number of processes) or plain ``python`` (one process).

Reading order: :func:`train` = :func:`_setup` (accelerator, model, loss, loader, optimiser, resume) →
:func:`_run` (the batch iterator :func:`_batches`, the step :func:`_micro_step`, the cadence :func:`_after_step`:
log, check, evaluate, checkpoint) → :func:`_finish` (last checkpoint, kNN, export, curve, summary).

No host synchronisation in steady state: the loss is read on the host only at log steps, and the non-finite-loss /
stop-signal flags (all-reduced so that every rank stops at the same step) only every ``check_every`` steps and before
any checkpoint, evaluation or export, so that a non-finite loss never reaches a checkpoint.

Data order is a function of ``(seed, epoch, rank)``: a resumed run re-opens the current epoch and skips the
micro-batches it already consumed, so that an interrupted run continues exactly where it stopped.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..curves import plot_curves, read_metrics
from ..data import make_ssl_loader
from ..data.stats import SKIP_KINDS
from ..errors import ConfigError, DataStallError, TrainingError
from ..eval.knn import knn_evaluate
from ..export import export_backbone
from ..layout import CURVE_PNG, EXPORT_DIR, METRICS, RUN_CONFIG, TRAIN_SUMMARY, atomic_write_bytes
from ..models import create_ssl_model
from ..resolve import resolve_backbone
from .checkpoint import (
    check_safe_to_load,
    latest_checkpoint,
    read_trainer_state,
    resolve_resume,
    save_checkpoint,
    write_json_atomic,
)
from .config import TrainConfig
from .monitor import CollapseMonitor, LossHealth, ThroughputMeter
from .optim import build_optimizer, lr_at_step, set_lr

__all__ = ["train", "TrainResult", "NonFiniteLossError", "resolve_mixed_precision", "resolve_trackers"]

StepHook = Callable[[int, Dict[str, Any]], None]

log = logging.getLogger(__name__)


class NonFiniteLossError(TrainingError):
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
    throughput: Dict[str, float] = field(default_factory=dict)  # run averages: images/s, data wait, step time, memory
    data: Dict[str, int] = field(default_factory=dict)  # what the loader read and did not use (this process)


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


class _MetricsWriter:
    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self._fh = open(path, "a", buffering=1) if enabled else None

    def write(self, record: Dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


@dataclass
class _Run:
    """Everything one run carries between the helpers of this module."""

    cfg: TrainConfig
    accelerator: Any
    model: torch.nn.Module  # prepared (DDP-wrapped when distributed)
    unwrapped: torch.nn.Module
    optimizer: Any
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    loader: Any
    run_dir: Path
    run_config: Dict[str, Any]
    total_steps: int
    warmup_steps: int
    micro_per_epoch: int
    metrics: _MetricsWriter
    meter: ThroughputMeter
    health: LossHealth
    collapse: CollapseMonitor = field(default_factory=CollapseMonitor)
    step: int = 0
    micro: int = 0  # micro-batches consumed so far
    last_ckpt: Optional[Path] = None
    final_knn: Optional[Dict[str, float]] = None
    rates: List[float] = field(default_factory=list)
    bar: Any = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def epoch(self) -> float:
        return self.micro / self.micro_per_epoch

    def is_log_step(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step >= self.total_steps


# ------------------------------------------------------------------------------------------------------------------
# setup
# ------------------------------------------------------------------------------------------------------------------
def resolve_mixed_precision(value: Optional[str], device: torch.device) -> str:
    """``--mixed-precision``: an explicit ``no``/``fp16``/``bf16`` wins; ``auto`` takes the ``accelerate launch``
    setting when it asks for fp16 or bf16, else bf16 on a CUDA device that supports it, else ``no``."""
    if value not in (None, "auto"):
        if value not in ("no", "fp16", "bf16"):
            raise ConfigError(f"--mixed-precision must be no, fp16, bf16 or auto, got {value!r}")
        return value
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched in ("fp16", "bf16"):
        return launched
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


# Package that provides each tracker accelerate supports (for the error message when it is missing).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim",
                    "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                    "trackio": "trackio"}


def resolve_trackers(cfg: TrainConfig) -> Optional[List[str]]:
    """The trackers of ``--log-with`` (and the ``--tensorboard`` alias), each checked to be supported by accelerate
    and installed; a missing package is an error naming what to install (a long run without its logs is worse)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [str(n).lower() for n in (cfg.log_with or [])] + (["tensorboard"] if cfg.tensorboard else [])
    if not names:
        return None
    available = {str(t) for t in get_available_trackers()}
    trackers = []
    for name in dict.fromkeys(names):
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"--log-with {name}: not a tracker accelerate supports; choose from "
                             f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        if name not in available:
            package = TRACKER_PACKAGES.get(name, name)
            raise ConfigError(f"--log-with {name}: the {package!r} package is not installed; pip install {package} "
                             f"(for TensorBoard: pip install 'smi-timm[tensorboard]'), or drop --log-with {name}")
        trackers.append(name)
    return trackers


def _make_accelerator(cfg: TrainConfig, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import parse_flag_from_env

    # the device type the Accelerator will pick (creating a PartialState here would fix the process layout early)
    on_cuda = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    device = torch.device("cuda" if on_cuda else "cpu")
    return Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision, device),
                       gradient_accumulation_steps=cfg.grad_accum, log_with=resolve_trackers(cfg),
                       project_dir=str(run_dir), dynamo_backend="inductor" if cfg.compile else None)


def _configure_device(cfg: TrainConfig, device: torch.device) -> None:
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convolution algorithms once
    torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
    torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)


def _embedding_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype autocast gives activations (and so the embeddings), and the loader's output dtype: halves the
    bytes of every batch under bf16 / fp16."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def _build_model(cfg: TrainConfig, accelerator, channels_last: bool) -> Tuple[torch.nn.Module, Optional[Dict]]:
    """The SSL model (``--init-from`` weights loaded, SyncBatchNorm, memory format) and what was loaded, if any."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = create_ssl_model(cfg.model, cfg.projector, cifar_stem=cfg.cifar_stem, **(cfg.model_kwargs or {}))
    if cfg.sync_bn and accelerator.num_processes > 1:
        bn_types = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
        norms = sum(isinstance(m, bn_types) for m in model.modules())
        if accelerator.device.type == "cuda":  # torch's SyncBatchNorm runs on CUDA devices only
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if accelerator.is_main_process and norms and accelerator.device.type == "cuda":
            log.info(f"SyncBatchNorm: {norms} BatchNorm layers normalise over the global batch "
                     f"({accelerator.num_processes} processes); --no-sync-bn keeps per-process statistics")
        elif accelerator.is_main_process and norms:
            log.warning("SyncBatchNorm needs CUDA devices: BatchNorm keeps per-process statistics on this CPU run")
    init = None
    if cfg.init_from:
        init = _init_from(cfg, model)
        if accelerator.is_main_process:
            log.info(f"initialised from {init['source']} ({init['kind']}): loaded {', '.join(init['loaded'])}"
                  + ("" if "projector" in init["loaded"] else "; the projector starts fresh"))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, init


def _init_from(cfg: TrainConfig, model) -> Dict[str, Any]:
    """Load ``--init-from`` into the freshly built model; returns what was loaded (recorded in run_config.json)."""
    source = str(cfg.init_from)
    if source.startswith("timm:") and source[len("timm:"):] != cfg.model:
        raise ConfigError(f"--init-from {source} is a different architecture from --model {cfg.model}; pass "
                         f"--model {source[len('timm:'):]}")
    src = resolve_backbone(source, model=cfg.model, cifar_stem=cfg.cifar_stem, timm_kwargs=cfg.model_kwargs,
                           weights_file=cfg.weights_file)
    loaded = src.load_into(model, projector=cfg.init_projector)
    return {"source": src.weights, "kind": src.kind, "sha256": src.weights_sha256, "step": src.step,
            "loaded": loaded}


def _make_loader(cfg: TrainConfig, accelerator, channels_last: bool):
    return make_ssl_loader(cfg.data, batch_size=cfg.batch_size, image_size=cfg.image_size, augment=cfg.augment,
                           num_workers=cfg.workers, seed=cfg.seed, rank=accelerator.process_index,
                           world_size=accelerator.num_processes, epoch_samples=cfg.epoch_samples,
                           shuffle_buffer=cfg.shuffle_buffer,
                           run_batches=cfg.max_steps * cfg.grad_accum if cfg.max_steps else None,
                           device=accelerator.device, augment_on=cfg.augment_device, channels_last=channels_last,
                           out_dtype=_embedding_dtype(accelerator.mixed_precision))


def _precompile_loss(cfg: TrainConfig, accelerator, loss_fn, dim: int) -> None:
    """Compile the loss kernels once per machine before the processes contend: the local main process first (it
    fills Triton's on-disk cache, ``TRITON_CACHE_DIR`` honoured), then the others, which find them there."""
    precompile = getattr(loss_fn, "precompile", None)
    if precompile is None:
        return
    n = cfg.batch_size * (accelerator.num_processes if cfg.gather else 1)
    dtype = _embedding_dtype(accelerator.mixed_precision)
    with accelerator.local_main_process_first():
        precompile(n, dim, dtype, accelerator.device)


def _run_config(cfg: TrainConfig, accelerator, unwrapped, loader, schedule,
                init: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    total_steps, steps_per_epoch, global_batch = schedule
    return {
        "model": cfg.model, "projector": unwrapped.projector_spec, "cifar_stem": cfg.cifar_stem,
        "timm_kwargs": dict(cfg.model_kwargs or {}), "image_size": cfg.image_size,
        "mean": list(loader.augment.mean), "std": list(loader.augment.std),
        "loss": {"name": cfg.loss, **cfg.loss_entry().definition(cfg.loss_args), "gather": cfg.gather},
        "recipe": {**cfg.to_dict(), "global_batch": global_batch, "total_steps": total_steps,
                   "steps_per_epoch": steps_per_epoch, "num_processes": accelerator.num_processes,
                   "mixed_precision": accelerator.mixed_precision},
        "init": init,
    }


def _schedule(cfg: TrainConfig, micro_per_epoch: int, num_processes: int) -> Tuple[int, int, int, int]:
    """(total steps, warm-up steps, steps per epoch, global batch)."""
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    if steps_per_epoch < 1:
        raise ConfigError(
            f"an epoch has {micro_per_epoch} batches per process, fewer than --grad-accum {cfg.grad_accum}: use a "
            f"smaller --batch-size or more data"
        )
    total = int(cfg.max_steps) if cfg.max_steps else int(math.ceil(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_epochs * steps_per_epoch)
    return total, min(warmup, max(0, total - 1)), steps_per_epoch, cfg.batch_size * num_processes * cfg.grad_accum


def _setup(cfg: TrainConfig, accelerator, loss_fn) -> _Run:
    from accelerate.utils import set_seed

    if cfg.data is None:
        raise ConfigError("no training data: pass --data with WebDataset shards (or 'sample' for the bundled sample)")
    if cfg.check_every is not None and cfg.check_every < 1:
        raise ConfigError(f"--check-every must be a positive number of steps, got {cfg.check_every}")
    run_dir = Path(cfg.output_dir)
    accelerator = accelerator if accelerator is not None else _make_accelerator(cfg, run_dir)
    device = accelerator.device
    _configure_device(cfg, device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    model, init = _build_model(cfg, accelerator, channels_last)
    loss_fn = loss_fn if loss_fn is not None else cfg.create_loss()
    set_seed(cfg.seed, device_specific=True)  # rank-specific randomness from here on
    loader = _make_loader(cfg, accelerator, channels_last)
    micro_per_epoch = len(loader)
    total, warmup, steps_per_epoch, global_batch = _schedule(cfg, micro_per_epoch, accelerator.num_processes)
    optimizer = build_optimizer(model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                global_batch=global_batch, lr_biases=cfg.lr_biases, momentum=cfg.momentum)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    _precompile_loss(cfg, accelerator, loss_fn, unwrapped.embedding_dim)
    run = _Run(cfg=cfg, accelerator=accelerator, model=model, unwrapped=unwrapped, optimizer=optimizer,
               loss_fn=loss_fn, loader=loader, run_dir=run_dir,
               run_config=_run_config(cfg, accelerator, unwrapped, loader, (total, steps_per_epoch, global_batch),
                                      init),
               total_steps=total, warmup_steps=warmup, micro_per_epoch=micro_per_epoch,
               metrics=_MetricsWriter(run_dir / METRICS, enabled=False),
               meter=ThroughputMeter(device, cfg.batch_size * accelerator.num_processes), health=LossHealth(device))
    _resume(run)
    _open_run_dir(run)
    return run


def _resume(run: _Run) -> None:
    ckpt = resolve_resume(run.cfg.resume, run.run_dir)
    if ckpt is None:
        return
    check_safe_to_load(ckpt, run.accelerator.process_index)
    run.accelerator.load_state(str(ckpt))
    run.step = int(read_trainer_state(ckpt)["step"])
    run.micro = run.step * run.cfg.grad_accum
    if run.is_main:
        log.info(f"resumed from {ckpt} at step {run.step}/{run.total_steps}")


def _open_run_dir(run: _Run) -> None:
    from tqdm.auto import tqdm

    if run.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.run_dir / RUN_CONFIG, run.run_config)
        if run.step > 0:
            _truncate_metrics(run.run_dir / METRICS, run.step)
        if _has_tracker(run.accelerator):
            run.accelerator.init_trackers(run.cfg.tracker_project, config={k: v for k, v in run.cfg.to_dict().items()
                                                         if isinstance(v, (int, float, str, bool))})
    run.metrics = _MetricsWriter(run.run_dir / METRICS, enabled=run.is_main)
    run.last_ckpt = latest_checkpoint(run.run_dir)
    run.accelerator.wait_for_everyone()
    run.bar = tqdm(total=run.total_steps, initial=run.step, disable=not (run.is_main and run.cfg.progress),
                   dynamic_ncols=True, desc=f"{run.cfg.loss}:{run.cfg.model}", unit="step")


def _truncate_metrics(path: Path, step: int) -> None:
    """A resumed run redoes the steps after its checkpoint: drop their rows (and any line cut short by a crash) so
    that ``metrics.jsonl`` keeps one row per logged step."""
    if not path.is_file():
        return
    rows, bad = read_metrics(path)
    kept = [r for r in rows if r["step"] <= step]
    if bad or len(kept) != len(rows):
        atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())


# ------------------------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, accelerator=None, on_step: Optional[StepHook] = None,
          loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> TrainResult:
    """Run (or resume) a pretraining run described by ``cfg``; returns where everything was written.

    Args:
        cfg: the run's configuration (every field is also a command-line flag).
        accelerator: an ``accelerate.Accelerator`` to use (default: one built from ``cfg``).
        on_step: called as ``on_step(step, record)`` on the main process at every log step.
        loss_fn: a loss ``(emb_a, emb_b) -> scalar`` replacing the one ``cfg.loss`` names (e.g. your own, or a
            wrapped one); ``cfg``'s loss settings are still recorded in ``run_config.json``.
    """
    run = _setup(cfg, accelerator, loss_fn)
    try:
        with _StopFlag() as stop:
            status = _run(run, stop, on_step)
    finally:
        run.bar.close()
        close = getattr(run.loader, "close", None)
        if close is not None:
            close()
    return _finish(run, status)


def _run(run: _Run, stop: _StopFlag, on_step: Optional[StepHook]) -> str:
    run.model.train()
    for view_a, view_b in _batches(run):
        loss = _micro_step(run, view_a, view_b)
        if not run.accelerator.sync_gradients:
            continue
        run.step += 1
        run.meter.stepped()
        run.bar.update(1)
        if _after_step(run, loss, stop, on_step):
            return "interrupted"
    return "finished"


def _batches(run: _Run) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches from the current position to the end of the run, epoch by epoch. A resumed run starts inside
    its epoch: the loader skips the consumed batches at the shard/sample level, without decoding them.

    The time spent waiting for each batch goes to the throughput meter.
    """
    while run.step < run.total_steps:
        epoch, skip = divmod(run.micro, run.micro_per_epoch)
        run.loader.set_epoch(epoch, start_batch=skip)
        start = run.micro
        batches = iter(run.loader)
        try:
            while run.step < run.total_steps and run.micro < (epoch + 1) * run.micro_per_epoch:
                t0 = time.perf_counter()
                batch = next(batches, None)
                run.meter.waited(time.perf_counter() - t0)
                if batch is None:
                    break
                yield batch
        finally:
            batches.close()
        if run.step < run.total_steps and run.micro % run.micro_per_epoch:
            # the loader ended the epoch early (skipped corrupt samples): start the next epoch
            if run.micro == start:
                raise DataStallError(f"the training loader yielded no batch for epoch {epoch} (data stats: "
                                   f"{run.loader.stats()}); check --data and the shards")
            run.micro = (epoch + 1) * run.micro_per_epoch


def _micro_step(run: _Run, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
    """Forward both views in one pass (BatchNorm statistics over the 2N images), the loss, backward, and the
    optimiser step when the accumulation window closes. Queues device work only."""
    cfg, acc = run.cfg, run.accelerator
    run.rates = set_lr(run.optimizer, lr_at_step(run.step, run.total_steps, run.warmup_steps, cfg.min_lr_ratio))
    with acc.accumulate(run.model):
        _, emb = run.model(torch.cat([view_a, view_b], dim=0))
        emb_a, emb_b = emb.chunk(2, dim=0)
        if run.is_log_step(run.step + 1):
            run.collapse.keep(emb_a)
        loss = run.loss_fn(emb_a, emb_b)
        run.health.observe(loss, run.step + 1)
        acc.backward(loss)
        if acc.sync_gradients and cfg.clip_grad:
            acc.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.micro += 1
    run.meter.micro_step()
    return loss.detach()


def _after_step(run: _Run, loss: torch.Tensor, stop: _StopFlag, on_step: Optional[StepHook]) -> bool:
    """The cadence after an optimiser step: log, check, evaluate, checkpoint. True when the run must stop."""
    cfg, step = run.cfg, run.step
    last = step >= run.total_steps
    log_now = run.is_log_step(step)
    check_every = min(cfg.check_every or cfg.log_every, cfg.log_every)
    eval_now = bool(cfg.eval_every) and step % cfg.eval_every == 0 and not last
    save_now = bool(cfg.save_every) and step % cfg.save_every == 0 and not last
    if log_now:
        _log(run, on_step)
    if not (log_now or eval_now or save_now or step % check_every == 0):
        return False
    if _check(run, stop):
        run.last_ckpt = _save(run, "signal")
        if run.is_main:
            log.warning(f"stop requested: saved {run.last_ckpt}; resume with --resume auto")
        return True
    if eval_now:
        run.final_knn = _run_monitor(run)
        run.model.train()
    if save_now:
        run.last_ckpt = _save(run)
    return False


def _check(run: _Run, stop: _StopFlag) -> bool:
    """All-reduce the flags and read them (one host sync): raise on a non-finite loss on any rank; True when any
    rank was asked to stop."""
    flags = run.accelerator.reduce(run.health.flags(stop.requested), reduction="sum")
    bad, stop_now = LossHealth.read(flags)
    if bad:
        first = run.health.first_bad_step()
        where = f"at step {first}" if first is not None else "on another rank"
        raise NonFiniteLossError(
            f"non-finite loss {where} (checked at step {run.step}, lr {run.rates[0]:.4g}); no checkpoint was "
            f"written after it, the last good one is {run.last_ckpt if run.last_ckpt else 'none yet'}. Lower --lr, "
            f"raise --eps, or use --mixed-precision no; resume with --resume auto."
        )
    return stop_now


def _log(run: _Run, on_step: Optional[StepHook]) -> None:
    values = run.health.window_mean().view(1)
    collapse = run.collapse.stats()
    if collapse is not None:
        values = torch.cat([values, collapse.to(values.dtype)])
    values = values.tolist()  # the one host sync of a log step
    loss_value, health = values[0], dict(zip(CollapseMonitor.KEYS, values[1:]))
    stats = run.loader.stats()
    record = {"step": run.step, "epoch": round(run.epoch, 4), "loss": loss_value, "lr": run.rates[0],
              **{k: round(v, 4) for k, v in health.items()}, **run.meter.window(),
              **{f"data_{k}": v for k, v in stats.items() if v}}
    run.metrics.write(record)
    if _has_tracker(run.accelerator):
        run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=run.step)
    postfix = dict(loss=f"{loss_value:.4f}", lr=f"{run.rates[0]:.3g}", img_s=f"{record['images_per_s']:.0f}",
                   wait=f"{100 * record['data_wait_frac']:.0f}%")
    if health:
        postfix["rank"] = f"{health['emb_rankme']:.0f}"
    skipped = sum(stats.get(k, 0) for k in SKIP_KINDS)  # every counter that means "data not used"
    if skipped:
        postfix["skipped"] = skipped
    run.bar.set_postfix(postfix)
    warning = run.collapse.warning(run.step, health) if health else None
    if warning and run.is_main:
        log.warning(warning)
    if on_step is not None and run.is_main:
        on_step(run.step, record)


def _save(run: _Run, reason: Optional[str] = None) -> Path:
    state = {"step": run.step, "epoch": run.epoch}
    if reason:
        state["reason"] = reason
    return save_checkpoint(run.accelerator, run.run_dir, run.step, state, run.cfg.keep_last)


# ------------------------------------------------------------------------------------------------------------------
# evaluation, export and the end of the run
# ------------------------------------------------------------------------------------------------------------------
def _run_monitor(run: _Run) -> Optional[Dict[str, float]]:
    """Online kNN (bank ``--eval-train``, queries ``--eval-test``) on the main process; the other ranks wait."""
    result = None
    if run.is_main:
        t0 = time.perf_counter()
        cfg = run.cfg
        workers = min(cfg.workers, 2) if cfg.workers is not None else None
        result = knn_evaluate(run.unwrapped.backbone, cfg.eval_train, cfg.eval_test, ks=(cfg.eval_k,),
                              image_size=cfg.eval_image_size or cfg.image_size, workers=workers,
                              device=run.device).monitor(cfg.eval_k)
        run.metrics.write({"step": run.step, **result, "eval_seconds": round(time.perf_counter() - t0, 2)})
        if _has_tracker(run.accelerator):
            run.accelerator.log(result, step=run.step)
    run.accelerator.wait_for_everyone()
    return result


def _finish(run: _Run, status: str) -> TrainResult:
    export_dir = curve = None
    if status == "finished":
        if run.last_ckpt is None or read_trainer_state(run.last_ckpt)["step"] != run.step:
            run.last_ckpt = _save(run, "end")
        if run.cfg.eval_train and run.cfg.eval_test:
            run.final_knn = _run_monitor(run)
        if run.is_main and run.cfg.export:
            export_dir = run.run_dir / EXPORT_DIR
            export_backbone(run.unwrapped, export_dir, run.run_config, step=run.step)
    run.metrics.close()
    summary = run.meter.summary()
    data = {k: v for k, v in run.loader.stats().items() if v or k == "samples"}
    ignored = sum(getattr(getattr(run.loader, "source", None), "ignored", {}).values())
    if ignored:  # files next to the data that are neither shards nor images: never read
        data["ignored_files"] = int(ignored)
    if run.is_main:
        curve = plot_curves(run.metrics.path, run.run_dir / CURVE_PNG)
        write_json_atomic(run.run_dir / TRAIN_SUMMARY, {"status": status, "step": run.step,
                                                        "total_steps": run.total_steps, **summary, "data": data})
    run.accelerator.wait_for_everyone()
    if _has_tracker(run.accelerator):
        for tracker in run.accelerator.trackers:  # not end_training(): the caller may still use the process group
            tracker.finish()
    return TrainResult(run_dir=run.run_dir, step=run.step, total_steps=run.total_steps, status=status,
                       last_checkpoint=run.last_ckpt, export_dir=export_dir, metrics_path=run.metrics.path,
                       curve_png=curve, final_knn=run.final_knn, images_per_s=summary.get("images_per_s", 0.0),
                       model=run.unwrapped, throughput=summary, data=data)


def _has_tracker(accelerator) -> bool:
    return bool(getattr(accelerator, "log_with", None))
